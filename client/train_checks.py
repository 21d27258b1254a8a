"""The checks of `TrainOptions` (`lmps train`, `lmps demo`): each refusal is a ValueError of
one line that names the flag, raised when the options are made, before anything is sent."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from lmps.core.compress import compression_from_name
from lmps.core.model import POOLINGS
from lmps.core.optim import KINDS, OPTIMIZERS, SCHEDULE_NAMES, SCHEDULES
from lmps.core.settings import MAX_LOCAL_STEPS
from lmps.core.tasks import TASK_NAMES

if TYPE_CHECKING:
    from lmps.client.train_options import TrainOptions

TASK_CHOICES: tuple[str, ...] = TASK_NAMES
AUTOCAST_CHOICES = ("off", "bf16")
"""--autocast: off (fp32) or bf16 (`JobSpec.autocast` BFLOAT16)."""
CLASSIFY_FLAGS = ("pooling", "freeze_backbone")
"""`TrainOptions` fields that only apply with --task classify."""
INNER_FLAGS = (
    "inner_optimizer",
    "inner_lr",
    "inner_weight_decay",
    "inner_warmup_steps",
    "inner_schedule",
)
"""`TrainOptions` fields of the inner optimizer: they only apply with --local-steps."""
LOCAL_STEPS_FLAGS = ("fragments", "overlap", *INNER_FLAGS)
"""`TrainOptions` fields that only apply with --local-steps."""


def check(opts: TrainOptions) -> None:
    """Refuse options that do not fit: a ValueError of one line naming the flag(s), the first
    refusal found (`TrainOptions.__post_init__` calls this)."""
    if opts.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    if opts.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if opts.log_every < 1:
        raise ValueError("--log-every must be >= 1")
    if not 0 < opts.eval_fraction < 1:
        raise ValueError("--eval-fraction must be in (0, 1)")
    if opts.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be {' or '.join(KINDS)}")
    if opts.schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be {' or '.join(SCHEDULE_NAMES)}")
    _check_local_steps(opts)
    _check_task(opts)
    _, staleness = opts.consistency_mode()  # raises on a bad --consistency
    if not (math.isfinite(opts.max_grad_norm) and opts.max_grad_norm >= 0):
        raise ValueError("--max-grad-norm must be a finite number >= 0 (0 = off)")
    if opts.fragments > 1 and staleness:
        raise ValueError(
            f"--fragments {opts.fragments} syncs one fragment per version in turn, which needs "
            f"--consistency sync, not {opts.consistency}: drop one of them"
        )
    if opts.max_grad_norm and staleness and not opts.local_steps:
        raise ValueError(
            f"--max-grad-norm needs each step's norm before the next, which --consistency "
            f"{opts.consistency} would wait for at every step: drop one of them"
        )
    try:
        compression_from_name(opts.push_compression)
    except ValueError as err:
        raise ValueError(f"--push-compression: {err}") from None
    if opts.nesterov and opts.optimizer != "sgd":
        raise ValueError("--nesterov is an SGD setting: add --optimizer sgd")
    if opts.replication not in (1, 2):
        raise ValueError("--replication must be 1 or 2")
    if opts.replication == 2 and opts.servers == 1:
        raise ValueError(
            "--replication 2 keeps every shard on two parameter servers: --servers 1 is "
            "too few; use --servers 0 (every registered one) or 2 or more"
        )


def _check_task(opts: TrainOptions) -> None:
    """--task and what goes with it: classify-only flags, --micro-batches, --autocast."""
    if opts.task not in TASK_CHOICES:
        raise ValueError(f"--task must be {', '.join(TASK_CHOICES[:-1])} or {TASK_CHOICES[-1]}")
    if opts.pooling not in ("", *POOLINGS):
        raise ValueError(f"--pooling must be {' or '.join(POOLINGS)}")
    if opts.task != "classify":
        given = [
            f"--{f.name.replace('_', '-')}"
            for f in dataclasses.fields(opts)
            if f.name in CLASSIFY_FLAGS and getattr(opts, f.name) != f.default
        ]
        if given:  # never silently ignored: only a classifier has a head to pool or train
            raise ValueError(
                f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} "
                f"with --task classify (this is --task {opts.task})"
            )
    if opts.task != "lm" and opts.data == "builtin:pydoc":
        want = (
            'a {"text", "label"} JSONL or builtin:pydoc-topics'
            if opts.task == "classify"
            else 'a {"messages": [...]} or {"prompt", "completion"} JSONL'
        )
        raise ValueError(
            f"--task {opts.task} needs its own --data, {want} (builtin:pydoc is plain text)"
        )
    if opts.task == "classify" and opts.sample_prompt:
        raise ValueError(
            "--sample-prompt samples text; a classifier answers with a label: drop it and "
            'run `lmps predict --model OUT "TEXT"` after training'
        )
    if opts.micro_batches < 1:
        raise ValueError("--micro-batches must be >= 1")
    if opts.batch_size % opts.micro_batches:
        raise ValueError(
            f"--micro-batches {opts.micro_batches} must divide --batch-size "
            f"{opts.batch_size} (each micro-batch is an equal slice of the batch)"
        )
    if opts.autocast not in AUTOCAST_CHOICES:
        raise ValueError(f"--autocast must be {' or '.join(AUTOCAST_CHOICES)}")


def _check_local_steps(opts: TrainOptions) -> None:
    if not 0 <= opts.local_steps <= MAX_LOCAL_STEPS:
        raise ValueError(f"--local-steps must be in [0, {MAX_LOCAL_STEPS}] (0 = off)")
    if opts.batches_per_lease < 0:
        raise ValueError("--batches-per-lease must be >= 0 (0 = the default)")
    if opts.fragments < 1:
        raise ValueError("--fragments must be >= 1 (1 = off)")
    if not opts.local_steps:
        given = [
            f"--{f.name.replace('_', '-')}"
            for f in dataclasses.fields(opts)
            if f.name in LOCAL_STEPS_FLAGS and getattr(opts, f.name) != f.default
        ]
        if given:
            # Never silently ignored: without local steps no inner optimizer runs, and
            # nothing is synced in fragments.
            raise ValueError(
                f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} "
                "with local steps: add --local-steps H"
            )
        return
    if opts.inner_optimizer not in OPTIMIZERS:
        raise ValueError(f"--inner-optimizer must be {' or '.join(KINDS)}")
    if opts.inner_schedule not in SCHEDULES:
        raise ValueError(f"--inner-schedule must be {' or '.join(SCHEDULE_NAMES)}")
    if opts.overlap and opts.fragments == 1:
        raise ValueError(
            "--overlap overlaps a fragment's sync with the next window: add --fragments F"
        )
    if opts.local_steps % opts.fragments:
        raise ValueError(
            f"--fragments {opts.fragments} must divide --local-steps {opts.local_steps} "
            "(a window is H / F whole inner steps)"
        )
    if opts.batches_per_lease % opts.local_steps:
        rounds = "one round" if opts.fragments == 1 else f"{opts.fragments} rounds"
        raise ValueError(
            f"--batches-per-lease {opts.batches_per_lease} must be a multiple of "
            f"--local-steps {opts.local_steps} (or 0: {opts.fragments * opts.local_steps}, "
            f"{rounds} a lease)"
        )
    # Imported here: lmps.client.train_options imports this module.
    from lmps.client.train_options import inner_optimizer_request

    try:
        inner_optimizer_request(opts)
    except ValueError as err:
        raise ValueError(f"inner optimizer (--inner-*): {err}") from None

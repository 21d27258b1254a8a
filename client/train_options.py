"""`TrainOptions`: everything `lmps train` and `lmps demo` take, each field with its flag
(`Flag`), and the update rule it asks the coordinator for; its checks are
`lmps.client.train_checks`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from lmps.client import preflight
from lmps.client.train_checks import AUTOCAST_CHOICES, TASK_CHOICES, check
from lmps.core.model import POOLINGS, PRESETS
from lmps.core.optim import (
    DEFAULTS,
    KINDS,
    OPTIMIZERS,
    SCHEDULE_NAMES,
    OptimizerKind,
    OptimizerRequest,
    ScheduleName,
)
from lmps.core.settings import MAX_STALENESS, WIRE_DTYPES, Consistency


@dataclass(frozen=True)
class Flag:
    """How a `TrainOptions` field appears on the command line (`lmps train` / `lmps demo`).

    The flag is `--field-name` unless `name` says otherwise; its type and default are the
    field's, and `env` names an LMPS_* variable that replaces the default."""

    group: str
    """The --help section it is listed under."""
    help: str | None = None
    choices: tuple[str, ...] | tuple[int, ...] | None = None
    metavar: str | None = None
    name: str = ""
    env: str = ""


def flag(
    group: str,
    help: str | None = None,
    *,
    choices: tuple[str, ...] | tuple[int, ...] | None = None,
    metavar: str | None = None,
    name: str = "",
    env: str = "",
) -> dict[str, Flag]:
    """A field's metadata that makes it a flag: `field(default=..., metadata=flag(...))`."""
    return {"flag": Flag(group, help, choices=choices, metavar=metavar, name=name, env=env)}


WIRE_DTYPE_NAMES = tuple(str(t).removeprefix("torch.") for t in WIRE_DTYPES)


@dataclass(frozen=True)
class TrainOptions:
    """Everything `lmps train` takes; each field with a `Flag` is one flag of
    `lmps train --help`, with the field's default (`lmps.client.cli_common` builds them in
    order)."""

    coordinator: str = "127.0.0.1:50051"
    """Coordinator address (`lmps train --coordinator`; `lmps demo` starts its own)."""
    name: str = "lmps"
    """Human-readable job label."""
    # -- data
    data: str = field(
        default="builtin:pydoc",
        metadata=flag(
            "data",
            "builtin:pydoc (default), a .txt, a folder of .txt, or a .jsonl with a 'text' field",
        ),
    )
    vocab_size: int = field(
        default=0,
        metadata=flag(
            "data",
            "BPE vocabulary to train; 0 = the preset's ("
            + ", ".join(f"{n} {c.vocab_size}" for n, c in PRESETS.items())
            + ")",
        ),
    )
    eval_fraction: float = field(
        default=0.05, metadata=flag("data", "held-out tail of the corpus (default %(default)s)")
    )
    cache_dir: str = field(
        default=".cache/lmps",
        metadata=flag("data", "where prepared corpora are cached (default %(default)s)"),
    )
    # -- model
    preset: str = field(
        default="",
        metadata=flag("model", f"{' | '.join(PRESETS)} (default: {preflight.DEFAULT_PRESET})"),
    )
    block_size: int = field(default=0, metadata=flag("model", "context length; 0 = the preset's"))
    dropout: float = field(default=0.0, metadata=flag("model"))
    # -- task (fine-tuning)
    task: str = field(
        default="lm",
        metadata=flag(
            "task (fine-tuning)",
            "lm: next-token prediction on a text corpus; classify: sequence classification, "
            '--data a {"text", "label"} JSONL or builtin:pydoc-topics; sft: instruction/chat '
            'tuning, --data a {"messages": [...]} or {"prompt", "completion"} JSONL, loss on '
            "the responses only (default %(default)s)",
            choices=TASK_CHOICES,
        ),
    )
    pooling: str = field(
        default="",
        metadata=flag(
            "task (fine-tuning)",
            "classify: what the head reads, the last token's hidden state (last, the "
            "default) or the mean over the text's tokens",
            choices=POOLINGS,
        ),
    )
    freeze_backbone: bool = field(
        default=False,
        metadata=flag(
            "task (fine-tuning)", "classify: train the classification head only (a linear probe)"
        ),
    )
    # -- optimisation
    epochs: int = field(default=3, metadata=flag("optimisation"))
    batch_size: int = field(
        default=16,
        metadata=flag("optimisation", "sequences per worker per step (default %(default)s)"),
    )
    batches_per_lease: int = field(
        default=0,
        metadata=flag(
            "optimisation",
            "batches in one data lease; 0 = 8, or H with --local-steps (then a multiple of "
            "H), F x H with --fragments F",
        ),
    )
    optimizer: OptimizerKind = field(default="adamw", metadata=flag("optimisation", choices=KINDS))
    lr: float = field(
        default=3e-3, metadata=flag("optimisation", "peak learning rate (default %(default)s)")
    )
    momentum: float = field(default=0.9, metadata=flag("optimisation", "SGD momentum"))
    nesterov: bool = field(
        default=False, metadata=flag("optimisation", "SGD Nesterov momentum (DiLoCo's outer)")
    )
    consistency: str = field(
        default="sync",
        metadata=flag(
            "optimisation",
            "sync (every step waits for every worker), ssp:S (bounded staleness: a worker "
            "may run up to S steps ahead of the slowest; ssp:0 is sync), or async (every "
            "push applied at once; nobody waits)",
            metavar="MODE",
        ),
    )
    weight_decay: float = field(
        default=0.1, metadata=flag("optimisation", "decoupled decay on weights (not biases/norms)")
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata=flag(
            "optimisation",
            "clip every update's gradient by its global L2 norm to X, as "
            "torch.nn.utils.clip_grad_norm_ (sync: the step's mean, across every server; "
            "async: each push; --local-steps: each inner step); 0 = off (default %(default)s)",
            metavar="X",
        ),
    )
    schedule: ScheduleName = field(
        default="cosine", metadata=flag("optimisation", choices=SCHEDULE_NAMES)
    )
    warmup_steps: int = field(default=10, metadata=flag("optimisation"))
    min_lr: float = field(default=3e-4, metadata=flag("optimisation"))
    seed: int = field(default=1337, metadata=flag("optimisation"))
    micro_batches: int = field(
        default=1,
        metadata=flag(
            "optimisation",
            "gradient accumulation: each batch runs as N slices of --batch-size / N sequences, "
            "one push (N must divide --batch-size; default %(default)s)",
            metavar="N",
        ),
    )
    autocast: str = field(
        default="off",
        metadata=flag(
            "optimisation",
            "bf16: workers run forward/backward under bfloat16 autocast (fp32 parameters, "
            "gradients and server copies); off: fp32 throughout (default %(default)s)",
            choices=AUTOCAST_CHOICES,
        ),
    )
    # -- local steps (DiLoCo); the --optimizer above is then the outer one, on the servers
    local_steps: int = field(
        default=0,
        metadata=flag(
            "local steps (DiLoCo)",
            "H: inner steps each worker runs per push of its pseudo-gradient (one version per "
            "round of H batches); --optimizer/--lr become the outer optimizer (DiLoCo: sgd, "
            "lr 0.7, momentum 0.9); 0 = off",
            metavar="H",
        ),
    )
    fragments: int = field(
        default=1,
        metadata=flag(
            "local steps (DiLoCo)",
            "F: streaming fragments (Streaming DiLoCo): each server's shards in F parts that "
            "sync in turn, one per version after H / F inner steps, so a push carries 1/F of "
            "the model; F must divide H; sync only; 1 = off",
            metavar="F",
        ),
    )
    overlap: bool = field(
        default=False,
        metadata=flag(
            "local steps (DiLoCo)",
            "with --fragments: sync each fragment while the next window trains, and rebase "
            "onto its new values one window late (Streaming DiLoCo's overlap)",
        ),
    )
    inner_optimizer: OptimizerKind = field(
        default="adamw", metadata=flag("local steps (DiLoCo)", "run on each worker", choices=KINDS)
    )
    inner_lr: float = field(
        default=1e-3, metadata=flag("local steps (DiLoCo)", "inner peak learning rate")
    )
    inner_weight_decay: float = field(default=0.1, metadata=flag("local steps (DiLoCo)"))
    inner_warmup_steps: int = field(
        default=0, metadata=flag("local steps (DiLoCo)", "in inner steps (H per version)")
    )
    inner_schedule: ScheduleName = field(
        default="constant",
        metadata=flag(
            "local steps (DiLoCo)", "over inner steps (outer steps x H)", choices=SCHEDULE_NAMES
        ),
    )
    # -- cluster
    servers: int = field(
        default=0, metadata=flag("cluster", "parameter servers to use; 0 = all registered")
    )
    workers: int = field(default=0, metadata=flag("cluster", "workers to use; 0 = all registered"))
    wait_s: float = field(
        default=0.0,
        metadata=flag(
            "cluster",
            "seconds to wait for the coordinator to answer; 0 = fail at once if none does",
            name="--wait",
            metavar="SECONDS",
        ),
    )
    wait_members_s: float = field(
        default=60.0,
        metadata=flag(
            "cluster",
            "seconds to wait for enough servers and workers to register (LMPS_WAIT_MEMBERS_S)",
            name="--wait-members",
            env="LMPS_WAIT_MEMBERS_S",
        ),
    )
    wire_dtype: str = field(
        default="float32",
        metadata=flag(
            "cluster", "dtype of parameters/gradients on the wire", choices=WIRE_DTYPE_NAMES
        ),
    )
    shard_bytes: int = field(
        default=0, metadata=flag("cluster", "largest parameter shard in bytes; 0 = default")
    )
    push_compression: str = field(
        default="none",
        metadata=flag(
            "cluster",
            "none, int8[:CHUNK] (per-chunk int8, ~4x fewer bytes) or topk[:RATIO] (largest "
            "RATIO of each shard, e.g. topk:0.01), with error feedback on the workers",
            metavar="KIND",
        ),
    )
    # -- checkpoints and recovery
    resume: str = field(
        default="",
        metadata=flag(
            "checkpoints and recovery",
            "continue JOB from its latest checkpoint (the coordinator's --state-dir keeps it)",
            metavar="JOB",
        ),
    )
    init_from: str = field(
        default="",
        metadata=flag(
            "checkpoints and recovery",
            "fine-tune the model saved in DIR (its config and tokenizer are used): a folder "
            "written by `lmps train`, or hf:DIR, a Hugging Face GPT-2 save_pretrained folder",
            metavar="DIR",
        ),
    )
    checkpoint_every: int = field(
        default=0,
        metadata=flag(
            "checkpoints and recovery", "steps between checkpoints; 0 = at epoch ends only"
        ),
    )
    replication: int = field(
        default=1,
        metadata=flag(
            "checkpoints and recovery",
            "copies of every parameter shard: 1, or 2 = each shard also on a backup server, so "
            "losing a server loses no step and the lost copies are re-created on the others "
            "(needs 2 or more servers; default %(default)s)",
            choices=(1, 2),
        ),
    )
    retry_s: float = field(
        default=300.0,
        metadata=flag("checkpoints and recovery", "how long to wait for a restarted coordinator"),
    )
    # -- output
    out: str = field(
        default="",
        metadata=flag(
            "output",
            "run folder: model.safetensors, config.json, tokenizer.json, report.json, "
            "metrics.jsonl, loss.png (default: runs/JOB)",
        ),
    )
    log_every: int = field(
        default=10,
        metadata=flag(
            "output", "when output is piped: one progress line every N steps (default %(default)s)"
        ),
    )
    sample_prompt: str = field(
        default="", metadata=flag("output", "print a sample from the trained model")
    )

    def __post_init__(self) -> None:
        check(self)  # lmps.client.train_checks: each refusal names its flag

    def consistency_mode(self) -> tuple[Consistency, int]:
        """--consistency as (mode, max_staleness): "sync" -> ("sync", 0), "ssp:S" ->
        ("bounded_staleness", S), "async" -> ("async", 0)."""
        if self.consistency in ("sync", "async"):
            if self.consistency == "async" and self.local_steps:
                raise ValueError(
                    "--consistency async applies every push alone, at once: it has no rounds "
                    "for --local-steps; use sync or ssp:S with local steps"
                )
            return cast(Consistency, self.consistency), 0
        name, _, bound = self.consistency.partition(":")
        if name != "ssp" or not bound.isdigit() or int(bound) > MAX_STALENESS:
            raise ValueError(
                f"--consistency must be sync, async or ssp:S with S in [0, {MAX_STALENESS}], "
                f"got {self.consistency!r}"
            )
        return "bounded_staleness", int(bound)


def flags() -> Iterator[tuple[str, Any, Flag]]:
    """(field name, default, `Flag`) of each `TrainOptions` field that is a flag, in order."""
    for f in dataclasses.fields(TrainOptions):
        if "flag" in f.metadata:
            yield f.name, f.default, f.metadata["flag"]


def optimizer_request(opts: TrainOptions) -> OptimizerRequest:
    """The update rule the options ask for. total_steps stays open (0): the coordinator
    sizes it from the data, the epochs and the workers at submit."""
    takes = OPTIMIZERS[opts.optimizer].takes
    return OptimizerRequest(
        kind=opts.optimizer,
        lr=opts.lr,
        # Only the chosen rule's own settings travel (AdamW refuses momentum).
        momentum=opts.momentum if "momentum" in takes else DEFAULTS["momentum"],
        nesterov=opts.nesterov,
        weight_decay=opts.weight_decay,
        schedule=opts.schedule,
        warmup_steps=opts.warmup_steps,
        min_lr=opts.min_lr,
    )


def inner_optimizer_request(opts: TrainOptions) -> OptimizerRequest | None:
    """The inner optimizer the options ask for (None without --local-steps). total_steps
    stays open (0): the coordinator makes it the outer total_steps x H."""
    if not opts.local_steps:
        return None
    return OptimizerRequest(
        kind=opts.inner_optimizer,
        lr=opts.inner_lr,
        weight_decay=opts.inner_weight_decay,
        schedule=opts.inner_schedule,
        warmup_steps=opts.inner_warmup_steps,
    )

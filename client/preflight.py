"""What `lmps train` checks on the client before it uploads anything.

Each refusal is a `Refused` (a ValueError) whose message is one line that says what is wrong
and what to do; `lmps` prints it without a traceback and exits 2. The checks are cheap and
run in this order: flags that cannot apply, the --init-from folder (an lmps run folder or a
Hugging Face `hf:DIR`: its files, not yet the weights), the output folder, the coordinator;
the corpus is checked once it is tokenized (`check_corpus`), still before the upload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lmps.core.model import PRESETS

if TYPE_CHECKING:
    import torch

    from lmps.client.train import TrainOptions
    from lmps.v1 import job_pb2

DEFAULT_PRESET = "tiny"
"""The model `lmps train` builds when neither --preset nor --init-from says."""

CHECK_TIMEOUT_S = 5.0
"""How long a single look for the coordinator may take when not asked to --wait."""


class Refused(ValueError):
    """A check before the upload failed; the message is one line for the user."""


def check(opts: TrainOptions) -> TrainOptions:
    """`opts` with the preset and vocabulary resolved, once every check before the corpus
    passed (`Refused` otherwise)."""
    opts = resolve_model_flags(opts)
    if opts.init_from:
        from lmps.client import model_io

        model_io.check_init(opts.init_from)
    check_out(opts.out)
    check_coordinator(opts.coordinator, opts.wait_s)
    return opts


def resolve_model_flags(opts: TrainOptions) -> TrainOptions:
    """--preset/--vocab-size/--block-size cannot apply with --init-from (the saved model
    fixes its shape and tokenizer): refused. Otherwise the preset defaults to `tiny` and the
    vocabulary to the preset's own."""
    if opts.init_from:
        given = [
            name
            for name, value in (
                ("--preset", opts.preset),
                ("--vocab-size", opts.vocab_size),
                ("--block-size", opts.block_size),
            )
            if value
        ]
        if given:
            raise Refused(
                f"{', '.join(given)} cannot apply with --init-from: the model in "
                f"{opts.init_from} fixes its shape and tokenizer; drop "
                f"{'it' if len(given) == 1 else 'them'}"
            )
        return opts
    name = opts.preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise Refused(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(
        opts, preset=name, vocab_size=opts.vocab_size or PRESETS[name].vocab_size
    )


PROBE_TRIES = 20


def _kind(path: Path) -> str:
    """ "dir", "missing" or "other" (a file, a socket...), from a single stat."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # (the latter: a parent is a file)
        return "missing"
    return "dir" if stat.S_ISDIR(mode) else "other"


def check_out(out: str) -> None:
    """--out must be a folder that exists or can be made, and that can be written to. The
    check writes (and removes) a probe file; folders it made for that are removed again."""
    if not out:
        return
    path = Path(out)
    # One stat per path, not exists() then is_dir(): another `lmps` may make and remove the
    # same folders meanwhile, and a folder gone between two calls is not a file.
    if _kind(path) == "other":
        raise Refused(f"--out {out} is an existing file, not a folder: choose another path")
    missing: list[Path] = []  # deepest first
    parent = path
    while _kind(parent) == "missing" and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if _kind(parent) == "other":
        raise Refused(f"--out {out}: {parent} is a file, so no folder can be made under it")
    try:
        for attempt in range(PROBE_TRIES):
            try:
                path.mkdir(parents=True, exist_ok=True)
                fd, probe = tempfile.mkstemp(dir=path, prefix=".lmps-probe-")
            except (FileNotFoundError, FileExistsError):
                # Another `lmps` probing the same new folder removed it (or a parent) while
                # we made it or probed it (each removes the folders it made): again.
                if attempt == PROBE_TRIES - 1:
                    raise
                continue
            os.close(fd)
            os.unlink(probe)
            break
    except OSError as err:
        raise Refused(f"--out {out} is not writable ({err.strerror or err})") from None
    finally:
        for made in missing:
            with contextlib.suppress(OSError):
                made.rmdir()


def check_coordinator(address: str, wait_s: float) -> None:
    """A coordinator answers health at `address`: at once (`wait_s` 0), or within `wait_s`
    seconds of waiting for one to come up."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lmps.rpc.channel import open_channel

    waiting = wait_s > 0
    with open_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(),
                timeout=wait_s if waiting else CHECK_TIMEOUT_S,
                wait_for_ready=waiting,
            )
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            if waiting:
                raise Refused(
                    f"no coordinator at {address} after waiting {wait_s:g}s; "
                    "start one with `lmps cluster up`"
                ) from None
            raise Refused(
                f"no coordinator at {address}; start one with `lmps cluster up` "
                "(or wait for one with --wait SECONDS)"
            ) from None
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise Refused(f"the coordinator at {address} is not serving (shutting down?)")


def tokens_per_batch(batch_size: int, block_size: int) -> int:
    """Tokens one batch needs: `batch_size` rows of `block_size` + 1 (inputs and targets)."""
    return batch_size * (block_size + 1)


def check_corpus(opts: TrainOptions, spec: job_pb2.JobSpec, train_tokens: torch.Tensor) -> None:
    """Enough training data for one batch of the job's shape, or `Refused`: tokens for
    --task lm; for classify and sft, whose stream is whole rows of block_size + 1 values,
    examples (the coordinator refuses fewer rows than a batch too, after the upload)."""
    from lmps.v1 import job_pb2

    block = spec.model.block_size
    if spec.task in (job_pb2.CLASSIFY, job_pb2.SFT):
        rows = int(train_tokens.numel()) // (block + 1)
        if rows < opts.batch_size:
            raise Refused(
                f"--data {opts.data} has {rows:,} training examples, too few: one batch needs "
                f"--batch-size {opts.batch_size}; give more data, a smaller --eval-fraction "
                "or a smaller --batch-size"
            )
        return
    need = tokens_per_batch(opts.batch_size, block)
    have = int(train_tokens.numel())
    if have < need:
        raise Refused(
            f"corpus {opts.data} has {have:,} training tokens, too few: one batch needs "
            f"batch_size x (block_size + 1) = {opts.batch_size} x ({block} + 1) = {need:,}; "
            "give more data or a smaller --batch-size / --block-size"
        )

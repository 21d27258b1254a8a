"""`lmps train`: prepare data, submit a job, drive it epoch by epoch, save the model."""

from __future__ import annotations

import dataclasses
import math
import shlex
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from rich.console import Console

from lmps.client import model_io, preflight, run_log
from lmps.client.progress import RunProgress
from lmps.core.data import encode_corpus, load_corpus, prepare_corpus, split_tokens
from lmps.core.model import PRESETS, perplexity, preset
from lmps.core.optim import (
    DEFAULTS,
    KINDS,
    OPTIMIZERS,
    SCHEDULE_NAMES,
    SCHEDULES,
    OptimizerKind,
    OptimizerRequest,
    ScheduleName,
    lr_at,
)
from lmps.core.settings import WIRE_DTYPES
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2

PART_TOKENS = 1 << 20  # tokens per DatasetPart message (4 MiB of int32)


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
    `lmps train --help`, with the field's default (`lmps.client.cli` builds them in order)."""

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
    # -- optimisation
    epochs: int = field(default=3, metadata=flag("optimisation"))
    batch_size: int = field(
        default=16,
        metadata=flag("optimisation", "sequences per worker per step (default %(default)s)"),
    )
    batches_per_lease: int = field(
        default=8, metadata=flag("optimisation", "batches in one data lease")
    )
    optimizer: OptimizerKind = field(default="adamw", metadata=flag("optimisation", choices=KINDS))
    lr: float = field(
        default=3e-3, metadata=flag("optimisation", "peak learning rate (default %(default)s)")
    )
    momentum: float = field(default=0.9, metadata=flag("optimisation", "SGD momentum"))
    weight_decay: float = field(
        default=0.1, metadata=flag("optimisation", "decoupled decay on weights (not biases/norms)")
    )
    schedule: ScheduleName = field(
        default="cosine", metadata=flag("optimisation", choices=SCHEDULE_NAMES)
    )
    warmup_steps: int = field(default=10, metadata=flag("optimisation"))
    min_lr: float = field(default=3e-4, metadata=flag("optimisation"))
    seed: int = field(default=1337, metadata=flag("optimisation"))
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
            "fine-tune the model saved in DIR (its config and tokenizer are used)",
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
        if self.epochs < 1:
            raise ValueError("--epochs must be >= 1")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.log_every < 1:
            raise ValueError("--log-every must be >= 1")
        if not 0 < self.eval_fraction < 1:
            raise ValueError("--eval-fraction must be in (0, 1)")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be {' or '.join(KINDS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be {' or '.join(SCHEDULE_NAMES)}")
        if self.replication not in (1, 2):
            raise ValueError("--replication must be 1 or 2")
        if self.replication == 2 and self.servers == 1:
            raise ValueError(
                "--replication 2 keeps every shard on two parameter servers: --servers 1 is "
                "too few; use --servers 0 (every registered one) or 2 or more"
            )


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
        weight_decay=opts.weight_decay,
        schedule=opts.schedule,
        warmup_steps=opts.warmup_steps,
        min_lr=opts.min_lr,
    )


def build_spec(opts: TrainOptions, vocab_size: int, tokenizer_json: str) -> job_pb2.JobSpec:
    config = preset(opts.preset or preflight.DEFAULT_PRESET, vocab_size)
    if opts.block_size or opts.dropout:
        config = dataclasses.replace(
            config, block_size=opts.block_size or config.block_size, dropout=opts.dropout
        )
    return job_pb2.JobSpec(
        name=opts.name,
        model=codec.model_to_proto(config),
        optimizer=codec.optimizer_to_proto(optimizer_request(opts)),
        batch_size=opts.batch_size,
        batches_per_lease=opts.batches_per_lease,
        seed=opts.seed,
        epochs=opts.epochs,
        num_servers=opts.servers,
        num_workers=opts.workers,
        consistency=codec.consistency_to_proto("sync"),
        shard_bytes=opts.shard_bytes,
        wire_dtype=codec.to_proto_dtype(codec.dtype_from_name(opts.wire_dtype)),
        tokenizer_json=tokenizer_json,
        checkpoint_every=opts.checkpoint_every,
        wait_for_members_s=opts.wait_members_s,
        replication=opts.replication,
    )


def submit_messages(
    spec: job_pb2.JobSpec,
    train: torch.Tensor,
    evals: torch.Tensor,
    init: dict[str, torch.Tensor] | None = None,
) -> Iterator[coordinator_pb2.SubmitJobRequest]:
    spec = job_pb2.JobSpec.FromString(spec.SerializeToString())
    spec.train_tokens, spec.eval_tokens = train.numel(), evals.numel()
    yield coordinator_pb2.SubmitJobRequest(spec=spec)
    for name, value in (init or {}).items():
        yield coordinator_pb2.SubmitJobRequest(
            init=coordinator_pb2.InitialParameter(name=name, value=codec.encode(value))
        )
    for split, tokens in (("train", train), ("eval", evals)):
        for i in range(0, tokens.numel(), PART_TOKENS):
            part = tokens[i : i + PART_TOKENS]
            yield coordinator_pb2.SubmitJobRequest(
                data=coordinator_pb2.DatasetPart(split=split, tokens=codec.encode(part))
            )


def _prepare(
    opts: TrainOptions, console: Console
) -> tuple[job_pb2.JobSpec, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Tokenized data and the job spec; with --init-from, the saved model's tokenizer,
    config and weights."""
    if opts.init_from:
        base = model_io.load(Path(opts.init_from))
        assert base.tokenizer is not None
        with console.status(f"tokenizing {opts.data} with the tokenizer of {opts.init_from}"):
            tokens = encode_corpus(base.tokenizer, load_corpus(opts.data))
            train_tokens, eval_tokens = split_tokens(tokens, opts.eval_fraction)
        spec = build_spec(opts, base.config.vocab_size, base.tokenizer.to_str())
        spec.model.CopyFrom(codec.model_to_proto(base.config))
        init = {n: p.detach() for n, p in base.model.named_parameters()}
        console.print(
            f"fine-tuning {opts.init_from} ({sum(p.numel() for p in init.values()):,} parameters)"
        )
    else:
        with console.status(f"preparing corpus {opts.data} (vocab {opts.vocab_size})"):
            corpus = prepare_corpus(
                opts.data,
                opts.vocab_size,
                opts.eval_fraction,
                Path(opts.cache_dir) if opts.cache_dir else None,
            )
        train_tokens, eval_tokens = corpus.train, corpus.eval
        spec = build_spec(opts, corpus.vocab_size, corpus.tokenizer_json)
        init = {}
    return spec, train_tokens, eval_tokens, init


@dataclass
class _Where:
    """How far `lmps train` got: the one line a Ctrl-C (or SIGTERM) prints."""

    doing: str = "while preparing the corpus"
    resume: str = ""  # the command that continues the job, once there is one
    saved: str = ""  # the run folder, once the model is in it
    reported: bool = False  # an interrupted epoch printed its own line
    recorder: run_log.RunRecorder | None = None  # closed, so metrics.jsonl keeps every line

    def line(self) -> str:
        if self.saved:
            return f"interrupted {self.doing}; the model is saved in {self.saved}"
        if self.resume:
            return f"interrupted {self.doing}; resume with: {self.resume}"
        if self.doing.startswith("while submitting"):
            return (
                f"interrupted {self.doing}; no job to resume (one the coordinator was still "
                "creating would show in `lmps status`)"
            )
        return f"interrupted {self.doing}; no job was submitted"


def resume_command(opts: TrainOptions, job_id: str) -> str:
    """The `lmps train` line that continues `job_id` as this run would have: `--resume`
    alone would run the default number of epochs and write to runs/JOB."""
    cmd = f"lmps train --resume {job_id} --epochs {opts.epochs}"
    if opts.out:
        cmd += f" --out {shlex.quote(opts.out)}"
    if opts.coordinator != TrainOptions.coordinator:
        cmd += f" --coordinator {opts.coordinator}"
    return cmd


def train(opts: TrainOptions, console: Console) -> dict[str, object]:
    """Run a whole job (or the rest of one, with --resume); returns the report (also
    written to OUT/report.json). Ctrl-C prints one line saying how far it got and how to go
    on, then raises KeyboardInterrupt (the CLI exits 130)."""
    at = _Where()
    try:
        return _train(opts, console, at)
    except KeyboardInterrupt:
        if at.recorder is not None:
            at.recorder.close()
        if not at.reported:
            _say(console, at.line())
        raise


def _say(console: Console, line: str) -> None:
    """One line straight to the console's file. A Ctrl-C that lands inside a rich print can
    leave that print's text in rich's buffer, and the next `console.print` would write it
    again before this line."""
    console.file.write(line + "\n")
    console.file.flush()


def _train(opts: TrainOptions, console: Console, at: _Where) -> dict[str, object]:
    at.doing = f"while waiting for the coordinator at {opts.coordinator}"
    if opts.resume:
        at.resume = resume_command(opts, opts.resume)
    if opts.wait_s > 0:
        try:  # say why nothing happens for a while, but only when it does not answer at once
            preflight.check_coordinator(opts.coordinator, 0)
        except preflight.Refused:
            console.print(
                f"waiting up to {opts.wait_s:g}s for the coordinator at {opts.coordinator}",
                markup=False,
                highlight=False,
            )
    opts = preflight.check(opts)  # refusals before anything is uploaded
    preflight.check_out(opts.out or str(run_log.RUNS_ROOT))  # the default run folder's parent
    started = time.perf_counter()
    report: dict[str, object] = {"options": asdict(opts), "epochs": []}
    with open_channel(opts.coordinator) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        if opts.resume:
            st = stub.GetJob(
                coordinator_pb2.GetJobRequest(job_id=opts.resume), timeout=60, wait_for_ready=True
            )
            job_id = st.job_id
            console.print(
                f"resuming job [bold]{job_id}[/] at step {st.step} after {st.epochs_done} epochs "
                f"(eval loss {st.last_eval_loss:.4f})"
            )
            first_epoch = st.epochs_done
            report.update(job_id=job_id, parameters=st.parameters, resumed_at_step=st.step)
        else:
            at.doing = "while preparing the corpus"
            spec, train_tokens, eval_tokens, init = _prepare(opts, console)
            at.doing = "while submitting the job"  # before the line: a Ctrl-C after it is here
            console.print(
                f"corpus [bold]{opts.data}[/]: {train_tokens.numel():,} train / "
                f"{eval_tokens.numel():,} eval tokens, "
                f"vocab {spec.model.vocab_size}"
            )
            preflight.check_corpus(opts, spec, train_tokens)
            with console.status(
                f"submitting job to {opts.coordinator} (waiting for servers and workers)"
            ):
                resp = stub.SubmitJob(
                    submit_messages(spec, train_tokens, eval_tokens, init),
                    timeout=600,
                    wait_for_ready=True,
                )
            st = resp.status
            job_id = resp.job_id
            at.doing, at.resume = f"before epoch 1 of {opts.epochs}", resume_command(opts, job_id)
            console.print(
                f"job [bold]{job_id}[/]: {st.parameters:,} parameters in {st.shards} shards on "
                f"{', '.join(st.servers)}; workers {', '.join(st.workers)}; "
                f"{st.train_sequences} train sequences"
            )
            first = stub.Evaluate(coordinator_pb2.EvaluateJobRequest(job_id=job_id), timeout=600)
            console.print(f"initial eval loss {first.loss:.4f} (perplexity {first.perplexity:.1f})")
            report.update(job_id=job_id, parameters=st.parameters, initial_eval_loss=first.loss)
            first_epoch = 0
        out = run_log.run_dir(opts.out, job_id)
        recorder, bar = _outputs(out, job_id, st, opts, console)
        if not opts.resume:
            recorder.metrics.eval(
                epoch=0, step=0, eval_loss=first.loss, perplexity=first.perplexity
            )
        epochs: list[dict[str, object]] = []
        at.recorder = recorder
        for epoch in range(first_epoch, opts.epochs):
            at.doing = f"before epoch {epoch + 1} of {opts.epochs}"
            try:
                summary = _run_epoch_retrying(stub, job_id, epoch, opts, console, recorder, bar)
            except KeyboardInterrupt:
                recorder.close()
                _report_interrupt(stub, job_id, bar.total, console, at.resume)
                at.reported = True
                raise
            at.doing = f"after epoch {epoch + 1} of {opts.epochs}"
            row: dict[str, object] = {
                "epoch": epoch + 1,
                "train_loss": summary.train_loss,
                "eval_loss": summary.eval_loss,
                "eval_perplexity": summary.eval_perplexity,
                "steps": summary.end_step - summary.start_step,
                "end_step": summary.end_step,
                "tokens": summary.tokens,
                "tokens_per_s": summary.tokens_per_s,
                "wall_s": summary.wall_s,
                "data_shards_completed": summary.data_shards_completed,
                "leases_released": summary.leases_released,
                "batches_redone": summary.batches_redone,
                "workers_lost": list(summary.workers_lost),
                "workers_joined": list(summary.workers_joined),
                "restores": summary.restores,
                "steps_lost": summary.steps_lost,
                "checkpoint": summary.checkpoint,
            }
            epochs.append(row)
            console.print(
                f"epoch {epoch + 1}/{opts.epochs}: train loss {summary.train_loss:.4f}  "
                f"[bold]eval loss {summary.eval_loss:.4f}[/] (ppl {summary.eval_perplexity:.1f})  "
                f"{summary.tokens_per_s:,.0f} tok/s  {summary.wall_s:.1f}s"
            )
            _print_incidents(summary, console)
            if recorder.epoch_ended(summary) is None and epoch == first_epoch:
                console.print("[yellow]no loss.png: matplotlib is not installed[/]")
        recorder.close()
        report["epochs"] = epochs
        at.doing = "while saving the model"
        with console.status("exporting the model"):
            trained = model_io.fetch_model(opts.coordinator, job_id)
            model_io.save(trained, out)
        at.doing, at.saved = "while sampling", str(out)
        console.print(f"saved model to [bold]{out}[/] (version {trained.version})")
        if opts.sample_prompt:
            text = model_io.sample(trained, opts.sample_prompt, max_tokens=80)
            report["sample"] = text
            console.rule("sample")
            console.print(text, markup=False, highlight=False)
            console.rule()
    report["wall_s"] = time.perf_counter() - started
    run_log.write_json(out / run_log.REPORT, report)
    console.print(
        f"run folder [bold]{out}[/]: metrics, plot and report; `lmps report {out}`",
        soft_wrap=True,
    )
    return report


def _outputs(
    out: Path, job_id: str, st: coordinator_pb2.JobStatus, opts: TrainOptions, console: Console
) -> tuple[run_log.RunRecorder, RunProgress]:
    """The run folder's writer and the progress display, over the job's resolved schedule."""
    try:
        settings = codec.optimizer_from_proto(st.spec.optimizer)
    except ValueError:  # a coordinator that does not send the resolved spec: no lr, no total
        settings = None
    bar = RunProgress(
        console,
        total_steps=settings.total_steps if settings else 0,
        start_step=int(st.step),
        epochs=opts.epochs,
        log_every=opts.log_every,
    )
    recorder = run_log.RunRecorder(
        out,
        lr=lambda step: lr_at(settings, step) if settings else None,
        on_step=bar.update,
    )
    recorder.metrics.job(job_id, epochs=opts.epochs, total_steps=bar.total, start_step=int(st.step))
    return recorder, bar


def _print_incidents(summary: job_pb2.EpochSummary, console: Console) -> None:
    if summary.workers_lost or summary.workers_joined or summary.restores:
        console.print(
            f"  [yellow]incidents[/]: lost {list(summary.workers_lost)}, "
            f"joined {list(summary.workers_joined)}, "
            f"{summary.leases_released} leases re-leased, {summary.batches_redone} batches redone, "
            f"{summary.restores} rollbacks ({summary.steps_lost} steps lost)"
        )


STOP_WAIT_S = 120.0  # how long an interrupted client waits for the coordinator to stop


def _report_interrupt(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub,
    job_id: str,
    total: int,
    console: Console,
    resume: str,
) -> None:
    """After Ctrl-C (the epoch's stream cancelled): wait until the coordinator has stopped
    the job at a step boundary, then say where and how to go on. A second Ctrl-C gives up
    waiting (the coordinator stops the job all the same)."""
    step: int | None = None
    deadline = time.monotonic() + STOP_WAIT_S
    try:
        while time.monotonic() < deadline:
            st = stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), timeout=10)
            if st.state != coordinator_pb2.RUNNING:
                step = int(st.step)
                break
            time.sleep(0.2)
    except (grpc.RpcError, KeyboardInterrupt):
        pass
    where = f"at step {step} of {total}" if step is not None else "(the job is still stopping)"
    _say(console, f"interrupted {where}; resume with: {resume}")


def _run_epoch_retrying(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub,
    job_id: str,
    epoch: int,
    opts: TrainOptions,
    console: Console,
    recorder: run_log.RunRecorder,
    bar: RunProgress,
) -> job_pb2.EpochSummary:
    """Run an epoch; if the coordinator goes away (restart), wait for it and carry on."""
    deadline = time.monotonic() + opts.retry_s
    while True:
        try:
            return _run_epoch(stub, job_id, epoch, console, recorder, bar)
        except grpc.RpcError as err:
            if (
                err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
                or time.monotonic() > deadline
            ):
                raise
            console.print(
                f"[yellow]coordinator unavailable ({err.details()}); retrying epoch {epoch + 1}[/]"
            )
        time.sleep(2.0)
        try:
            st = stub.GetJob(
                coordinator_pb2.GetJobRequest(job_id=job_id), timeout=60, wait_for_ready=True
            )
        except grpc.RpcError:
            continue
        if st.epochs_done > epoch:  # it finished while we were away: report what we know
            return job_pb2.EpochSummary(
                epoch=epoch,
                end_step=st.step,
                eval_loss=st.last_eval_loss,
                eval_perplexity=perplexity(st.last_eval_loss),
                train_loss=math.nan,
            )


def _run_epoch(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub,
    job_id: str,
    epoch: int,
    console: Console,
    recorder: run_log.RunRecorder,
    bar: RunProgress,
) -> job_pb2.EpochSummary:
    stream = stub.RunEpoch(
        coordinator_pb2.RunEpochRequest(job_id=job_id, epoch=epoch), wait_for_ready=True
    )
    summary: job_pb2.EpochSummary | None = None
    try:
        with bar.live(epoch):
            # grpc waits for the next event in short naps, so Ctrl-C (and SIGTERM, turned
            # into KeyboardInterrupt by the CLI) gets through between them.
            for ev in stream:
                kind = ev.WhichOneof("kind")
                if kind == "start":
                    recorder.epoch_started(epoch, len(ev.start.workers))
                elif kind == "step":
                    recorder.step(ev.step)  # a whole global step goes to metrics.jsonl, the bar
                elif kind == "summary":
                    summary = ev.summary
                    recorder.steps_done()
    except KeyboardInterrupt:
        # The coordinator sees the stream go and stops the job at a step boundary.
        stream.cancel()
        raise
    if summary is None:
        raise RuntimeError(f"epoch {epoch + 1} ended without a summary")
    if math.isnan(summary.eval_loss):
        console.print("[yellow]no eval data: eval loss is NaN[/]")
    return summary

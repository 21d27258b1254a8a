"""`lmps train`: prepare data, submit a job, drive it epoch by epoch, save the model."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch
from rich.console import Console
from rich.markup import escape

from lmps.client import finetune, model_io, preflight, run_log
from lmps.client.epoch_run import job_status, run_epoch_retrying
from lmps.client.progress import RunProgress
from lmps.client.train_options import TrainOptions, inner_optimizer_request, optimizer_request
from lmps.client.train_stop import Where, report_interrupt, resume_command, say
from lmps.core.compress import compression_from_name
from lmps.core.data import encode_corpus, load_corpus, prepare_corpus, split_tokens
from lmps.core.model import GPTConfig, preset
from lmps.core.optim import lr_at
from lmps.core.tasks import TaskName
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2, tensor_pb2

__all__ = ["TrainOptions", "build_spec", "submit_messages", "train"]

PART_TOKENS = 1 << 20  # tokens per DatasetPart message (4 MiB of int32)
CLASSIFY_FIELDS = ("eval_accuracy", "eval_macro_f1", "majority_baseline", "eval_confusion")
"""A classify run's report.json also has these at the top: the last epoch's."""


def build_spec(
    opts: TrainOptions,
    vocab_size: int,
    tokenizer_json: str,
    labels: Sequence[str] = (),
    config: GPTConfig | None = None,
) -> job_pb2.JobSpec:
    """The job --task and the other flags ask for: the model `config` (default: --preset's,
    with --block-size and --dropout), with the task's head (`labels`: a classifier's classes)."""
    config = config or _preset_config(opts, vocab_size)
    config = finetune.task_config(config, opts, labels)
    inner = inner_optimizer_request(opts)
    local_steps = (
        None
        if inner is None
        else job_pb2.LocalSteps(
            steps=opts.local_steps,
            inner_optimizer=codec.optimizer_to_proto(inner),
            fragments=opts.fragments,
            overlap=opts.overlap,
        )
    )
    mode, staleness = opts.consistency_mode()
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
        consistency=codec.consistency_to_proto(mode),
        max_staleness=staleness,
        shard_bytes=opts.shard_bytes,
        wire_dtype=codec.to_proto_dtype(codec.dtype_from_name(opts.wire_dtype)),
        tokenizer_json=tokenizer_json,
        checkpoint_every=opts.checkpoint_every,
        wait_for_members_s=opts.wait_members_s,
        replication=opts.replication,
        local_steps=local_steps,
        push_compression=codec.compression_to_proto(compression_from_name(opts.push_compression)),
        task=codec.task_to_proto(cast(TaskName, opts.task)),
        labels=list(labels),
        freeze_backbone=opts.freeze_backbone,
        micro_batches=opts.micro_batches,
        autocast=tensor_pb2.BFLOAT16 if opts.autocast == "bf16" else tensor_pb2.DTYPE_UNSPECIFIED,
        max_grad_norm=opts.max_grad_norm,
    )


def _preset_config(opts: TrainOptions, vocab_size: int) -> GPTConfig:
    config = preset(opts.preset or preflight.DEFAULT_PRESET, vocab_size)
    if opts.block_size or opts.dropout:
        config = dataclasses.replace(
            config, block_size=opts.block_size or config.block_size, dropout=opts.dropout
        )
    return config


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


@dataclass(frozen=True, eq=False)
class Upload:
    """What a new job sends (eq=False: tensors have no single truth value)."""

    spec: job_pb2.JobSpec
    train: torch.Tensor
    """The train split's int32 stream: tokens (lm) or the task's rows, flattened."""
    eval: torch.Tensor
    init: dict[str, torch.Tensor]
    """--init-from: every parameter's initial value; empty: the coordinator draws them."""
    rows: finetune.TaskData | None = None
    """classify / sft: what was built from --data."""


def _prepare(opts: TrainOptions, console: Console) -> Upload:
    """Tokenized data and the job spec; with --init-from, the saved model's tokenizer,
    config and weights."""
    base = model_io.load_init(opts.init_from) if opts.init_from else None
    if opts.task != "lm":
        return _prepare_task(opts, base, console)
    if base is not None:
        assert base.tokenizer is not None
        with console.status(f"tokenizing {opts.data} with the tokenizer of {opts.init_from}"):
            tokens = encode_corpus(base.tokenizer, load_corpus(opts.data))
            train_tokens, eval_tokens = split_tokens(tokens, opts.eval_fraction)
        spec = build_spec(opts, base.config.vocab_size, base.tokenizer.to_str(), config=base.config)
        init, _ = finetune.initial_weights(base, codec.model_from_proto(spec.model), (), opts.seed)
        console.print(
            f"fine-tuning {opts.init_from} ({sum(p.numel() for p in init.values()):,} parameters)"
        )
        return Upload(spec, train_tokens, eval_tokens, init)
    with console.status(f"preparing corpus {opts.data} (vocab {opts.vocab_size})"):
        corpus = prepare_corpus(
            opts.data,
            opts.vocab_size,
            opts.eval_fraction,
            Path(opts.cache_dir) if opts.cache_dir else None,
        )
    spec = build_spec(opts, corpus.vocab_size, corpus.tokenizer_json)
    return Upload(spec, corpus.train, corpus.eval, {})


def _prepare_task(
    opts: TrainOptions, base: model_io.TrainedModel | None, console: Console
) -> Upload:
    """--task classify / sft: the rows of --data (`finetune.prepare`), tokenized with the
    base model's tokenizer, or a new one trained on the train split."""
    config = base.config if base is not None else _preset_config(opts, opts.vocab_size)
    doing = (
        f"tokenizing {opts.data} with the tokenizer of {opts.init_from}"
        if base is not None
        else f"preparing {opts.task} data {opts.data} (training a vocab {opts.vocab_size} BPE)"
    )
    with console.status(doing):
        data = finetune.prepare(
            opts, config.block_size, base.tokenizer if base else None, opts.vocab_size
        )
    if base is None:
        spec = build_spec(
            opts, data.tokenizer.get_vocab_size(), data.tokenizer.to_str(), data.labels
        )
        return Upload(spec, data.train, data.eval, {}, data)
    spec = build_spec(opts, config.vocab_size, data.tokenizer.to_str(), data.labels, config)
    init, head = finetune.initial_weights(
        base, codec.model_from_proto(spec.model), data.labels, opts.seed
    )
    console.print(
        f"fine-tuning {opts.init_from} ({sum(p.numel() for p in init.values()):,} parameters"
        + (f"; {head})" if head else ")"),
        markup=False,
        highlight=False,
    )
    return Upload(spec, data.train, data.eval, init, data)


def train(opts: TrainOptions, console: Console) -> dict[str, object]:
    """Run a whole job (or the rest of one, with --resume); returns the report (also
    written to OUT/report.json). Ctrl-C prints one line saying how far it got and how to go
    on, then raises KeyboardInterrupt (the CLI exits 130)."""
    at = Where()
    try:
        return _train(opts, console, at)
    except KeyboardInterrupt:
        if at.recorder is not None:
            at.recorder.close()
        if not at.reported:
            say(console, at.line())
        raise


def _train(opts: TrainOptions, console: Console, at: Where) -> dict[str, object]:
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
            st = job_status(stub, opts.resume)
            job_id = st.job_id
            console.print(
                f"resuming job [bold]{job_id}[/] at step {st.step} after {st.epochs_done} epochs "
                f"(eval loss {st.last_eval_loss:.4f})"
            )
            first_epoch = st.epochs_done
            report.update(job_id=job_id, parameters=st.parameters, resumed_at_step=st.step)
            results = _results(st.spec)
        else:
            at.doing = "while preparing the corpus"
            upload = _prepare(opts, console)
            at.doing = "while submitting the job"  # before the line: a Ctrl-C after it is here
            _print_data(opts, upload, console)
            preflight.check_corpus(opts, upload.spec, upload.train)
            results = _results(upload.spec)
            with console.status(
                f"submitting job to {opts.coordinator} (waiting for servers and workers)"
            ):
                resp = stub.SubmitJob(
                    submit_messages(upload.spec, upload.train, upload.eval, upload.init),
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
            console.print(
                "initial "
                + results.eval_text(
                    first.loss, first.perplexity, first.accuracy, first.macro_f1, first.confusion
                ),
                markup=False,
                highlight=False,
            )
            report.update(job_id=job_id, parameters=st.parameters, initial_eval_loss=first.loss)
            if first.confusion:
                report["initial_eval_accuracy"] = first.accuracy
            first_epoch = 0
        report["task"] = results.task
        if results.labels:
            report["labels"] = list(results.labels)
        out = run_log.run_dir(opts.out, job_id)
        recorder, bar = _outputs(out, job_id, st, opts, console)
        if not opts.resume:
            classify = bool(first.confusion)
            recorder.metrics.eval(
                epoch=0,
                step=0,
                eval_loss=first.loss,
                perplexity=first.perplexity,
                accuracy=first.accuracy if classify else None,
                macro_f1=first.macro_f1 if classify else None,
            )
        epochs: list[dict[str, object]] = []
        at.recorder = recorder
        for epoch in range(first_epoch, opts.epochs):
            at.doing = f"before epoch {epoch + 1} of {opts.epochs}"
            try:
                summary = run_epoch_retrying(stub, job_id, epoch, opts, console, recorder, bar)
            except KeyboardInterrupt:
                recorder.close()
                report_interrupt(stub, job_id, bar.total, console, at.resume)
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
            metrics = (summary.eval_accuracy, summary.eval_macro_f1, summary.eval_confusion)
            row.update(results.fields(*metrics))
            epochs.append(row)
            evaluated = results.eval_text(summary.eval_loss, summary.eval_perplexity, *metrics)
            console.print(
                f"epoch {epoch + 1}/{opts.epochs}: train loss {summary.train_loss:.4f}  "
                f"[bold]{escape(evaluated)}[/]  "
                f"{summary.tokens_per_s:,.0f} tok/s  {summary.wall_s:.1f}s"
            )
            _print_incidents(summary, console)
            if recorder.epoch_ended(summary) is None and epoch == first_epoch:
                console.print("[yellow]no loss.png: matplotlib is not installed[/]")
        recorder.close()
        report["epochs"] = epochs
        if epochs and "eval_confusion" in epochs[-1]:
            # The last epoch's classification metrics at the top, as the initial ones were.
            report.update({k: v for k, v in epochs[-1].items() if k in CLASSIFY_FIELDS})
            console.print(finetune.confusion_table(summary.eval_confusion, results.labels))
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


def _results(spec: job_pb2.JobSpec) -> finetune.Results:
    """How the job's evals read: by its task, a classifier with its class names."""
    return finetune.Results(codec.task_from_proto(spec.task), tuple(spec.labels))


def _print_data(opts: TrainOptions, upload: Upload, console: Console) -> None:
    """What was built from --data: a corpus's tokens, or a task's examples."""
    if upload.rows is None:
        console.print(
            f"corpus [bold]{escape(opts.data)}[/]: {upload.train.numel():,} train / "
            f"{upload.eval.numel():,} eval tokens, vocab {upload.spec.model.vocab_size}"
        )
        return
    vocab = upload.spec.model.vocab_size
    console.print(f"{upload.rows.summary}; vocab {vocab}", markup=False, highlight=False)
    baseline = upload.rows.baseline
    if upload.rows.labels and baseline is not None:
        counts = upload.rows.eval_counts
        top = upload.rows.labels[counts.index(max(counts))]
        console.print(
            f"majority-class baseline on the eval split: {100 * baseline:.1f}% (always {top})",
            markup=False,
            highlight=False,
        )


def _outputs(
    out: Path, job_id: str, st: coordinator_pb2.JobStatus, opts: TrainOptions, console: Console
) -> tuple[run_log.RunRecorder, RunProgress]:
    """The run folder's writer and the progress display, over the job's resolved schedule."""
    try:
        settings = codec.optimizer_from_proto(st.spec.optimizer)
    except ValueError:  # a coordinator that does not send the resolved spec: no lr, no total
        settings = None
    # Streaming fragments: a step event's step is a version, F of them an outer step (the lr
    # of version v is the outer schedule's at v / F), so the run lasts F x total_steps.
    f = max(1, int(st.spec.local_steps.fragments))
    bar = RunProgress(
        console,
        total_steps=settings.total_steps * f if settings else 0,
        start_step=int(st.step),
        epochs=opts.epochs,
        log_every=opts.log_every,
    )
    recorder = run_log.RunRecorder(
        out,
        lr=lambda step: lr_at(settings, step // f) if settings else None,
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

"""`lmps train` / `lmps demo` flags come from `TrainOptions`, and the client builds its
optimizer config through the one codec mapper, leaving total_steps for the coordinator."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from lmps.client import cli
from lmps.client.train import build_spec
from lmps.client.train_checks import INNER_FLAGS
from lmps.client.train_options import (
    WIRE_DTYPE_NAMES,
    TrainOptions,
    flags,
    inner_optimizer_request,
    optimizer_request,
)
from lmps.core.model import POOLINGS, PRESETS
from lmps.core.optim import KINDS, SCHEDULE_NAMES, OptimizerRequest
from lmps.core.tasks import TASK_NAMES
from lmps.rpc import codec
from lmps.v1 import job_pb2, tensor_pb2


def parse(*argv: str) -> TrainOptions:
    args = cli.build_parser().parse_args(list(argv))
    overrides = {"coordinator": TrainOptions.coordinator} if argv[0] == "demo" else {}
    return cli._train_options(args, **overrides)


def test_every_flag_defaults_to_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMPS_COORDINATOR", raising=False)
    monkeypatch.delenv("LMPS_WAIT_MEMBERS_S", raising=False)
    assert parse("train") == TrainOptions()
    assert parse("demo") == TrainOptions(epochs=15, lr=6e-3)


def test_flags_keep_their_names_and_take_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMPS_WAIT_MEMBERS_S", "5")
    assert parse("train").wait_members_s == 5.0
    opts = parse(
        "train",
        "--optimizer=sgd",
        "--schedule=constant",
        "--wire-dtype=bfloat16",
        "--wait-members=7",
        "--batch-size=4",
        "--resume=job-1",
        "--init-from=runs/x",
    )
    assert (opts.optimizer, opts.schedule, opts.wire_dtype) == ("sgd", "constant", "bfloat16")
    assert (opts.wait_members_s, opts.batch_size) == (7.0, 4)
    assert (opts.resume, opts.init_from) == ("job-1", "runs/x")
    with pytest.raises(SystemExit):
        parse("train", "--optimizer=adam")


def test_choices_and_names_come_from_the_registries() -> None:
    how = {name: flag for name, _, flag in flags()}
    assert how["optimizer"].choices == KINDS == how["inner_optimizer"].choices
    assert how["inner_schedule"].choices == SCHEDULE_NAMES
    assert how["schedule"].choices == SCHEDULE_NAMES
    assert how["wire_dtype"].choices == WIRE_DTYPE_NAMES == ("float32", "bfloat16", "float16")
    assert all(name in (how["preset"].help or "") for name in PRESETS)
    # Every field is a flag but the two `lmps train`/`demo` set themselves.
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    assert fields - set(how) == {"coordinator", "name"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "adam"}, "--optimizer must be sgd or adamw"),
        ({"schedule": "linear"}, "--schedule must be constant or cosine"),
        ({"epochs": 0}, "--epochs must be >= 1"),
    ],
)
def test_options_reject_invalid_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainOptions(**kwargs)  # type: ignore[arg-type]


def test_spec_optimizer_goes_through_the_codec_with_the_horizon_open() -> None:
    adamw = TrainOptions()
    spec = build_spec(adamw, vocab_size=64, tokenizer_json="")
    request = codec.optimizer_request_from_proto(spec.optimizer)
    assert request == optimizer_request(adamw)
    assert request == OptimizerRequest(
        kind="adamw", lr=3e-3, weight_decay=0.1, schedule="cosine", warmup_steps=10, min_lr=3e-4
    )
    assert spec.optimizer.total_steps == 0  # the coordinator sizes it at submit
    # ... as it does here: the resolved settings are a job that can run.
    settings = codec.job_settings_from_proto(spec, total_steps=30)
    assert settings.optimizer == request.resolve(30)
    # Momentum travels for SGD only (AdamW refuses it).
    sgd = build_spec(TrainOptions(optimizer="sgd"), vocab_size=64, tokenizer_json="")
    assert codec.optimizer_request_from_proto(sgd.optimizer).momentum == 0.9


def test_local_steps_flags_build_the_inner_optimizer_into_the_spec() -> None:
    opts = parse(
        "train",
        "--local-steps=4",
        "--optimizer=sgd",
        "--lr=0.7",
        "--inner-lr=4e-4",
        "--inner-warmup-steps=20",
        "--inner-schedule=cosine",
    )
    spec = build_spec(opts, vocab_size=64, tokenizer_json="")
    assert spec.HasField("local_steps") and spec.local_steps.steps == 4
    inner = codec.optimizer_request_from_proto(spec.local_steps.inner_optimizer)
    assert inner == inner_optimizer_request(opts)
    assert inner == OptimizerRequest(
        kind="adamw", lr=4e-4, weight_decay=0.1, schedule="cosine", warmup_steps=20
    )
    assert spec.local_steps.inner_optimizer.total_steps == 0  # outer x H, at submit
    assert spec.batches_per_lease == 0  # H, resolved by the coordinator
    settings = codec.job_settings_from_proto(spec, total_steps=30)
    assert settings.local_steps is not None and settings.local_steps.inner.total_steps == 120
    assert settings.batches_per_lease == 4
    # Off by default: no local_steps on the wire.
    plain = build_spec(TrainOptions(), vocab_size=64, tokenizer_json="")
    assert not plain.HasField("local_steps") and inner_optimizer_request(TrainOptions()) is None


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--inner-lr=0.01"], "^--inner-lr only applies with local steps: add --local-steps H$"),
        (
            ["--inner-optimizer=sgd", "--inner-schedule=cosine"],
            "^--inner-optimizer, --inner-schedule only apply with local steps",
        ),
        (["--local-steps=3", "--batches-per-lease=8"], "--batches-per-lease 8 must be a multiple"),
        (["--local-steps=-1"], r"--local-steps must be in \[0, 10000\]"),
        (["--local-steps=2", "--inner-lr=0"], r"inner optimizer \(--inner-\*\): lr must be > 0"),
    ],
)
def test_local_steps_flags_are_checked(argv: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse("train", *argv)


def test_fragments_flag_reaches_the_spec() -> None:
    opts = parse("train", "--local-steps=4", "--fragments=2", "--consistency=ssp:0")
    spec = build_spec(opts, vocab_size=64, tokenizer_json="")
    assert (spec.local_steps.steps, spec.local_steps.fragments) == (4, 2)
    settings = codec.job_settings_from_proto(spec, total_steps=30)
    assert settings.local_steps is not None and settings.local_steps.window == 2
    assert settings.batches_per_lease == 8  # F x H
    off = build_spec(parse("train", "--local-steps=4"), vocab_size=64, tokenizer_json="")
    assert off.local_steps.fragments == 1
    assert not off.local_steps.overlap and not settings.local_steps.overlap
    on = build_spec(
        parse("train", "--local-steps=4", "--fragments=2", "--overlap"),
        vocab_size=64,
        tokenizer_json="",
    )
    assert on.local_steps.overlap
    resolved = codec.job_settings_from_proto(on, total_steps=30).local_steps
    assert resolved is not None and resolved.overlap
    assert codec.local_steps_to_proto(resolved).overlap


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--fragments=3"], "^--fragments only applies with local steps: add --local-steps H$"),
        (["--overlap"], "^--overlap only applies with local steps: add --local-steps H$"),
        (
            ["--local-steps=4", "--overlap"],
            "^--overlap overlaps a fragment's sync with the next window: add --fragments F$",
        ),
        (
            ["--fragments=2", "--inner-lr=0.01"],
            "^--fragments, --inner-lr only apply with local steps",
        ),
        (
            ["--local-steps=4", "--fragments=3"],
            r"^--fragments 3 must divide --local-steps 4 \(a window is H / F whole inner steps\)$",
        ),
        (["--local-steps=2", "--fragments=4"], "^--fragments 4 must divide --local-steps 2"),
        (["--local-steps=4", "--fragments=0"], r"^--fragments must be >= 1 \(1 = off\)$"),
        (
            ["--local-steps=4", "--fragments=2", "--consistency=ssp:2"],
            "^--fragments 2 syncs one fragment per version in turn, which needs --consistency "
            "sync, not ssp:2",
        ),
        (
            ["--local-steps=4", "--fragments=2", "--batches-per-lease=6"],
            r"--batches-per-lease 6 must be a multiple of --local-steps 4 \(or 0: 8, 2 rounds",
        ),
    ],
)
def test_fragments_flag_is_checked(argv: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse("train", *argv)


def test_every_inner_flag_needs_local_steps() -> None:
    for name in INNER_FLAGS:
        default = getattr(TrainOptions(), name)
        other = {str: "sgd" if "optimizer" in name else "cosine", float: 0.5, int: 3}
        given: dict[str, Any] = {name: other[type(default)]}  # not the default
        flag_name = "--" + name.replace("_", "-")
        with pytest.raises(ValueError, match=f"^{flag_name} only applies"):
            TrainOptions(**given)
        TrainOptions(local_steps=1, **given)  # fine with local steps


def test_task_flags_take_values_and_reach_the_spec() -> None:
    opts = parse(
        "train",
        "--task=classify",
        "--data=labelled.jsonl",
        "--pooling=mean",
        "--freeze-backbone",
        "--batch-size=8",
        "--micro-batches=4",
        "--autocast=bf16",
    )
    assert (opts.task, opts.pooling, opts.freeze_backbone) == ("classify", "mean", True)
    assert (opts.micro_batches, opts.autocast) == (4, "bf16")
    spec = build_spec(opts, vocab_size=64, tokenizer_json="", labels=("neg", "pos"))
    assert spec.task == job_pb2.CLASSIFY and list(spec.labels) == ["neg", "pos"]
    assert (spec.model.num_labels, spec.model.pooling) == (2, job_pb2.MEAN)
    assert spec.freeze_backbone and spec.micro_batches == 4 and spec.autocast == tensor_pb2.BFLOAT16
    settings = codec.job_settings_from_proto(spec, total_steps=10)  # a job that can run
    assert (settings.task, settings.labels, settings.model.num_labels) == (
        "classify",
        ("neg", "pos"),
        2,
    )
    assert (settings.micro_batches, settings.autocast) == (4, torch.bfloat16)
    # The defaults: a language model, no head, fp32, one micro-batch.
    plain = build_spec(TrainOptions(), vocab_size=64, tokenizer_json="")
    assert plain.task == job_pb2.LM and plain.model.num_labels == 0 and not plain.labels
    assert (plain.micro_batches, plain.autocast) == (1, tensor_pb2.DTYPE_UNSPECIFIED)
    sft = build_spec(parse("train", "--task=sft", "--data=chats.jsonl"), 64, "")
    assert sft.task == job_pb2.SFT and sft.model.num_labels == 0


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (
            ["--pooling=mean"],
            r"^--pooling only applies with --task classify \(this is --task lm\)$",
        ),
        (
            ["--task=sft", "--data=c.jsonl", "--pooling=last", "--freeze-backbone"],
            "^--pooling, --freeze-backbone only apply with --task classify",
        ),
        (["--batch-size=4", "--micro-batches=3"], "^--micro-batches 3 must divide --batch-size 4"),
        (["--micro-batches=0"], "^--micro-batches must be >= 1$"),
        (["--task=classify"], "^--task classify needs its own --data, a .* builtin:pydoc-topics"),
        (["--task=sft"], '^--task sft needs its own --data, a {"messages"'),
        (
            ["--task=classify", "--data=x.jsonl", "--sample-prompt=hi"],
            "^--sample-prompt samples text; a classifier answers",
        ),
    ],
)
def test_task_flags_are_checked(argv: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse("train", *argv)


def test_task_choices_are_the_registries() -> None:
    how = {name: flag for name, _, flag in flags()}
    assert how["task"].choices == TASK_NAMES == ("lm", "classify", "sft")
    assert how["pooling"].choices == POOLINGS
    assert how["autocast"].choices == ("off", "bf16")
    with pytest.raises(SystemExit):
        parse("train", "--task=regress")
    with pytest.raises(SystemExit):
        parse("train", "--autocast=fp16")

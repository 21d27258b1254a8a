"""JobSettings: built once from a JobSpec with every default resolved, validated, round-trips."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from lmps.core.model import preset
from lmps.core.partition import DEFAULT_SHARD_BYTES
from lmps.core.settings import (
    CONSISTENCIES,
    DEFAULT_BATCHES_PER_LEASE,
    DEFAULT_KEEP_CHECKPOINTS,
    DEFAULT_WAIT_FOR_MEMBERS_S,
    MAX_LOCAL_STEPS,
    JobSettings,
    LocalSteps,
    default_total_steps,
)
from lmps.rpc import codec
from lmps.v1 import job_pb2, tensor_pb2


def _spec(**fields: object) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(
        name="t",
        model=codec.model_to_proto(preset("tiny", 64)),
        optimizer=job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=1e-3, schedule=job_pb2.COSINE),
        batch_size=4,
        seed=7,
        epochs=2,
    )
    for name, value in fields.items():
        if isinstance(value, job_pb2.LocalSteps):  # a message field is copied into, not set
            spec.local_steps.CopyFrom(value)
        else:
            setattr(spec, name, value)
    return spec


def test_wire_zeros_become_the_documented_defaults() -> None:
    s = codec.job_settings_from_proto(_spec(), total_steps=12)
    assert s.batches_per_lease == DEFAULT_BATCHES_PER_LEASE
    assert s.shard_bytes == DEFAULT_SHARD_BYTES
    assert s.keep_checkpoints == DEFAULT_KEEP_CHECKPOINTS
    assert s.wait_for_members_s == DEFAULT_WAIT_FOR_MEMBERS_S
    assert s.replication == 1
    assert s.consistency == "sync"
    assert s.wire_dtype == torch.float32
    assert s.optimizer.total_steps == 12  # open in the spec: the caller's value
    assert (s.optimizer.beta1, s.optimizer.beta2, s.optimizer.eps) == (0.9, 0.95, 1e-8)


def test_explicit_values_win_over_defaults() -> None:
    spec = _spec(batches_per_lease=3, shard_bytes=4096, keep_checkpoints=1, replication=2)
    spec.wait_for_members_s = 5.0
    spec.wire_dtype = tensor_pb2.BFLOAT16
    spec.optimizer.total_steps = 40
    s = codec.job_settings_from_proto(spec, total_steps=12)
    assert (s.batches_per_lease, s.shard_bytes, s.keep_checkpoints, s.replication) == (
        3,
        4096,
        1,
        2,
    )
    assert s.wait_for_members_s == 5.0 and s.wire_dtype == torch.bfloat16
    assert s.optimizer.total_steps == 40


def test_round_trip_through_the_wire_is_exact() -> None:
    s = codec.job_settings_from_proto(_spec(checkpoint_every=4), total_steps=9)
    again = codec.job_settings_from_proto(codec.job_settings_to_proto(s), total_steps=999)
    assert again == s
    assert s.for_workers().tokenizer_json == "" and s.for_workers().model == s.model


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_size": 0}, "batch_size must be > 0"),
        ({"replication": 3}, "replication must be 1 or 2"),
        ({"wait_for_members_s": math.nan}, "wait_for_members_s must be in"),
        ({"wait_for_members_s": -1.0}, "wait_for_members_s must be in"),
        ({"wire_dtype": tensor_pb2.INT32}, "wire_dtype must be a float type"),
        ({"wire_dtype": 77}, "unsupported wire dtype"),
        ({"consistency": 42}, "unknown consistency 42"),
        ({"max_staleness": 3}, "max_staleness is for bounded-staleness modes"),
        ({"shard_bytes": 3}, "shard_bytes must be >= 4"),
    ],
)
def test_bad_specs_name_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        codec.job_settings_from_proto(_spec(**fields), total_steps=10)


def test_bad_optimizer_is_reported_as_optimizer() -> None:
    spec = _spec()
    spec.optimizer.lr = 0.0
    with pytest.raises(ValueError, match=r"^optimizer: lr must be > 0"):
        codec.job_settings_from_proto(spec, total_steps=10)


def test_settings_refuse_an_unresolved_step_count() -> None:
    s = codec.job_settings_from_proto(_spec(), total_steps=10)
    open_steps = dataclasses.replace(s.optimizer, schedule="constant", total_steps=0)
    with pytest.raises(ValueError, match="total_steps must be resolved"):
        dataclasses.replace(s, optimizer=open_steps)


def test_every_mode_maps_to_its_proto_enum_by_name() -> None:
    for mode in CONSISTENCIES:
        assert codec.consistency_from_proto(codec.consistency_to_proto(mode)) == mode  # type: ignore[arg-type]
    assert codec.consistency_from_proto(job_pb2.CONSISTENCY_UNSPECIFIED) == "sync"


def test_default_total_steps_spreads_batches_over_workers() -> None:
    # 10 sequences of batch 2 = 5 batches; 2 workers -> 3 steps an epoch; 2 epochs.
    assert default_total_steps(2, 10, 2, 2) == 6
    assert default_total_steps(0, 1, 4, 1) == 1  # never zero
    # 11 batches in shards of 4 (4, 4, 3) over 2 workers: worker 0 owns shards 0 and 2 and
    # trains 7 batches while worker 1 is done after 4: the epoch is 7 steps, not ceil(11/2).
    assert default_total_steps(1, 22, 2, 2, batches_per_lease=4) == 7
    assert default_total_steps(3, 22, 2, 2, batches_per_lease=4) == 21
    assert default_total_steps(1, 22, 2, 3, batches_per_lease=4) == 4  # one shard each
    settings = JobSettings  # the type the coordinator keeps
    assert settings.__dataclass_params__.frozen  # type: ignore[attr-defined]


# -- local steps (DiLoCo) ------------------------------------------------------------------


def _diloco(steps: int = 4, **inner: object) -> job_pb2.LocalSteps:
    """DiLoCo's pair: inner AdamW on the workers (cosine over inner steps)."""
    config = job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=1e-3, schedule=job_pb2.COSINE)
    for name, value in inner.items():
        setattr(config, name, value)
    return job_pb2.LocalSteps(steps=steps, inner_optimizer=config)


def _outer() -> job_pb2.OptimizerConfig:
    """DiLoCo's outer optimizer on the servers: SGD, Nesterov momentum 0.9, lr 0.7."""
    return job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.7, momentum=0.9, nesterov=True)


def test_local_steps_resolve_lease_size_and_inner_horizon_from_h() -> None:
    spec = _spec(local_steps=_diloco(steps=4))
    spec.optimizer.CopyFrom(_outer())
    s = codec.job_settings_from_proto(spec, total_steps=12)
    assert s.local_steps is not None
    assert s.local_steps.steps == 4
    assert s.batches_per_lease == 4  # 0 = H with local steps: one round a lease
    assert s.optimizer.total_steps == 12  # outer: rounds
    assert s.local_steps.inner.total_steps == 12 * 4  # inner: outer x H
    assert s.local_steps.inner.kind == "adamw" and s.local_steps.inner.schedule == "cosine"
    assert (s.local_steps.inner.beta1, s.local_steps.inner.beta2) == (0.9, 0.95)  # 0 = default
    assert s.optimizer.nesterov and s.optimizer.momentum == 0.9
    # Without local steps nothing changes: 8 batches a lease, no inner optimizer.
    plain = codec.job_settings_from_proto(_spec(), total_steps=12)
    assert plain.local_steps is None and plain.batches_per_lease == DEFAULT_BATCHES_PER_LEASE


def test_local_steps_keep_explicit_values() -> None:
    spec = _spec(local_steps=_diloco(steps=3, total_steps=500), batches_per_lease=9)
    s = codec.job_settings_from_proto(spec, total_steps=12)
    assert s.batches_per_lease == 9
    assert s.local_steps is not None and s.local_steps.inner.total_steps == 500


def test_local_steps_round_trip_through_the_wire_is_exact() -> None:
    spec = _spec(local_steps=_diloco(steps=5, warmup_steps=7, weight_decay=0.1))
    spec.optimizer.CopyFrom(_outer())
    s = codec.job_settings_from_proto(spec, total_steps=9)
    wire = codec.job_settings_to_proto(s)
    assert wire.HasField("local_steps") and wire.local_steps.inner_optimizer.total_steps == 45
    # What the coordinator keeps and what a worker is configured with decode to the same.
    assert codec.job_settings_from_proto(wire, total_steps=999) == s
    workers = codec.job_settings_to_proto(s.for_workers())
    assert codec.job_settings_from_proto(workers, total_steps=1).local_steps == s.local_steps
    # Unset stays unset: a plain job has no local_steps on the wire.
    plain = codec.job_settings_to_proto(codec.job_settings_from_proto(_spec(), total_steps=9))
    assert not plain.HasField("local_steps")


@pytest.mark.parametrize(
    ("local_steps", "fields", "message"),
    [
        (job_pb2.LocalSteps(steps=4), {}, "local_steps.inner_optimizer is required"),
        (_diloco(steps=0), {}, r"local_steps.steps must be in \[1, 10000\], got 0"),
        (_diloco(steps=MAX_LOCAL_STEPS + 1), {}, "local_steps.steps must be in"),
        (_diloco(lr=0.0), {}, r"^local_steps.inner_optimizer: lr must be > 0"),
        (_diloco(kind=job_pb2.OPTIMIZER_UNSPECIFIED), {}, "^local_steps.inner_optimizer: "),
        (
            _diloco(steps=3),
            {"batches_per_lease": 8},
            "batches_per_lease 8 must be a multiple of local_steps.steps 3",
        ),
    ],
)
def test_bad_local_steps_name_the_field(
    local_steps: job_pb2.LocalSteps, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        codec.job_settings_from_proto(_spec(local_steps=local_steps, **fields), total_steps=10)


def test_local_steps_settings_validate_themselves() -> None:
    s = codec.job_settings_from_proto(_spec(local_steps=_diloco(steps=2)), total_steps=10)
    assert s.local_steps is not None
    inner = s.local_steps.inner
    with pytest.raises(ValueError, match=re.escape("local_steps.steps must be in")):
        LocalSteps(steps=0, inner=inner)
    with pytest.raises(ValueError, match=re.escape("inner.total_steps must be resolved")):
        LocalSteps(steps=2, inner=dataclasses.replace(inner, schedule="constant", total_steps=0))
    with pytest.raises(ValueError, match=re.escape("must be a multiple of local_steps.steps 3")):
        dataclasses.replace(s, local_steps=LocalSteps(steps=3, inner=inner))  # 2 a lease
    assert LocalSteps.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_default_total_steps_counts_rounds_with_local_steps() -> None:
    # 11 batches in shards of 4 (4, 4, 3) over 2 workers, H = 2: rounds per shard 2, 2, 2
    # (the short shard's last round has 1 batch); worker 0 owns shards 0 and 2: 4 rounds.
    assert default_total_steps(1, 22, 2, 2, batches_per_lease=4, local_steps=2) == 4
    # H = 4: one round a shard; worker 0 has 2, worker 1 has 1.
    assert default_total_steps(3, 22, 2, 2, batches_per_lease=4, local_steps=4) == 6
    # One worker, shards of 6 and 4 batches (10 batches of 2), H = 3: 2 + 2 rounds, not 10/3.
    assert default_total_steps(1, 20, 2, 1, batches_per_lease=6, local_steps=3) == 4
    assert default_total_steps(1, 22, 2, 2, batches_per_lease=4, local_steps=1) == 7  # as SYNC


@pytest.mark.parametrize(
    "compression",
    [
        job_pb2.PushCompression(),
        job_pb2.PushCompression(kind=tensor_pb2.Compressed.INT8),
        job_pb2.PushCompression(kind=tensor_pb2.Compressed.INT8, chunk=256),
        job_pb2.PushCompression(kind=tensor_pb2.Compressed.TOPK, ratio=0.05),
    ],
)
def test_push_compression_round_trips_with_its_defaults(
    compression: job_pb2.PushCompression,
) -> None:
    spec = _spec()
    spec.push_compression.CopyFrom(compression)
    s = codec.job_settings_from_proto(spec, total_steps=9)
    assert s.push_compression.chunk == (compression.chunk or 1024)
    assert s.push_compression.ratio == (compression.ratio or 0.01)
    assert codec.job_settings_from_proto(codec.job_settings_to_proto(s), total_steps=1) == s


@pytest.mark.parametrize(
    ("compression", "message"),
    [
        (job_pb2.PushCompression(kind=9), "push_compression: unknown kind 9"),  # type: ignore[arg-type]
        (
            job_pb2.PushCompression(kind=tensor_pb2.Compressed.TOPK, ratio=1.5),
            r"push_compression: top-k ratio must be in \(0, 1\]",
        ),
    ],
)
def test_a_bad_push_compression_is_refused(
    compression: job_pb2.PushCompression, message: str
) -> None:
    spec = _spec()
    spec.push_compression.CopyFrom(compression)
    with pytest.raises(ValueError, match=message):
        codec.job_settings_from_proto(spec, total_steps=9)

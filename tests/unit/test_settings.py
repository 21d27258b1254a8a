"""JobSettings: built once from a JobSpec with every default resolved, validated, round-trips."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lmps.core.model import preset
from lmps.core.partition import DEFAULT_SHARD_BYTES
from lmps.core.settings import (
    CONSISTENCIES,
    DEFAULT_BATCHES_PER_LEASE,
    DEFAULT_KEEP_CHECKPOINTS,
    DEFAULT_WAIT_FOR_MEMBERS_S,
    JobSettings,
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

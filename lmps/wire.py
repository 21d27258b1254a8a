"""Conversions between plain config/shard types and their lmps.v1 messages.

Tensors go through `lmps.codec`; this module handles everything else that crosses the wire,
so pure modules (model, optim, partition) never see a protobuf.
"""

from __future__ import annotations

from lmps.model import GPTConfig
from lmps.optim import OptimizerSettings
from lmps.partition import Shard
from lmps.v1 import job_pb2, parameter_pb2

_KINDS = {job_pb2.SGD: "sgd", job_pb2.ADAMW: "adamw"}
_SCHEDULES = {
    job_pb2.LR_SCHEDULE_UNSPECIFIED: "constant",
    job_pb2.CONSTANT: "constant",
    job_pb2.COSINE: "cosine",
}


def shard_to_proto(s: Shard) -> parameter_pb2.ShardSpec:
    return parameter_pb2.ShardSpec(
        shard_id=s.shard_id,
        param=s.param,
        param_shape=list(s.param_shape),
        start=s.start,
        numel=s.numel,
        server_id=s.server_id,
        weight_decay=s.weight_decay,
        backup_server_id=s.backup_server_id,
    )


def shard_from_proto(m: parameter_pb2.ShardSpec) -> Shard:
    return Shard(
        shard_id=m.shard_id,
        param=m.param,
        param_shape=tuple(int(d) for d in m.param_shape),
        start=int(m.start),
        numel=int(m.numel),
        server_id=m.server_id,
        weight_decay=m.weight_decay,
        backup_server_id=m.backup_server_id,
    )


def model_to_proto(c: GPTConfig) -> job_pb2.ModelConfig:
    return job_pb2.ModelConfig(
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        block_size=c.block_size,
        vocab_size=c.vocab_size,
        dropout=c.dropout,
        bias=c.bias,
        tie_embeddings=c.tie_embeddings,
    )


def model_from_proto(m: job_pb2.ModelConfig) -> GPTConfig:
    """Raises ValueError (from GPTConfig's validation) on a bad config."""
    return GPTConfig(
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        block_size=m.block_size,
        vocab_size=m.vocab_size,
        dropout=float(m.dropout),
        bias=m.bias,
        tie_embeddings=m.tie_embeddings,
    )


def optimizer_from_proto(m: job_pb2.OptimizerConfig) -> OptimizerSettings:
    """Raises ValueError on a bad config (unknown kind, lr <= 0, ...)."""
    if m.kind not in _KINDS:
        raise ValueError("optimizer kind must be SGD or ADAMW")
    return OptimizerSettings(
        kind=_KINDS[m.kind],
        lr=m.lr,
        momentum=m.momentum,
        nesterov=m.nesterov,
        weight_decay=m.weight_decay,
        beta1=m.beta1 or 0.9,
        beta2=m.beta2 or 0.95,
        eps=m.eps or 1e-8,
        schedule=_SCHEDULES.get(m.schedule, "constant"),
        warmup_steps=int(m.warmup_steps),
        total_steps=int(m.total_steps),
        min_lr=m.min_lr,
    )


def optimizer_to_proto(s: OptimizerSettings) -> job_pb2.OptimizerConfig:
    kinds = {v: k for k, v in _KINDS.items()}
    return job_pb2.OptimizerConfig(
        kind=kinds[s.kind],
        lr=s.lr,
        momentum=s.momentum,
        nesterov=s.nesterov,
        weight_decay=s.weight_decay,
        beta1=s.beta1,
        beta2=s.beta2,
        eps=s.eps,
        schedule=job_pb2.COSINE if s.schedule == "cosine" else job_pb2.CONSTANT,
        warmup_steps=s.warmup_steps,
        total_steps=s.total_steps,
        min_lr=s.min_lr,
    )

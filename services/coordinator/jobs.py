"""Job records kept by the coordinator. Plain data."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from lmps.model import GPTConfig
from lmps.partition import Shard
from lmps.v1 import job_pb2
from services.coordinator.leases import EpochLeases


@dataclass
class Job:
    job_id: str
    spec: job_pb2.JobSpec  # with total_steps filled in
    config: GPTConfig
    shards: list[Shard]
    servers: dict[str, str]  # server_id -> address
    workers: dict[str, str]  # worker_id -> address
    train: torch.Tensor  # int32 (N, T+1) sequences
    eval: torch.Tensor  # int32 (M, T+1) sequences
    parameters: int
    state: str = "READY"  # READY | RUNNING | FAILED
    step: int = 0  # global step = parameter version
    epochs_done: int = 0
    last_eval_loss: float = math.nan
    error: str = ""
    epoch: EpochLeases | None = None  # the running epoch's leases
    epoch_plan: list[torch.Tensor] = field(default_factory=list)  # data shard -> sequence ids
    active: set[str] = field(default_factory=set)  # workers the SYNC barrier waits for
    lock: threading.RLock = field(default_factory=threading.RLock)

"""Job records kept by the coordinator, and their persistence on disk.

`STATE_DIR/jobs/JOB/job.json` + `data.safetensors` are written once at submission; the
checkpoints beside them (see checkpoint.py) hold everything that changes. A restarted
coordinator rebuilds its jobs from these files.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from google.protobuf import json_format
from safetensors.torch import load_file, save_file

from lmps.core.model import GPTConfig
from lmps.core.partition import Shard
from lmps.rpc import codec
from lmps.services.coordinator import checkpoint
from lmps.services.coordinator.leases import EpochLeases
from lmps.v1 import job_pb2


@dataclass
class Job:
    job_id: str
    spec: job_pb2.JobSpec  # with total_steps filled in
    config: GPTConfig
    train: torch.Tensor  # int32 (N, T+1) sequences
    eval: torch.Tensor  # int32 (M, T+1) sequences
    parameters: int
    shards: list[Shard] = field(default_factory=list)
    servers: dict[str, str] = field(default_factory=dict)  # server_id -> address
    server_epochs: dict[str, str] = field(default_factory=dict)  # incarnation when loaded
    workers: dict[str, str] = field(default_factory=dict)  # configured worker_id -> address
    state: str = "READY"  # READY | RUNNING | FAILED
    step: int = 0  # global step = parameter version
    epochs_done: int = 0
    last_eval_loss: float = math.nan
    error: str = ""
    needs_restore: bool = False  # servers must be loaded from the latest checkpoint first
    resume: dict[str, Any] | None = None  # {"epoch": e, "done": {shard: batches}} mid-epoch
    epoch: EpochLeases | None = None  # the running epoch's leases
    epoch_plan: list[torch.Tensor] = field(default_factory=list)  # data shard -> sequence ids
    active: set[str] = field(default_factory=set)  # workers the SYNC barrier waits for
    created: float = 0.0
    lock: threading.RLock = field(default_factory=threading.RLock)


def save(root: Path, job: Job) -> None:
    """Write the immutable part of a job (spec and data) under root/JOB/."""
    d = root / job.job_id
    d.mkdir(parents=True, exist_ok=True)
    save_file(
        {"train": job.train.contiguous(), "eval": job.eval.contiguous()},
        str(d / "data.safetensors"),
    )
    meta = {
        "job_id": job.job_id,
        "spec": json_format.MessageToDict(job.spec),
        "parameters": job.parameters,
        "created": job.created,
    }
    tmp = d / ".job.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, d / "job.json")


def load_all(root: Path) -> list[Job]:
    """Jobs found under root, newest last, each marked for restore from its latest checkpoint."""
    jobs = []
    for meta_path in sorted(root.glob("*/job.json")):
        d = meta_path.parent
        ckpt = checkpoint.latest(root, d.name)
        if ckpt is None:
            continue  # never got as far as its first checkpoint: nothing to resume
        meta = json.loads(meta_path.read_text())
        spec = json_format.ParseDict(meta["spec"], job_pb2.JobSpec())
        data = load_file(str(d / "data.safetensors"))
        manifest = json.loads((ckpt / "manifest.json").read_text())
        job = Job(
            job_id=meta["job_id"],
            spec=spec,
            config=codec.model_from_proto(spec.model),
            train=data["train"],
            eval=data["eval"],
            parameters=int(meta["parameters"]),
            created=float(meta.get("created", 0.0)),
        )
        apply_manifest(job, manifest)
        job.needs_restore = True
        jobs.append(job)
    return sorted(jobs, key=lambda j: j.created)


def apply_manifest(job: Job, manifest: dict[str, Any]) -> None:
    """Set a job's progress from a checkpoint manifest."""
    job.step = int(manifest["version"])
    job.epochs_done = int(manifest.get("epochs_done", 0))
    loss = manifest.get("last_eval_loss")
    job.last_eval_loss = math.nan if loss is None else float(loss)
    epoch = manifest.get("epoch")
    if epoch is not None and epoch >= job.epochs_done:
        job.resume = {
            "epoch": int(epoch),
            "done": {int(k): int(v) for k, v in manifest["done"].items()},
        }
    else:
        job.resume = None

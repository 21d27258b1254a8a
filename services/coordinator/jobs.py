"""Job records kept by the coordinator, and their persistence on disk.

`STATE_DIR/jobs/JOB/job.json` + `data.safetensors` are written once at submission; the
checkpoints beside them (see checkpoint.py) hold everything that changes. A restarted
coordinator rebuilds its jobs from these files (TF2 ParameterServerStrategy restarts from
checkpoints the same way; here the coordinator itself may be the one restarted).
job.json keeps the settings as the wire's `JobSpec` in JSON, every field explicit, so a
state dir written before `JobSettings` existed still loads.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from google.protobuf import json_format
from safetensors.torch import load_file, save_file

from lmps.core import tasks
from lmps.core.errors import InvalidArgument
from lmps.core.files import atomic_write_text
from lmps.core.model import GPT
from lmps.core.partition import Shard
from lmps.core.settings import JobSettings, JobState
from lmps.rpc import codec
from lmps.services.coordinator import checkpoint
from lmps.services.coordinator.leases import LeaseDesk
from lmps.v1 import job_pb2

log = logging.getLogger("lmps.coordinator")


@dataclass(frozen=True)
class Resume:
    """Where a mid-epoch checkpoint left an epoch: batches already trained per data shard."""

    epoch: int
    done: Mapping[int, int] = field(default_factory=dict)
    redone: int = 0
    """Batches trained in `epoch` before the stop but not in the parameters: they are
    trained again, and the epoch's summary counts them as redone."""

    def done_in(self, epoch: int) -> Mapping[int, int]:
        """The batches done per shard if `epoch` is the one to resume, else none."""
        return self.done if epoch == self.epoch else {}


@dataclass
class Job:
    job_id: str
    settings: JobSettings
    train: torch.Tensor  # int32 (N, T+1) sequences
    eval: torch.Tensor  # int32 (M, T+1) sequences
    parameters: int
    shards: list[Shard] = field(default_factory=list)
    servers: dict[str, str] = field(default_factory=dict)  # server_id -> address
    server_epochs: dict[str, str] = field(default_factory=dict)  # incarnation when loaded
    workers: dict[str, str] = field(default_factory=dict)  # configured worker_id -> address
    state: JobState = JobState.READY
    step: int = 0  # global step = parameter version
    epochs_done: int = 0
    last_eval_loss: float = math.nan
    error: str = ""  # why the job FAILED
    needs_restore: bool = False  # servers must be loaded from the latest checkpoint first
    resume: Resume | None = None  # set when the latest checkpoint is mid-epoch
    # Workers the run a restored checkpoint came from had (its manifest's "workers"): the
    # next epoch waits for as many before it plans (`Cluster.wait_rejoin`); 0 = no wait.
    rejoin: int = 0
    epoch: LeaseDesk | None = None  # the running epoch's leases
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
        "spec": json_format.MessageToDict(codec.job_settings_to_proto(job.settings)),
        "parameters": job.parameters,
        "created": job.created,
    }
    atomic_write_text(d / "job.json", json.dumps(meta, indent=2) + "\n")


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
        try:
            # Submit always resolved total_steps into the stored spec: the 1 is never used.
            settings = codec.job_settings_from_proto(spec, total_steps=1)
        except ValueError as err:
            log.warning("job %s left out: its job.json does not load: %s", d.name, err)
            continue
        data = load_file(str(d / "data.safetensors"))
        manifest = json.loads((ckpt / "manifest.json").read_text())
        job = Job(
            job_id=meta["job_id"],
            settings=settings,
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
    job.rejoin = int(manifest.get("workers", 0))  # absent in checkpoints from before it
    epoch = manifest.get("epoch")
    if epoch is not None and epoch >= job.epochs_done:
        done = {int(k): int(v) for k, v in manifest["done"].items()}
        job.resume = Resume(int(epoch), done, redone=int(manifest.get("redone", 0)))
    else:
        job.resume = None


# -- what a submit brings besides the settings ------------------------------------------------


def to_splits(
    settings: JobSettings, train_tokens: torch.Tensor, eval_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The train and eval streams as (N, T+1) rows of the job's task (`lmps.core.tasks`);
    InvalidArgument, naming the split, when they do not fit the task's layout or the model
    (e.g. a token id outside the vocabulary), or the train split is shorter than one batch."""
    block = settings.model.block_size
    task = tasks.task(settings.task)
    splits = []
    for name, tokens in (("train", train_tokens), ("eval", eval_tokens)):
        try:
            splits.append(task.rows(tokens, settings.model))
        except ValueError as err:
            raise InvalidArgument(f"{name} split: {err}") from None
    train, evals = splits
    if train.shape[0] < settings.batch_size:
        raise InvalidArgument(
            f"train split has {train.shape[0]} sequences of {block + 1} tokens, "
            f"fewer than one batch of {settings.batch_size}"
        )
    return train, evals


def initial_params(model: GPT, init: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate fine-tuning weights against the model: same names, same shapes, finite."""
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(init))
    extra = sorted(set(init) - set(expected))
    if missing or extra:
        raise InvalidArgument(f"init: parameters missing {missing[:3]}, unexpected {extra[:3]}")
    out = {}
    for name, p in expected.items():
        t = init[name]
        if tuple(t.shape) != tuple(p.shape) or not t.is_floating_point():
            raise InvalidArgument(
                f"init: {name} must be float {tuple(p.shape)}, got {t.dtype} {tuple(t.shape)}"
            )
        t32 = t.to(torch.float32)  # check after the cast: 1e39 in fp64 becomes Inf here
        if not bool(torch.isfinite(t32).all()):
            raise InvalidArgument(f"init: {name} has NaN or Inf (in float32)")
        out[name] = t32
    return out

"""A job's settings, typed and resolved once.

`JobSettings` is built from the wire's `lmps.v1.JobSpec` exactly once, at submit
(`lmps.rpc.codec.job_settings_from_proto`), with every default filled in there; nothing else
reads `JobSpec` fields or applies "0 means default" (that convention lives on the wire only).
Frozen and validated in `__post_init__`, as torchtitan's job config: a `JobSettings` that
exists is a job that can run. Pure: no grpc.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, get_args

import torch

from lmps.core.compress import NONE, Compression
from lmps.core.model import GPTConfig
from lmps.core.optim import OptimizerSettings
from lmps.core.partition import DEFAULT_SHARD_BYTES
from lmps.core.tasks import TASK_NAMES, TaskName

Consistency = Literal["sync", "bounded_staleness", "async"]
"""How workers and servers agree on a version (the consistency seam's modes).

"sync": bulk synchronous (BSP): step s is applied once every active worker's gradient for s
has arrived (weighted mean), and pulls for s + 1 see exactly that version. With local steps
(`JobSettings.local_steps`, DiLoCo) the same barrier averages pseudo-gradients instead, one
version per round of H inner steps: local steps change what a push carries, not the mode.
"bounded_staleness": stale synchronous parallel (Petuum SSP; ps-lite's bounded delay) with
bound s = `JobSettings.max_staleness`: steps are made as under SYNC, one at a time, each the
weighted mean of every active worker's push for it, but a worker at step c may compute on any
version >= c - s, so the fast run up to s steps ahead of the slowest before they wait. s = 0
is SYNC exactly.
"async": asynchronous, Hogwild-style (TF's ParameterServerStrategy, ps-lite's default): a
server applies each push to its shards at once, as one optimizer step with that worker's
gradient alone, and bumps its version, so a version is one push (and the lr schedule counts
pushes). Workers pull whatever version the servers are at and never wait for each other;
staleness is unbounded and servers may apply the same pushes in different orders.
"""
CONSISTENCIES: tuple[str, ...] = get_args(Consistency)
MAX_STALENESS = 1000  # steps; each step ahead holds one more pending gradient per worker

DEFAULT_BATCHES_PER_LEASE = 8  # without local steps; with them H (one round a lease), F x H
# with F fragments (its F - 1 flushes, 1/F of the model each, add (F - 1) / F^2 to its bytes)
DEFAULT_KEEP_CHECKPOINTS = 3
DEFAULT_WAIT_FOR_MEMBERS_S = 60.0
MAX_WAIT_FOR_MEMBERS_S = 3600.0
MIN_SHARD_BYTES = 4  # one fp32 element
MAX_LOCAL_STEPS = 10_000  # H; a round longer than this is a typo, not a plan
WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
AUTOCAST_DTYPES = (torch.float32, torch.bfloat16)  # float32: autocast off


class JobState(StrEnum):
    """Where a job is. READY between epochs while its spec's epochs are not all done;
    COMPLETED once they are (more epochs may still be asked for: they run past the end of
    the schedule); RUNNING during an epoch; FAILED for good (its `error` says why; nothing
    more runs)."""

    READY = "READY"
    RUNNING = "RUNNING"
    FAILED = "FAILED"
    COMPLETED = "COMPLETED"

    @staticmethod
    def between_epochs(epochs_done: int, epochs: int) -> JobState:
        """The state of a job that is not running and has not failed: COMPLETED once
        `epochs_done` reached the spec's `epochs`, else READY."""
        return JobState.COMPLETED if epochs_done >= epochs else JobState.READY


def lease_versions(batches: int, window: int = 1, fragments: int = 1) -> int:
    """Versions (pushes) a lease of `batches` batches makes under SYNC: one per window of
    up to `window` batches (windows never cross a lease; the last may be short), then with
    streaming fragments F > 1 the lease's F - 1 flushes (pushes of no new batches, one per
    other fragment, so every batch of the lease is in every fragment):
    ceil(batches / window) + F - 1. Without local steps a window is one batch."""
    return -(-batches // max(1, window)) + max(1, fragments) - 1


def default_total_steps(
    epochs: int,
    train_sequences: int,
    batch_size: int,
    workers: int,
    batches_per_lease: int = 1,
    local_steps: int = 1,
    consistency: Consistency = "sync",
    fragments: int = 1,
) -> int:
    """Steps of the (outer) optimizer of a whole job when the spec leaves it open, at least
    one.

    ASYNC: every push is a version and a step, so a job lasts as many as it has batches.

    SYNC: one version takes one push from every worker still holding data, and data shard j
    (of `batches_per_lease` batches; the last may be short) belongs to worker j mod W, so an
    epoch lasts as many versions as the busiest worker has pushes. (Dividing the batches
    evenly over the workers undercounts whenever the shards do not split evenly, and the
    last steps would run past the end of the learning-rate schedule.)

    A push is one batch, or with `local_steps` H one window of K = H / `fragments` batches
    (H without fragments): a lease of b batches makes `lease_versions(b, K, F)` versions,
    ceil(b / K) + F - 1. A step is a version, except with fragments F > 1: the outer
    schedule counts rounds (the lr of version v is the schedule at v / F), so a job of V
    versions takes ceil(V / F) steps. F = 1 is plain local steps: ceil(b / H) a lease.
    """
    batches = train_sequences // max(1, batch_size)
    if consistency == "async":
        return max(1, epochs) * max(1, batches)
    per = max(1, batches_per_lease)
    f = max(1, fragments)
    window = max(1, local_steps) // f
    w = max(1, workers)
    shard_pushes = [
        lease_versions(min(per, batches - start), window, f) for start in range(0, batches, per)
    ]
    per_worker = [sum(shard_pushes[i::w]) for i in range(w)]
    versions = max(1, epochs) * max(1, max(per_worker))
    return -(-versions // f)


@dataclass(frozen=True)
class LocalSteps:
    """DiLoCo local steps (Douillard et al., 2023, "DiLoCo: Distributed Low-Communication
    Training of Language Models"). Mirrors `lmps.v1.LocalSteps`.

    Each worker runs `steps` inner optimizer steps (`inner`) on its own batches from the
    global parameters of version v, then pushes the pseudo-gradient (global - local); the
    servers average the members' pseudo-gradients as any SYNC step and apply the job's
    `optimizer`, the outer one. A version is one round: up to H batches of one lease.

    Streaming fragments (Douillard et al., 2025, "Streaming DiLoCo with overlapping
    communication"), F = `fragments` > 1: each server's shards are dealt into F fragments
    (`lmps.core.partition.assign_fragments`) that synchronise in turn. A version is then one
    window of K = H / F inner steps, after which a worker pushes the pseudo-gradient of
    fragment (version mod F) only: each shard is still synced every H inner steps, but a
    push carries 1/F of the model. A lease ends with F - 1 flushes (pushes of no new inner
    steps, one per other fragment), so every batch of a completed lease is in every fragment.
    """

    steps: int
    """H: inner steps per round, in [1, MAX_LOCAL_STEPS]."""
    inner: OptimizerSettings
    """The inner optimizer each worker runs, resolved: its schedule counts inner steps (the
    lr of inner step k of the round made at version v is the schedule at v * H + k), and its
    `total_steps` (> 0) is (outer total_steps) x H unless the spec set it."""
    fragments: int = 1
    """F: streaming fragments, in [1, H] and dividing H; 1 = off (every version syncs every
    shard, one per round of H inner steps)."""
    overlap: bool = False
    """Streaming fragments: a fragment's push and pull run while the next window trains,
    and the worker rebases onto its new values one window late (`lmps.v1.LocalSteps`)."""

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_LOCAL_STEPS:
            raise ValueError(
                f"local_steps.steps must be in [1, {MAX_LOCAL_STEPS}], got {self.steps}"
            )
        if not 1 <= self.fragments <= self.steps or self.steps % self.fragments:
            # A window is H / F whole inner steps, so each shard is synced every H of them.
            raise ValueError(
                f"local_steps.fragments {self.fragments} must be in [1, local_steps.steps "
                f"{self.steps}] and divide it (1 = off)"
            )
        if self.overlap and self.fragments == 1:
            raise ValueError(
                "local_steps.overlap overlaps a fragment's sync with the next window: it needs "
                "local_steps.fragments > 1"
            )
        if not isinstance(self.inner, OptimizerSettings):
            raise ValueError("local_steps.inner must be resolved OptimizerSettings")
        if self.inner.total_steps <= 0:
            raise ValueError("local_steps.inner.total_steps must be resolved (> 0)")

    @property
    def window(self) -> int:
        """K = H / F: inner steps (batches) per push; H without fragments."""
        return self.steps // self.fragments


@dataclass(frozen=True)
class JobSettings:
    """Everything a job was submitted with, every default resolved. Mirrors `lmps.v1.JobSpec`."""

    name: str
    """Human-readable label."""
    model: GPTConfig
    """Shape of the model."""
    optimizer: OptimizerSettings
    """The update rule the servers run; `total_steps` is always resolved (> 0)."""
    batch_size: int
    """Sequences per worker per step; > 0."""
    seed: int
    """Seeds initialisation and every epoch's data order."""
    epochs: int
    """Planned epochs (sizes the LR schedule when total_steps was left open)."""
    batches_per_lease: int = DEFAULT_BATCHES_PER_LEASE
    """Batches in one data lease (one data shard of an epoch); > 0."""
    num_servers: int = 0
    """Parameter servers to use; 0 = every registered one."""
    num_workers: int = 0
    """Workers to use; 0 = every registered one."""
    consistency: Consistency = "sync"
    """The consistency model between workers and servers (see `Consistency`)."""
    max_staleness: int = 0
    """Staleness bound of bounded-staleness modes; must be 0 under "sync" and "async"."""
    shard_bytes: int = DEFAULT_SHARD_BYTES
    """Largest parameter shard in fp32 bytes; larger tensors are split (BytePS)."""
    wire_dtype: torch.dtype = torch.float32
    """Dtype of parameters and gradients on the wire: float32, bfloat16 or float16."""
    tokenizer_json: str = ""
    """The `tokenizers` JSON of the job's tokenizer (kept for export; workers get "")."""
    wait_for_members_s: float = DEFAULT_WAIT_FOR_MEMBERS_S
    """How long a submit or restore waits for enough servers and workers, in [0, 3600]."""
    checkpoint_every: int = 0
    """Checkpoint every this many steps (and at every epoch end); 0 = epoch ends only."""
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS
    """Newest checkpoints kept on disk; > 0."""
    replication: int = 1
    """Copies of every shard: 1, or 2 (a backup server takes over with no step lost)."""
    local_steps: LocalSteps | None = None
    """DiLoCo local steps: each push is a round of H inner steps' pseudo-gradient, and a
    version (a step of `optimizer`, the outer one) is one round. None: plain SYNC, one
    gradient per batch. `batches_per_lease` must then be a multiple of H. With streaming
    fragments (`LocalSteps.fragments` F > 1) a version is one window of H / F inner steps
    and syncs 1/F of the shards; SYNC only (max_staleness 0)."""
    push_compression: Compression = NONE
    """How workers compress their pushes, with error feedback (`lmps.core.compress`)."""
    task: TaskName = "lm"
    """What the model learns and the layout of the data (`lmps.core.tasks.TASKS`)."""
    labels: tuple[str, ...] = ()
    """classify: the class names, index = class id (`model.num_labels` of them)."""
    freeze_backbone: bool = False
    """classify: train the head `score` only."""
    micro_batches: int = 1
    """Gradient accumulation: micro-batches per worker batch (divides `batch_size`)."""
    autocast: torch.dtype = torch.float32
    """Workers' compute dtype: float32, or bfloat16 under torch.autocast (fp32 masters)."""
    max_grad_norm: float = 0.0
    """Clip each update's gradient by its global L2 norm to this, as
    `torch.nn.utils.clip_grad_norm_` does; 0 = off. Where it happens depends on the mode
    (`clip_on_servers`): SYNC clips each step's mean on the servers once the workers have
    exchanged its norm; ASYNC clips each push on its worker; local steps clip each inner
    step's gradient on its worker (the outer step is not clipped). Refused under bounded
    staleness with max_staleness > 0 (the exchange would make every worker wait for its
    step). Finite and >= 0."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError("batch_size must be > 0")
        if self.batches_per_lease <= 0:
            raise ValueError("batches_per_lease must be > 0")
        if self.epochs < 0 or self.num_servers < 0 or self.num_workers < 0 or self.seed < 0:
            raise ValueError("epochs, num_servers, num_workers and seed must be >= 0")
        if self.consistency not in CONSISTENCIES:
            raise ValueError(
                f"unknown consistency {self.consistency!r}; expected one of {CONSISTENCIES}"
            )
        if self.consistency == "sync" and self.max_staleness:
            raise ValueError("max_staleness is for bounded-staleness modes; SYNC needs 0")
        if self.consistency == "async" and self.max_staleness:
            raise ValueError(
                "max_staleness is for bounded-staleness modes; ASYNC takes pushes of any "
                "staleness and needs 0"
            )
        if self.consistency == "async" and self.local_steps is not None:
            # A round's pseudo-gradient applied alone at once (async DiLoCo) is another
            # algorithm, with its own outer-step scaling: not built.
            raise ValueError(
                "local_steps run under SYNC or bounded staleness; ASYNC applies each push "
                "alone and has no rounds: drop local_steps or pick another consistency"
            )
        if self.local_steps is not None and self.local_steps.fragments > 1 and self.max_staleness:
            # Version v syncs fragment v mod F with every member's window v: a worker up to s
            # versions ahead would push fragments out of turn (not built; ASYNC has no turns).
            raise ValueError(
                f"local_steps.fragments {self.local_steps.fragments} needs SYNC: "
                f"max_staleness must be 0, got {self.max_staleness}; drop one of them"
            )
        if not 0 <= self.max_staleness <= MAX_STALENESS:
            raise ValueError(f"max_staleness must be in [0, {MAX_STALENESS}]")
        if self.shard_bytes < MIN_SHARD_BYTES:
            raise ValueError(f"shard_bytes must be >= {MIN_SHARD_BYTES}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError("wire_dtype must be a float type (float32, bfloat16 or float16)")
        if not (
            math.isfinite(self.wait_for_members_s)
            and 0 <= self.wait_for_members_s <= MAX_WAIT_FOR_MEMBERS_S
        ):
            raise ValueError("wait_for_members_s must be in [0, 3600] seconds")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0")
        if self.keep_checkpoints <= 0:
            raise ValueError("keep_checkpoints must be > 0")
        if self.replication not in (1, 2):
            raise ValueError("replication must be 1 or 2")
        if 0 < self.num_servers < self.replication:
            # Each copy of a shard lives on a different server.
            raise ValueError(
                f"replication {self.replication} needs {self.replication} parameter servers, "
                f"num_servers is {self.num_servers}; ask for 0 (all) or more"
            )
        if self.optimizer.total_steps <= 0:
            raise ValueError("optimizer.total_steps must be resolved (> 0)")
        if self.local_steps is not None and self.batches_per_lease % self.local_steps.steps:
            # Every full lease is whole rounds; only a shard cut short by the data ends in a
            # shorter one.
            raise ValueError(
                f"batches_per_lease {self.batches_per_lease} must be a multiple of "
                f"local_steps.steps {self.local_steps.steps}"
            )

        self._check_task()
        if self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ValueError(
                f"micro_batches {self.micro_batches} must be >= 1 and divide batch_size "
                f"{self.batch_size}"
            )
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError("autocast must be float32 (off) or bfloat16")
        self._check_clipping()

    def _check_clipping(self) -> None:
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be finite and >= 0, got {self.max_grad_norm}")
        if self.max_grad_norm and self.max_staleness and self.local_steps is None:
            # The servers clip a step once every worker's push for it is in and its norm has
            # gone round: a worker running ahead would wait for that at every step.
            raise ValueError(
                f"max_grad_norm {self.max_grad_norm:g} needs every step's norm before the "
                f"next, which bounded staleness (max_staleness {self.max_staleness}) would "
                "wait for at every step: drop one of them (local steps clip on the workers)"
            )

    @property
    def clip_on_servers(self) -> bool:
        """The servers clip each step's mean gradient (SYNC without local steps, with
        max_grad_norm > 0): they get max_grad_norm at Load and the workers exchange each
        step's norm (GradNorm, ApplyStep). Otherwise a worker clips what it computes itself
        (ASYNC: its push; local steps: its inner gradients), or nothing is clipped."""
        return bool(self.max_grad_norm) and self.consistency != "async" and self.local_steps is None

    def _check_task(self) -> None:
        if self.task not in TASK_NAMES:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASK_NAMES}")
        n = self.model.num_labels
        if self.task != "classify":
            if n or self.labels or self.freeze_backbone:
                raise ValueError(
                    f"num_labels, labels and freeze_backbone are for task classify, not {self.task}"
                )
            return
        if n < 2:
            raise ValueError("task classify needs model.num_labels >= 2")
        if len(self.labels) != n:
            raise ValueError(
                f"task classify needs {n} labels (model.num_labels), got {len(self.labels)}"
            )
        if len(set(self.labels)) != n or not all(self.labels):
            raise ValueError("labels must be distinct and non-empty")

    def for_workers(self) -> JobSettings:
        """The same settings without what workers never use (the tokenizer can be MBs)."""
        return dataclasses.replace(self, tokenizer_json="")

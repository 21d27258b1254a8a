"""What every contender of `peers` trains, and the few pieces all of them share.

A `PeerJob` travels to each child process as JSON on its command line, so every contender
builds the same model from the same seed, sees the same rows at every step and runs the
same AdamW. Pure torch and lmps.core: no gRPC, so the torch-only children stay light.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmps.core.data import epoch_order, prepare_corpus, to_sequences
from lmps.core.model import GPTConfig, decay_mask, init_model, preset
from lmps.core.optim import DEFAULTS

EPOCH = 0
"""Every contender trains on lmps's order of epoch 0 (`epoch_order(n, seed, 0)`)."""


@dataclass(frozen=True)
class PeerJob:
    """One configuration, identical for every contender."""

    preset: str
    vocab_size: int
    """The corpus's actual vocabulary (BPE may learn fewer merges than the preset asks)."""
    global_batch: int
    """Sequences per optimizer step, over all workers together."""
    warmup_steps: int
    """Steps run before the timed window (allocator, kernels, connections)."""
    timed_steps: int
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.1
    # lmps's own defaults, so the torch contenders run the update the servers run.
    beta1: float = float(DEFAULTS["beta1"])
    beta2: float = float(DEFAULTS["beta2"])
    eps: float = float(DEFAULTS["eps"])
    data: str = "builtin:pydoc"
    cache_dir: str = ".cache/lmps"

    def __post_init__(self) -> None:
        # The timed window opens after the last warm-up step: there has to be one.
        if self.warmup_steps < 1 or self.timed_steps < 1:
            raise ValueError("warmup_steps and timed_steps must be >= 1")

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    @property
    def sequences(self) -> int:
        """Training sequences: exactly one epoch of `steps` global batches."""
        return self.global_batch * self.steps

    @property
    def config(self) -> GPTConfig:
        return preset(self.preset, self.vocab_size)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.config.block_size

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PeerJob:
        return cls(**json.loads(text))


def train_tokens(job: PeerJob) -> Tensor:
    """The corpus's training tokens cut to exactly `job.sequences` windows."""
    corpus = prepare_corpus(job.data, job.vocab_size, 0.05, Path(job.cache_dir))
    need = job.sequences * job.config.block_size + 1
    if corpus.train.numel() < need:
        raise ValueError(
            f"{job.data} has {corpus.train.numel()} training tokens; {job.preset} at batch "
            f"{job.global_batch} x {job.steps} steps needs {need}"
        )
    return corpus.train[:need]


def load_sequences(job: PeerJob) -> Tensor:
    """The (sequences, block + 1) windows lmps's coordinator cuts from the same tokens."""
    return to_sequences(train_tokens(job), job.config.block_size)


def step_rows(job: PeerJob, step: int, parts: int) -> list[Tensor]:
    """Sequence indices of global step `step`, cut into `parts` equal consecutive pieces.

    Global step s is rows [s*G, (s+1)*G) of the epoch order, whatever `parts` is, so a
    single process, W DDP ranks and W lmps workers see the same rows. It is lmps's layout
    with `batches_per_lease = 1`: data shard j is the j-th batch of G/W rows and worker w
    (sorted by id) owns shards j = w mod W in order, so at step s it trains shard s*W + w.
    """
    if job.global_batch % parts:
        raise ValueError(f"global batch {job.global_batch} does not split into {parts} parts")
    order = epoch_order(job.sequences, job.seed, EPOCH)
    size = job.global_batch // parts
    first = step * job.global_batch
    return [order[first + r * size : first + (r + 1) * size] for r in range(parts)]


def build_model(job: PeerJob) -> nn.Module:
    return init_model(job.config, job.seed)


def adamw(model: nn.Module, job: PeerJob) -> torch.optim.Optimizer:
    """torch's AdamW with lmps's two groups: decay on matrices and embeddings only."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if decay_mask(n, p)], "weight_decay": job.weight_decay},
        {"params": [p for n, p in named if not decay_mask(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=job.lr, betas=(job.beta1, job.beta2), eps=job.eps)


def forward_backward(model: nn.Module, batch: Tensor) -> float:
    """Mean next-token loss of `batch` (rows of block + 1 tokens), gradients accumulated."""
    batch = batch.long()
    _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    return float(loss.detach())


def model_bytes(model: nn.Module) -> int:
    """fp32 bytes of the parameters: what a pull (or a push) moves per worker."""
    return sum(p.numel() * 4 for p in model.parameters())


def cpu_now() -> float:
    """User + system CPU seconds of this process so far, all its threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_json(path: str, payload: dict[str, Any]) -> None:
    """A child's result; written whole at the end, so a present file is a complete one."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def child_parser(prog: str) -> argparse.ArgumentParser:
    """The flags every child takes; rank-based children add theirs."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}")
    parser.add_argument("--job", required=True, type=PeerJob.from_json, help="PeerJob JSON")
    parser.add_argument("--result", required=True, help="where to write this process's JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser

"""What every contender of `slowlink` trains: model, data, steps, evaluation.

A `SlowJob` travels to the DDP ranks as JSON, so every contender builds the same model from
the same seed and sees the same rows at every step. The training set is exactly
`steps_per_epoch` global batches of the corpus, trained for `epochs` epochs in lmps's
per-epoch orders; each epoch ends with an evaluation on the same held-out windows (lmps:
the coordinator's end-of-epoch eval on the workers), which gives the eval-loss curve. Pure
torch and lmps.core: the DDP children stay light.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lmps.core.data import epoch_order, prepare_corpus, to_sequences
from lmps.core.model import GPTConfig, decay_mask, init_model, preset
from lmps.core.optim import DEFAULTS

EVAL_BATCH = 32
"""Sequences per forward pass when evaluating (lmps's `Replica.evaluate` default)."""


@dataclass(frozen=True)
class SlowJob:
    """One configuration, identical for every contender."""

    preset: str
    vocab_size: int
    """The corpus's actual vocabulary (BPE may learn fewer merges than the preset asks)."""
    global_batch: int
    """Sequences per step over all workers together (each of W workers trains G/W)."""
    steps_per_epoch: int
    epochs: int
    eval_windows: int
    """Held-out windows of block + 1 tokens scored at the start and after every epoch."""
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = float(DEFAULTS["beta1"])
    beta2: float = float(DEFAULTS["beta2"])
    eps: float = float(DEFAULTS["eps"])
    data: str = "builtin:pydoc"
    cache_dir: str = ".cache/lmps"

    def __post_init__(self) -> None:
        if min(self.global_batch, self.steps_per_epoch, self.epochs, self.eval_windows) < 1:
            raise ValueError(f"every size of {self} must be >= 1")

    @property
    def config(self) -> GPTConfig:
        return preset(self.preset, self.vocab_size)

    @property
    def sequences(self) -> int:
        """Training sequences: one epoch is exactly `steps_per_epoch` global batches."""
        return self.global_batch * self.steps_per_epoch

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.config.block_size

    @property
    def tokens(self) -> int:
        """The token budget: every contender trains exactly this many."""
        return self.steps * self.tokens_per_step

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SlowJob:
        return cls(**json.loads(text))


def split_tokens(job: SlowJob) -> tuple[Tensor, Tensor]:
    """(train, eval) tokens: the corpus cut to exactly `job.sequences` training windows and
    `job.eval_windows` eval windows (1-D int32, as lmps's SubmitJob takes them)."""
    corpus = prepare_corpus(job.data, job.vocab_size, 0.05, Path(job.cache_dir))
    block = job.config.block_size
    train = corpus.train[: job.sequences * block + 1]
    evals = corpus.eval[: job.eval_windows * block + 1]
    if to_sequences(train, block).shape[0] < job.sequences:
        raise ValueError(f"{job.data} has too few training tokens for {job.sequences} windows")
    if to_sequences(evals, block).shape[0] < job.eval_windows:
        raise ValueError(f"{job.data} has too few eval tokens for {job.eval_windows} windows")
    return train, evals


def step_rows(job: SlowJob, epoch: int, step: int, parts: int) -> list[Tensor]:
    """Sequence indices of step `step` (within the epoch) of `epoch`, in `parts` pieces.

    lmps's layout with `batches_per_lease = 1`: data shard j of an epoch is the j-th batch
    of G/W rows of `epoch_order(n, seed, epoch)`, and worker w (sorted by id) trains shard
    step * W + w at each step (the same rows `bench.peers.job.step_rows` gives for epoch 0).
    """
    if job.global_batch % parts:
        raise ValueError(f"global batch {job.global_batch} does not split into {parts} parts")
    order = epoch_order(job.sequences, job.seed, epoch)
    size = job.global_batch // parts
    first = step * job.global_batch
    return [order[first + r * size : first + (r + 1) * size] for r in range(parts)]


def build_model(job: SlowJob) -> nn.Module:
    return init_model(job.config, job.seed)


def adamw(model: nn.Module, job: SlowJob) -> torch.optim.Optimizer:
    """torch's AdamW with lmps's two groups: decay on matrices and embeddings only."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if decay_mask(n, p)], "weight_decay": job.weight_decay},
        {"params": [p for n, p in named if not decay_mask(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=job.lr, betas=(job.beta1, job.beta2), eps=job.eps)


@torch.no_grad()
def eval_sums(model: nn.Module, sequences: Tensor) -> tuple[float, int]:
    """(sum of token cross-entropies, tokens) over `sequences`: lmps's worker arithmetic."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, sequences.shape[0], EVAL_BATCH):
        tokens = sequences[i : i + EVAL_BATCH].long()
        x, y = tokens[:, :-1], tokens[:, 1:]
        _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    return total, count


def model_bytes(job: SlowJob) -> int:
    """fp32 bytes of the parameters: what one pull (or one push) moves per worker."""
    return sum(p.numel() * 4 for p in build_model(job).parameters())

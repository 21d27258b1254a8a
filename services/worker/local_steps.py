"""A worker's inner loop under local steps (DiLoCo: Douillard et al., "DiLoCo: Distributed
Low-Communication Training of Language Models", 2023, Algorithm 1).

Each round starts from the global parameters θ(v) the worker pulled at version v, runs up to
H inner optimizer steps on the worker's own batches, and hands back the pseudo-gradient
Δ = θ(v) - θ_local, which the worker pushes in place of a gradient; the servers average the
members' Δ (sample-weighted, as any SYNC step) and apply the job's optimizer to it: that is
DiLoCo's outer optimizer (SGD with Nesterov momentum in the paper).

The inner optimizer is the registry's `ShardOptimizer` over the worker's full set of shards,
so its math is the servers' (elementwise: SGD's single-tensor kernel, AdamW's fused one
over padded shards). Its state (AdamW's moments) lives here and carries over from round to
round; each round only overwrites the values with the new global ones. The inner lr of
step k of the round made at version v is the inner schedule at v * H + k: a pure function
of the round, the same on every worker and after a resume.

Gradient clipping (`max_grad_norm`) clips each inner step's gradient by its global norm
before the inner optimizer step, exactly as clip_grad_norm_ on this replica (the worker holds
every shard); the pseudo-gradient pushed, and so the outer step, is not clipped.

Pure torch: no gRPC.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lmps.core import clip
from lmps.core.optim import OptimizerSettings, ShardOptimizer


class InnerModel(Protocol):
    """What the inner loop needs of a replica (`Replica` is one)."""

    def load(self, values: Mapping[str, torch.Tensor]) -> None: ...

    def train_step(self, batch: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class Round:
    """One round's outcome: Δ per shard (fp32), and the loss and seconds of each inner step,
    and its gradient's global norm before clipping (0.0 each when clipping is off)."""

    delta: dict[str, torch.Tensor]
    losses: list[float]
    compute_s: list[float]
    norms: list[float]


class InnerLoop:
    """The inner optimizer of one worker for one job (built at the first round)."""

    def __init__(
        self,
        model: InnerModel,
        steps: int,
        inner: OptimizerSettings,
        decay: Mapping[str, bool],
        *,
        max_grad_norm: float = 0.0,
    ) -> None:
        if steps < 1:
            raise ValueError(f"local steps must be >= 1, got {steps}")
        self.max_grad_norm = max_grad_norm
        """Clip every inner gradient by its global norm to this (0: off)."""
        self.model = model
        self.steps = steps
        self.settings = inner
        self.decay = dict(decay)
        self.optimizer: ShardOptimizer | None = None

    def begin(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Start from the global `values` (every shard): the inner optimizer's values become
        them, its state kept (built at the first call). Returns the fp32 start values."""
        start = {sid: v.to(torch.float32) for sid, v in values.items()}
        if self.optimizer is None:
            self.optimizer = ShardOptimizer(start, decay=self.decay, settings=self.settings)
        else:
            self.optimizer.assign(start)
        return start

    def run_steps(
        self,
        first_step: int,
        batches: Sequence[torch.Tensor],
        active: Callable[[], bool] = lambda: True,
    ) -> tuple[list[float], list[float], list[float]] | None:
        """Inner steps on `batches` from the current local values, the k-th at the inner lr
        of step `first_step` + k: (losses, seconds, norms before clipping) per step. None
        when `active()` turns false between steps."""
        assert self.optimizer is not None, "begin() first"
        losses: list[float] = []
        seconds: list[float] = []
        norms: list[float] = []
        for k, batch in enumerate(batches):
            if not active():
                return None
            t0 = time.perf_counter()
            self.model.load(self.optimizer.values)
            loss, grads = self.model.train_step(batch)
            norms.append(clip.clip_(grads, self.max_grad_norm) if self.max_grad_norm else 0.0)
            self.optimizer.step(grads, first_step + k)
            losses.append(loss)
            seconds.append(time.perf_counter() - t0)
        return losses, seconds, norms

    def run_round(
        self,
        version: int,
        values: Mapping[str, torch.Tensor],
        batches: Sequence[torch.Tensor],
        active: Callable[[], bool] = lambda: True,
    ) -> Round | None:
        """Inner steps on `batches` (at most H, each (B, T+1) tokens) from the global
        `values` of `version`. None, with nothing to push, when `active()` turns false
        between steps (the epoch was cancelled)."""
        if not 0 < len(batches) <= self.steps:
            raise ValueError(f"a round has 1..{self.steps} batches, got {len(batches)}")
        start = self.begin(values)
        done = self.run_steps(version * self.steps, batches, active)
        if done is None:
            return None
        assert self.optimizer is not None
        # Δ = θ(v) - θ_local: the outer optimizer's "gradient" (DiLoCo, Algorithm 1, line 12).
        local = self.optimizer.values
        delta = {sid: start[sid].sub(local[sid]) for sid in start}
        return Round(delta, *done)

"""One contender's run of the `SlowJob`, as the report needs it (no bytes yet: those come
from the byte sampler, put on the same `time.time()` clock)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Point:
    t: float
    """`time.time()` when the loss was known."""
    tokens: int
    """Training tokens done by then."""
    loss: float


@dataclass(frozen=True)
class Outcome:
    t0: float
    """Training starts (the first eval is done; link bytes are counted from here)."""
    t1: float
    """The last epoch's eval is done."""
    tokens: int
    train: list[Point]
    """The global batch's training loss after each step (mean over the workers)."""
    evals: list[Point]
    """Eval loss before the first step (at t0) and after every epoch (when it was known)."""
    checks: dict[str, bool]
    pauses: list[tuple[float, float]] = field(default_factory=list)
    """Spans (`time.time()`) spent evaluating and ending epochs, not training: the training
    clock and the training bytes leave them out (lmps's eval pulls the model once more per
    worker, DDP's does not; a checkpoint is lmps's alone)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return self.t1 - self.t0

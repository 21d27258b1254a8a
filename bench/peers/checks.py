"""Is a contender training at all, and training the same model? A ratio against a broken
peer means nothing, so every run is checked before its figures are used.

Every contender trains the same model from the same seed on the same rows with the same
AdamW, so its per-step losses must follow the one-thread torch process's to within float
noise (summation order differs between one batch and W shards). A peer that drops a
gradient, averages wrongly or applies a stale update is off by far more from the second
step on: a step of this job moves the loss by ~0.1-0.4.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

LOSS_TOL = 1e-2
"""Largest |loss - reference loss| at any step that still counts as the same training."""
PARAM_TOL = 1e-6
"""Largest parameter difference between DDP ranks after the run (they should be equal)."""


def max_loss_diff(losses: Sequence[float], reference: Sequence[float]) -> float:
    if len(losses) != len(reference):
        return math.inf
    return max((abs(a - b) for a, b in zip(losses, reference, strict=True)), default=0.0)


def check(
    losses: Sequence[float], reference: Sequence[float] | None, extra: Mapping[str, Any]
) -> dict[str, bool]:
    """Named pass/fail results for one run; `reference` None for the reference itself."""
    out = {
        "finite": all(math.isfinite(x) for x in losses),
        "loss_decreased": len(losses) >= 2 and losses[-1] < losses[0],
    }
    if reference is not None:
        out["matches_torch"] = max_loss_diff(losses, reference) <= LOSS_TOL
    if "max_param_diff_across_ranks" in extra:
        out["replicas_equal"] = extra["max_param_diff_across_ranks"] <= PARAM_TOL
    if "rows_match" in extra:
        out["same_rows"] = bool(extra["rows_match"])
    return out

"""Gradient clipping by global norm (`torch.nn.utils.clip_grad_norm_`) over sharded gradients.

The global L2 norm of a gradient cut into shards is the root of the sum of the shards' sums
of squares. Here every sum of squares is taken in fp64 and they are added in sorted shard-id
order, so whoever adds the same sums gets the same norm, bit for bit: that is what lets every
worker of a SYNC step compute the norm on its own and the servers accept it from any of them.
The scaling is torch's own expression, in fp32: grads *= min(1, max_norm / (norm + 1e-6)).

Where a gradient lives on one process (a worker's own push under ASYNC, its inner steps under
local steps) `clip_` does it all. A SYNC step's mean gradient exists only on the servers, one
part on each, so the norm is exchanged (`commit_step`, docs/modes.md "Gradient clipping"):
every server answers its shards' sums (GradNorm), the caller adds them, each shard once, and
sends the norm back to every server (ApplyStep), which then scales and applies the step.
`NormServer` is what one server looks like to that exchange (gRPC in `lmps.rpc.clip`, a
`ParameterStore` in the in-process tests).

Pure torch: no grpc.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

import torch

from lmps.core.errors import FailedPrecondition
from lmps.core.partition import Shard

EPS = 1e-6
"""torch's clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)."""


def sum_sq(t: torch.Tensor) -> float:
    """The sum of the squares of `t`'s elements, in fp64."""
    flat = t.detach().reshape(-1).to(torch.float64)
    return float(torch.dot(flat, flat))


def total_norm(sums: Mapping[str, float]) -> float:
    """The global L2 norm from each shard's sum of squares: added in fp64 in sorted shard-id
    order (the same inputs give the same norm, whoever adds them), then the root."""
    acc = 0.0
    for sid in sorted(sums):
        acc += sums[sid]
    return math.sqrt(acc)


def clip_coef(max_norm: float, norm: float) -> torch.Tensor:
    """torch's clip coefficient for a gradient of global norm `norm`, as it computes it: the
    norm as an fp32 scalar tensor, max_norm / (norm + 1e-6), clamped to at most 1."""
    total = torch.tensor(norm, dtype=torch.float32)
    return torch.clamp(max_norm / (total + EPS), max=1.0)


def scale_(grads: Mapping[str, torch.Tensor], max_norm: float, norm: float) -> None:
    """Scale `grads` in place as clip_grad_norm_ does for a global norm `norm` (by exactly
    1.0 when it is within `max_norm`: the gradient is then unchanged)."""
    coef = clip_coef(max_norm, norm)
    for g in grads.values():
        g.mul_(coef.to(g.device))


def clip_(grads: Mapping[str, torch.Tensor], max_norm: float) -> float:
    """clip_grad_norm_ over one process's shard gradients: returns their global norm (before
    clipping) and scales them in place."""
    norm = total_norm({sid: sum_sq(g) for sid, g in grads.items()})
    scale_(grads, max_norm, norm)
    return norm


# -- the exchange of a SYNC step's norm ----------------------------------------------------


class NormServer(Protocol):
    """One parameter server of a job, as the norm exchange sees it."""

    def grad_norm(self, step: int) -> tuple[int, Mapping[str, float]]:
        """(the server's version, each held shard's sum of squares of step `step`'s mean
        gradient), once that step is complete there (waits). Applied already: the sums it
        had, or none once they are no longer kept (the version is then past `step`)."""
        ...

    def apply_step(self, step: int, grad_norm: float) -> float:
        """Apply parked step `step` clipped by `grad_norm`; a no-op where it is applied.
        Returns the norm the step was applied with."""
        ...


Fanout = Callable[[Callable[[str], Any], Sequence[str]], list[Any]]
"""Runs a function over server ids (in parallel) and returns the results in their order."""


def serially(fn: Callable[[str], Any], items: Sequence[str]) -> list[Any]:
    return [fn(item) for item in items]


def commit_step(
    servers: Mapping[str, NormServer],
    step: int,
    *,
    owners: Mapping[str, str],
    shards: Collection[str] | None = None,
    fanout: Fanout = serially,
) -> float | None:
    """Commit SYNC step `step` on every server: each server's sums (GradNorm, in parallel),
    the global norm over each shard once (the owner's answer where owner and backup both
    hold it: the values are the same), then ApplyStep with it everywhere (in parallel),
    skipped where every server is past the step already. Returns the norm (before
    clipping); None when the step was applied so long ago that its sums are gone (every
    server is past it then: servers are at most one step apart). FailedPrecondition when
    the answers leave out a shard of `shards`."""
    ids = sorted(servers)
    answers: list[tuple[int, Mapping[str, float]]] = fanout(
        lambda s: servers[s].grad_norm(step), ids
    )
    if all(version > step for version, _ in answers) and not all(sums for _, sums in answers):
        return None
    sums: dict[str, float] = {}
    for server, (_, part) in zip(ids, answers, strict=True):
        for sid, value in part.items():
            if sid not in sums or owners.get(sid) == server:
                sums[sid] = value
    missing = sorted(set(shards or ()) - sums.keys())
    if missing:
        raise FailedPrecondition(
            f"grad norm of step {step}: no server answered for shards {missing[:3]}"
        )
    norm = total_norm(sums)
    if all(version > step for version, _ in answers):
        return norm  # applied everywhere already (by another worker of the step)
    fanout(lambda s: servers[s].apply_step(step, norm), ids)
    return norm


class StepCommitter:
    """A worker's side of the exchange: commit every step it pushed for, right after the
    push (`after_push`); and before a pull for version v, step v - 1 if it did not commit
    that one itself (`before_pull`: a worker that joined, the first pull of an epoch, or a
    step whose pushers all died after pushing), a no-op where the step is applied."""

    def __init__(
        self, servers: Mapping[str, NormServer], shards: Sequence[Shard], fanout: Fanout = serially
    ) -> None:
        self.servers = servers
        self.owners = {s.shard_id: s.server_id for s in shards}
        self.fanout = fanout
        self.committed = -1
        """The last step this worker committed (or found applied)."""

    def commit(self, step: int) -> float:
        norm = commit_step(
            self.servers, step, owners=self.owners, shards=self.owners.keys(), fanout=self.fanout
        )
        self.committed = step
        return 0.0 if norm is None else norm

    def after_push(self, step: int) -> float:
        """The global norm of step `step` (before clipping), applied on every server."""
        return self.commit(step)

    def before_pull(self, min_version: int) -> None:
        if min_version > 0 and self.committed != min_version - 1:
            self.commit(min_version - 1)

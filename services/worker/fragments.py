"""A worker's side of streaming fragments (Douillard et al., "Streaming DiLoCo with
overlapping communication: Towards a Distributed Free Lunch", 2025, without the overlap).

DiLoCo (`local_steps.py`) syncs every shard once per round of H inner steps. Here the shards
are dealt into F fragments (`Shard.fragment`, by the coordinator) that sync in turn: after
every window of K = H / F inner steps the worker pushes the pseudo-gradient of one
fragment, f = version mod F,

    Δ_f = θ_f(global, as last pulled) - θ_f(local),

the servers average the members' Δ_f and step the outer optimizer on fragment f only, and
the worker takes fragment f's new global values as its local ones (the other fragments
keep training on). So each shard still syncs once every H inner steps, but a push carries
1/F of the model and the pushes of a round spread over it: peak bytes per sync drop F x.

A lease ends with F - 1 flushes: pushes of the fragments not synced since the lease's last
window, with no inner steps in between, so every batch of a completed lease is in every
fragment (and the next lease starts with local = global everywhere, no pull needed).

The weight of a fragment's push is the samples this worker trained since that fragment's
last push (the union batch's share, as a round's weight is under DiLoCo). With F = 1 this
is DiLoCo exactly: one fragment, synced after every H inner steps, no flush.

With `overlap` (Streaming DiLoCo's overlap, tau = one window) a fragment's push and pull
run while the next window trains, so its new global values arrive one window late; the
worker rebases
onto them, local_f <- new global_f + (local_f now - local_f at the push): the progress the
window made on f is kept and goes into f's next push. (This merge rule is ours: it drops
none of the local progress; the paper's overlapped variant mixes local and global values
instead.) Without overlap nothing trains in between and this is local_f <- new global_f.

Pure torch: no gRPC.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lmps.services.worker.local_steps import InnerLoop


@dataclass(frozen=True)
class Window:
    """One window's inner steps: the loss, seconds and gradient norm (before clipping; 0.0
    when clipping is off) of each."""

    losses: list[float]
    compute_s: list[float]
    norms: list[float]


class StreamingLoop:
    """Local values, the last global value of every shard, and the weight trained since each
    fragment's last sync, for one worker (built with the job; `reset` at each epoch)."""

    def __init__(
        self,
        inner: InnerLoop,
        fragment_of: Mapping[str, int],
        fragments: int,
        *,
        overlap: bool = False,
    ) -> None:
        if fragments < 2 or inner.steps % fragments:
            raise ValueError(f"fragments {fragments} must be >= 2 and divide H {inner.steps}")
        if any(not 0 <= f < fragments for f in fragment_of.values()):
            raise ValueError(f"a shard's fragment is outside [0, {fragments})")
        self.inner = inner
        self.fragments = fragments
        self.overlap = overlap
        """Sync each fragment while the next window trains (`settle` then rebases)."""
        self._at_push: dict[str, torch.Tensor] = {}  # overlap: local values when pushed
        self.window = inner.steps // fragments
        """K: inner steps between two syncs."""
        self.members = {
            f: [sid for sid, g in fragment_of.items() if g == f] for f in range(fragments)
        }
        """Fragment -> its shard ids (every shard of the job, in plan order)."""
        self._global: dict[str, torch.Tensor] = {}
        self._since = [0.0] * fragments
        self.ready = False
        """Whether the local values continue from the last sync (else `reset` first)."""

    def reset(self, values: Mapping[str, torch.Tensor]) -> None:
        """Start from global `values` of every shard (a full pull): local = global."""
        start = self.inner.begin(values)
        self._global = {sid: v.clone() for sid, v in start.items()}
        self._since = [0.0] * self.fragments
        self._at_push = {}
        self.ready = True

    def train(
        self,
        version: int,
        batches: Sequence[torch.Tensor],
        weight: float,
        active: Callable[[], bool] = lambda: True,
    ) -> Window | None:
        """The window of `version`: up to K inner steps on `batches`, the k-th at the inner
        lr of step version * K + k, from the local values. `weight`: their samples, counted
        towards every fragment's next sync. None (and `ready` false) when `active()` turns
        false between steps."""
        if not self.ready:
            raise RuntimeError("reset() first: the local values do not follow a sync")
        if not 0 < len(batches) <= self.window:
            raise ValueError(f"a window has 1..{self.window} batches, got {len(batches)}")
        done = self.inner.run_steps(version * self.window, batches, active)
        if done is None:
            self.ready = False
            return None
        self._since = [w + weight for w in self._since]
        return Window(*done)

    def fragment(self, version: int) -> int:
        return version % self.fragments

    def delta(self, version: int) -> tuple[dict[str, torch.Tensor], float]:
        """What the push for `version` carries: Δ of its fragment's shards (fp32) and the
        samples trained since that fragment's last push (> 0: every push follows a window
        that trained something, or is a flush of a fragment a window trained since). From
        here the samples trained count towards the fragment's next push."""
        f = self.fragment(version)
        weight = self._since[f]
        if weight <= 0:
            raise RuntimeError(f"fragment {f} has nothing trained since its last sync")
        assert self.inner.optimizer is not None
        local = self.inner.optimizer.values
        if self.overlap:
            self._at_push.update((sid, local[sid].clone()) for sid in self.members[f])
        self._since[f] = 0.0
        return {sid: self._global[sid].sub(local[sid]) for sid in self.members[f]}, weight

    def settle(self, version: int, values: Mapping[str, torch.Tensor]) -> None:
        """The servers made `version` + 1: its fragment's new global `values` become the
        local ones too (with `overlap` rebased: plus what trained since the push), the
        inner optimizer's state kept."""
        f = self.fragment(version)
        if set(values) != set(self.members[f]):
            raise ValueError(f"settle: fragment {f} needs its shards, got {sorted(values)[:3]}")
        assert self.inner.optimizer is not None
        new = {sid: v.to(torch.float32, copy=True) for sid, v in values.items()}
        if self.overlap:
            local = self.inner.optimizer.values
            rebased = {sid: new[sid] + (local[sid] - self._at_push.pop(sid)) for sid in new}
            self.inner.optimizer.assign(rebased, partial=True)
        else:
            self.inner.optimizer.assign(new, partial=True)
        self._global.update(new)

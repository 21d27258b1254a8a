"""The slicer: which parameter server owns which slice of which parameter.

Big tensors are cut into contiguous slices of at most `shard_bytes`, and the slices are
spread over the servers so that each holds about the same number of bytes. Slicing is a plain
function of the parameter list, so the coordinator can compute the map and every worker and
server can check the map it receives with `validate_cover`.

References:
1) Parameter Server: Li et al., "Scaling Distributed Machine Learning with the Parameter
   Server", OSDI 2014: each server owns a range of the keys, and slicing is pluggable
   (ps-lite, github.com/dmlc/ps-lite, include/ps/kv_app.h: `KVWorker::set_slicer`; its
   `DefaultSlicer` cuts a request's key list by the servers' key ranges).
2) BytePS: Jiang et al., "A Unified Architecture for Accelerating Distributed DNN Training
   in Heterogeneous GPU/CPU Clusters", OSDI 2020: split big tensors into ~MB parts balanced
   across servers, so every server's link stays busy and one tensor's traffic runs in
   parallel.

A shard is the flat slice `[start, start + numel)` of the flattened (row-major) parameter.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

DEFAULT_SHARD_BYTES = 1 << 20
"""Largest shard in bytes (fp32) when a job does not set one. A first guess, to be tuned."""


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of the model, as the slicer sees it."""

    name: str
    """Name in the model's state dict."""
    shape: tuple[int, ...]
    """Full shape; `()` for a scalar."""
    weight_decay: bool
    """Whether (decoupled) weight decay applies to it."""


@dataclass(frozen=True)
class Shard:
    """A contiguous slice of one flattened parameter and the server that owns it."""

    shard_id: str
    """`f"{param}#{index}"`, index counting the parameter's slices from 0."""
    param: str
    """Name of the parameter the slice belongs to."""
    param_shape: tuple[int, ...]
    """Full shape of that parameter."""
    start: int
    """First element of the slice in the flattened parameter."""
    numel: int
    """Elements in the slice."""
    server_id: str
    """Parameter server that owns the slice; empty until `assign`."""
    weight_decay: bool
    """Copied from the parameter."""
    backup_server_id: str = ""
    """Server holding a replica (replication 2), updated by the same pushes; empty if none."""
    fragment: int = 0
    """Streaming fragments (F > 1): the fragment in [0, F) this shard syncs with; version v
    syncs fragment v mod F only (`assign_fragments`). A property of the shard id: backups and
    failovers keep it. 0 without fragments."""

    def held_by(self, server_id: str) -> bool:
        """True when `server_id` holds this shard, as owner or as backup."""
        return server_id in (self.server_id, self.backup_server_id)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)  # math.prod(()) == 1: a scalar is one element


def _check_params(params: Sequence[ParamInfo]) -> None:
    seen: set[str] = set()
    for p in params:
        if not p.name:
            raise ValueError("parameter with an empty name")
        if p.name in seen:
            raise ValueError(f"duplicate parameter name {p.name!r}")
        seen.add(p.name)
        if any(d < 0 for d in p.shape):
            raise ValueError(f"parameter {p.name!r} has a negative dimension: {p.shape}")


def split_params(params: Sequence[ParamInfo], shard_bytes: int, itemsize: int = 4) -> list[Shard]:
    """Cut every parameter into contiguous slices of at most `shard_bytes` each.

    A parameter of `n` elements that does not fit becomes `ceil(n / (shard_bytes // itemsize))`
    slices whose sizes differ by at most one element (the first ones get the extra element);
    one that fits stays whole, and so does an empty one (a single slice of 0 elements, so that
    every parameter has an owner). Output order: parameter order, then slice order.
    `server_id` is left empty.
    """
    if itemsize < 1:
        raise ValueError(f"itemsize must be >= 1, got {itemsize}")
    if shard_bytes < itemsize:
        raise ValueError(f"shard_bytes ({shard_bytes}) is smaller than one element ({itemsize})")
    _check_params(params)
    # Counting whole elements (not bytes) keeps every slice <= shard_bytes even when
    # shard_bytes is not a multiple of itemsize.
    max_elems = shard_bytes // itemsize
    shards: list[Shard] = []
    for p in params:
        shape = tuple(p.shape)
        n = _numel(shape)
        parts = max(1, -(-n // max_elems))
        base, extra = divmod(n, parts)
        start = 0
        for i in range(parts):
            size = base + (1 if i < extra else 0)
            shards.append(
                Shard(
                    shard_id=f"{p.name}#{i}",
                    param=p.name,
                    param_shape=shape,
                    start=start,
                    numel=size,
                    server_id="",
                    weight_decay=p.weight_decay,
                )
            )
            start += size
    return shards


def assign(shards: Sequence[Shard], servers: Sequence[str]) -> list[Shard]:
    """Give each shard an owner so that every server holds about the same number of bytes.

    Greedy largest-first onto the currently least-loaded server (LPT scheduling); equal sizes
    keep their input order and equal loads go to the server listed first, so the result depends
    only on the input. Afterwards max load - min load <= the largest shard (each shard lands on
    a minimum, so it can lift that server at most its own size above the rest). Returns the
    shards in input order with `server_id` set. All shards share one itemsize, so balancing
    elements balances bytes.
    """
    if not servers:
        raise ValueError("no parameter servers to assign shards to")
    if len(set(servers)) != len(servers):
        raise ValueError(f"duplicate server ids in {list(servers)}")
    if any(not s for s in servers):
        raise ValueError("empty server id")
    ids = [s.shard_id for s in shards]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate shard ids")

    # Heap entries (load, server index): the tuple order breaks load ties by server order.
    heap = [(0, i) for i in range(len(servers))]
    owner: list[int] = [0] * len(shards)
    for k in sorted(range(len(shards)), key=lambda k: (-shards[k].numel, k)):
        load, i = heapq.heappop(heap)
        owner[k] = i
        heapq.heappush(heap, (load + shards[k].numel, i))
    return [replace(s, server_id=servers[owner[k]]) for k, s in enumerate(shards)]


def assign_fragments(shards: Sequence[Shard], fragments: int) -> list[Shard]:
    """Deal each owner's shards into `fragments` (F) fragments of about equal bytes, so that
    every server syncs about 1/F of what it owns at each version (Streaming DiLoCo: each
    version syncs one fragment; balanced per server, no server's link carries a whole
    fragment while another idles).

    Per owner (`server_id`), greedy largest-first onto the fragment with the fewest elements
    so far, as `assign` does over servers: equal sizes keep their input order and equal
    loads go to the lowest fragment, so the result depends only on the input, and each
    server's fragments end within its largest shard of each other (so of 1/F of its bytes).
    Returns the shards in input order with `fragment` set; F = 1 puts every shard in
    fragment 0. ValueError when F < 1, or some owner holds fewer than F shards (a fragment
    of its would be empty: it would have nothing to sync at that version)."""
    if fragments < 1:
        raise ValueError(f"fragments must be >= 1, got {fragments}")
    by_owner: dict[str, list[int]] = {}
    for k, sh in enumerate(shards):
        by_owner.setdefault(sh.server_id, []).append(k)
    fragment = [0] * len(shards)
    for owner, mine in sorted(by_owner.items()):
        if len(mine) < fragments:
            raise ValueError(
                f"server {owner} owns {len(mine)} shards, fewer than fragments {fragments}: "
                "lower fragments, use fewer servers or a smaller shard_bytes"
            )
        # Heap entries (load, fragment): the tuple order breaks load ties by fragment.
        heap = [(0, f) for f in range(fragments)]
        for k in sorted(mine, key=lambda k: (-shards[k].numel, k)):
            load, f = heapq.heappop(heap)
            fragment[k] = f
            heapq.heappush(heap, (load + shards[k].numel, f))
    return [replace(sh, fragment=fragment[k]) for k, sh in enumerate(shards)]


def plan_shards(
    params: Sequence[ParamInfo],
    servers: Sequence[str],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    replication: int = 1,
    fragments: int = 1,
) -> list[Shard]:
    """Split the parameters into fp32 shards and balance them over `servers`; with
    streaming fragments F > 1 deal each server's shards into F fragments
    (`assign_fragments`); with replication 2 every shard also gets a backup on another
    server (in the shard's fragment: a fragment is a property of the shard)."""
    if replication not in (1, 2):
        raise ValueError(f"replication must be 1 or 2, got {replication}")
    shards = assign_fragments(assign(split_params(params, shard_bytes), servers), fragments)
    return assign_backups(shards, servers) if replication == 2 else shards


def assign_backups(shards: Sequence[Shard], servers: Sequence[str]) -> list[Shard]:
    """Give every shard without a backup one on a server other than its owner, balancing
    what each server holds in total (owned + backups): greedy largest-first onto the
    least-loaded other server, ties going to the next server after the owner around the
    ring. Held bytes end up within about twice the largest shard of each other.
    Deterministic, like `assign`.

    Shards that have a backup keep it, and owners never move: after a failover (`promote`)
    this re-creates only the lost copies, on the survivors or on a server added to
    `servers`, so a second loss is survived too. ValueError if a shard is held by a server
    not in `servers`."""
    if len(set(servers)) < 2:
        raise ValueError("replication 2 needs at least 2 parameter servers")
    held = {s: 0 for s in servers}
    for sh in shards:
        for holder in filter(None, (sh.server_id, sh.backup_server_id)):
            if holder not in held:
                raise ValueError(f"shard {sh.shard_id!r} is held by {holder!r}, not a server")
            held[holder] += sh.numel
    index = {s: i for i, s in enumerate(servers)}
    backup = {k: sh.backup_server_id for k, sh in enumerate(shards)}
    for k in sorted(range(len(shards)), key=lambda k: (-shards[k].numel, k)):
        if backup[k]:
            continue
        owner = shards[k].server_id
        n = len(servers)
        choice = min(
            (s for s in servers if s != owner),
            key=lambda s: (held[s], (index[s] - index[owner]) % n),
        )
        backup[k] = choice
        held[choice] += shards[k].numel
    return [replace(sh, backup_server_id=backup[k]) for k, sh in enumerate(shards)]


def promote(shards: Sequence[Shard], lost: set[str]) -> list[Shard]:
    """The shard map after losing `lost` servers: a backup whose owner is lost becomes the
    owner; lost backups are dropped. ValueError if some shard has no copy left."""
    out = []
    for sh in shards:
        owner, backup = sh.server_id, sh.backup_server_id
        if backup in lost:
            backup = ""
        if owner in lost:
            if not backup:
                raise ValueError(f"shard {sh.shard_id!r} lost every copy")
            owner, backup = backup, ""
        out.append(replace(sh, server_id=owner, backup_server_id=backup))
    return out


def server_loads(shards: Sequence[Shard], itemsize: int = 4) -> dict[str, int]:
    """Bytes each server owns. Servers that own no shard are absent."""
    loads: dict[str, int] = {}
    for s in shards:
        loads[s.server_id] = loads.get(s.server_id, 0) + s.numel * itemsize
    return loads


def _check_cover(shards: Sequence[Shard], params: Mapping[str, ParamInfo]) -> None:
    ids = [s.shard_id for s in shards]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate shard ids: {dup}")
    by_param: dict[str, list[Shard]] = {name: [] for name in params}
    for s in shards:
        p = params.get(s.param)
        if p is None:
            raise ValueError(f"shard {s.shard_id!r} belongs to unknown parameter {s.param!r}")
        if tuple(s.param_shape) != tuple(p.shape):
            raise ValueError(
                f"shard {s.shard_id!r} says {s.param!r} has shape {tuple(s.param_shape)}, "
                f"expected {tuple(p.shape)}"
            )
        if s.weight_decay != p.weight_decay:
            raise ValueError(f"shard {s.shard_id!r} disagrees on weight_decay of {s.param!r}")
        by_param[s.param].append(s)

    for name, group in by_param.items():
        n = _numel(tuple(params[name].shape))
        if not group:
            raise ValueError(f"parameter {name!r} has no shard")
        # Walking the slices in start order, each must begin where the last one ended: a
        # later start is a gap, an earlier one an overlap.
        end = 0
        for s in sorted(group, key=lambda s: (s.start, s.numel)):
            if s.numel < 0 or (s.numel == 0 and n > 0):
                raise ValueError(f"shard {s.shard_id!r} has {s.numel} elements")
            if s.start > end:
                raise ValueError(f"parameter {name!r}: elements [{end}, {s.start}) not covered")
            if s.start < end:
                raise ValueError(f"parameter {name!r}: shard {s.shard_id!r} overlaps at {s.start}")
            end = s.start + s.numel
        if end > n:
            raise ValueError(f"parameter {name!r}: shards reach element {end}, it has {n}")
        if end < n:
            raise ValueError(f"parameter {name!r}: elements [{end}, {n}) not covered")


def validate_cover(shards: Sequence[Shard], params: Sequence[ParamInfo]) -> None:
    """Raise ValueError unless the shards cover every element of every parameter exactly once.

    Also rejects duplicate shard ids, shards of unknown parameters, and shards whose shape or
    weight_decay disagrees with the parameter's.
    """
    _check_params(params)
    _check_cover(shards, {p.name: p for p in params})


def shard_view(tensor: Tensor, shard: Shard) -> Tensor:
    """The shard's slice of the full parameter as a 1-D view (writes go to `tensor`)."""
    if tuple(tensor.shape) != tuple(shard.param_shape):
        raise ValueError(
            f"shard {shard.shard_id!r} needs shape {tuple(shard.param_shape)}, "
            f"got {tuple(tensor.shape)}"
        )
    if not tensor.is_contiguous():
        # A non-contiguous tensor's flat order is not its memory order: view(-1) would fail.
        raise ValueError(f"tensor for {shard.param!r} is not contiguous")
    return tensor.view(-1)[shard.start : shard.start + shard.numel]


def assemble(shards: Sequence[Shard], values: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Build the full parameters from shard values (keyed by shard id).

    `shards` must cover their parameters exactly (as `validate_cover` checks) and `values`
    must hold exactly one tensor of `numel` elements per shard, one dtype per parameter.
    Returns new tensors of `param_shape`, in the order parameters first appear in `shards`.
    """
    params: dict[str, ParamInfo] = {}
    for s in shards:
        params.setdefault(s.param, ParamInfo(s.param, tuple(s.param_shape), s.weight_decay))
    _check_cover(shards, params)
    wanted = {s.shard_id for s in shards}
    if wanted != set(values):
        missing, extra = sorted(wanted - set(values)), sorted(set(values) - wanted)
        raise ValueError(f"shard values: missing {missing}, unexpected {extra}")

    out: dict[str, Tensor] = {}
    for s in shards:
        v = values[s.shard_id]
        if v.numel() != s.numel:
            raise ValueError(f"shard {s.shard_id!r} has {v.numel()} elements, expected {s.numel}")
        full = out.get(s.param)
        if full is None:
            full = torch.empty(s.param_shape, dtype=v.dtype, device=v.device)
            out[s.param] = full
        elif v.dtype != full.dtype:
            # copy_ would cast silently; mixed dtypes mean the values came from different places.
            raise ValueError(
                f"shard {s.shard_id!r} is {v.dtype}, others of {s.param!r} are {full.dtype}"
            )
        shard_view(full, s).copy_(v.reshape(-1))
    return out

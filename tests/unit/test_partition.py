"""The slicer: coverage, size bound, balance, determinism, and the map checks."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmps.core.partition import (
    DEFAULT_SHARD_BYTES,
    ParamInfo,
    Shard,
    assemble,
    assign,
    plan_shards,
    server_loads,
    shard_view,
    split_params,
    validate_cover,
)

FAST = settings(max_examples=60, deadline=None)

# Small dims: with 4-byte shards every element is a shard, and that must stay quick.
shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
param_lists = st.lists(st.tuples(shapes, st.booleans()), min_size=1, max_size=8).map(
    lambda ps: [ParamInfo(f"p{i}.weight", shape, wd) for i, (shape, wd) in enumerate(ps)]
)
server_lists = st.integers(1, 5).map(lambda n: [f"ps-{i}" for i in range(n)])


def coverage_counts(shards: list[Shard], params: list[ParamInfo]) -> dict[str, torch.Tensor]:
    """How many shards cover each element of each parameter."""
    counts = {p.name: torch.zeros(math.prod(p.shape), dtype=torch.int64) for p in params}
    for s in shards:
        counts[s.param][s.start : s.start + s.numel] += 1
    return counts


@FAST
@given(params=param_lists, servers=server_lists, shard_bytes=st.integers(4, 600))
def test_plan_covers_every_element_once_within_size(params, servers, shard_bytes):
    shards = plan_shards(params, servers, shard_bytes=shard_bytes)

    for name, count in coverage_counts(shards, params).items():
        assert torch.all(count == 1), name
    for s in shards:
        assert s.start >= 0 and s.start + s.numel <= math.prod(s.param_shape)
        assert s.numel * 4 <= shard_bytes
        assert s.server_id in servers
    validate_cover(shards, params)


@FAST
@given(params=param_lists, shard_bytes=st.integers(1, 300), itemsize=st.sampled_from([1, 2, 4, 8]))
def test_split_makes_near_equal_contiguous_parts(params, shard_bytes, itemsize):
    if shard_bytes < itemsize:
        with pytest.raises(ValueError, match="smaller than one element"):
            split_params(params, shard_bytes, itemsize)
        return
    shards = split_params(params, shard_bytes, itemsize)

    # Output follows parameter order, then slice order, with ids "<param>#<index>".
    assert [s.param for s in shards] == sorted(
        (s.param for s in shards), key=[p.name for p in params].index
    )
    by_param = {p.name: [s for s in shards if s.param == p.name] for p in params}
    max_elems = shard_bytes // itemsize
    for p in params:
        parts = by_param[p.name]
        n = math.prod(p.shape)
        assert len(parts) == max(1, math.ceil(n / max_elems))
        assert [s.shard_id for s in parts] == [f"{p.name}#{i}" for i in range(len(parts))]
        assert [s.start for s in parts] == [
            sum(q.numel for q in parts[:i]) for i in range(len(parts))
        ]
        sizes = [s.numel for s in parts]
        assert max(sizes) - min(sizes) <= 1
        assert all(s.numel * itemsize <= shard_bytes for s in parts)
        assert all(s.server_id == "" and s.weight_decay == p.weight_decay for s in parts)


@FAST
@given(params=param_lists, servers=server_lists, shard_bytes=st.integers(4, 600))
def test_plan_balances_bytes(params, servers, shard_bytes):
    shards = plan_shards(params, servers, shard_bytes=shard_bytes)
    loads = {sid: 0 for sid in servers} | server_loads(shards)
    largest = max(s.numel * 4 for s in shards)

    assert set(loads) == set(servers)
    assert sum(loads.values()) == sum(math.prod(p.shape) * 4 for p in params)
    assert max(loads.values()) - min(loads.values()) <= largest


@FAST
@given(params=param_lists, servers=server_lists, shard_bytes=st.integers(4, 600))
def test_assign_only_sets_owners_and_keeps_order(params, servers, shard_bytes):
    planned = plan_shards(params, servers, shard_bytes=shard_bytes)

    assert [dataclasses.replace(s, server_id="") for s in planned] == split_params(
        params, shard_bytes
    )


def test_plan_is_the_same_in_another_process():
    # The coordinator and the servers may compute or check a map in different processes;
    # string hashing differs between them, so nothing may depend on set or hash order.
    script = (
        "from lmps.core.partition import ParamInfo, plan_shards\n"
        "ps = [ParamInfo(f'h.{i}.w', (i % 5 + 1, 37), i % 2 == 0) for i in range(40)]\n"
        "print(repr(plan_shards(ps, [f'ps-{j}' for j in range(7)], shard_bytes=400)))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout
    ps = [ParamInfo(f"h.{i}.w", (i % 5 + 1, 37), i % 2 == 0) for i in range(40)]
    here = plan_shards(ps, [f"ps-{j}" for j in range(7)], shard_bytes=400)

    assert out.strip() == repr(here)
    assert plan_shards(ps, [f"ps-{j}" for j in range(7)], shard_bytes=400) == here


def test_assign_largest_first_with_ties_by_order():
    shards = split_params(
        [
            ParamInfo("a", (10,), True),
            ParamInfo("b", (10,), True),
            ParamInfo("c", (5,), False),
            ParamInfo("d", (20,), True),
        ],
        shard_bytes=1 << 10,
    )
    # d (20) -> s1; a (10) -> s2; b (10) -> s2 (10 < 20); c (5) -> s1 and s2 tie at 20 -> s1.
    assert [s.server_id for s in assign(shards, ["s1", "s2"])] == ["s2", "s2", "s1", "s1"]
    # Equal sizes go in input order, equal loads to the server listed first.
    same = split_params([ParamInfo(n, (4,), True) for n in "xyz"], shard_bytes=1 << 10)
    assert [s.server_id for s in assign(same, ["B", "A"])] == ["B", "A", "B"]


def test_big_tensor_split_across_servers_and_scalar_kept():
    params = [ParamInfo("wte.weight", (64, 32), True), ParamInfo("scale", (), False)]
    shards = plan_shards(params, ["ps-0", "ps-1"], shard_bytes=2048)

    wte = [s for s in shards if s.param == "wte.weight"]
    assert [s.numel for s in wte] == [512, 512, 512, 512]
    assert {s.server_id for s in wte} == {"ps-0", "ps-1"}
    (scale,) = [s for s in shards if s.param == "scale"]
    assert (scale.shard_id, scale.start, scale.numel, scale.param_shape) == ("scale#0", 0, 1, ())


def test_uneven_split_gives_the_extra_elements_to_the_first_parts():
    shards = split_params([ParamInfo("w", (11,), True)], shard_bytes=16)
    assert [(s.start, s.numel) for s in shards] == [(0, 4), (4, 4), (8, 3)]


def test_default_shard_bytes_holds_whole_small_tensors():
    (shard,) = plan_shards([ParamInfo("w", (256, 1024), True)], ["ps-0"])
    assert DEFAULT_SHARD_BYTES == 1 << 20
    assert shard.numel == 256 * 1024
    assert len(plan_shards([ParamInfo("w", (257, 1024), True)], ["ps-0"])) == 2


@pytest.mark.parametrize(
    ("params", "servers", "shard_bytes", "match"),
    [
        ([ParamInfo("w", (4,), True)], [], 64, "no parameter servers"),
        ([ParamInfo("w", (4,), True), ParamInfo("w", (2,), False)], ["s"], 64, "duplicate param"),
        ([ParamInfo("w", (4,), True)], ["s"], 3, "smaller than one element"),
        ([ParamInfo("w", (4,), True)], ["s", "s"], 64, "duplicate server"),
        ([ParamInfo("w", (4,), True)], [""], 64, "empty server id"),
        ([ParamInfo("w", (4, -1), True)], ["s"], 64, "negative dimension"),
    ],
)
def test_plan_rejects_bad_input(params, servers, shard_bytes, match):
    with pytest.raises(ValueError, match=match):
        plan_shards(params, servers, shard_bytes=shard_bytes)


PARAMS = [ParamInfo("w", (4, 6), True), ParamInfo("b", (6,), False)]
PLAN = plan_shards(PARAMS, ["ps-0", "ps-1"], shard_bytes=32)  # w: 3 shards of 8; b: 6 whole


def edit(index: int, **changes: Any) -> list[Shard]:
    return [dataclasses.replace(s, **changes) if i == index else s for i, s in enumerate(PLAN)]


@pytest.mark.parametrize(
    ("shards", "match"),
    [
        (PLAN[1:], r"elements \[0, 8\) not covered"),
        (PLAN[:2] + PLAN[3:], r"elements \[16, 24\) not covered"),
        (edit(1, numel=7), r"elements \[15, 16\) not covered"),
        (edit(1, numel=9), "overlaps at 16"),
        (edit(1, start=7), "overlaps at 7"),
        (edit(2, numel=9), "reach element 25"),
        ([*PLAN, dataclasses.replace(PLAN[0], shard_id="w#9")], "overlaps at 0"),
        ([*PLAN, PLAN[0]], "duplicate shard ids"),
        (edit(0, param="x"), "unknown parameter 'x'"),
        (edit(0, param_shape=(24,)), "has shape"),
        (edit(3, weight_decay=True), "weight_decay"),
        (PLAN[:3], "'b' has no shard"),
        (edit(3, numel=0), "has 0 elements"),
    ],
)
def test_validate_cover_rejects_broken_maps(shards, match):
    validate_cover(PLAN, PARAMS)
    with pytest.raises(ValueError, match=match):
        validate_cover(shards, PARAMS)


def test_validate_cover_accepts_empty_parameter_with_one_empty_shard():
    params = [ParamInfo("e", (0, 3), False)]
    shards = plan_shards(params, ["ps-0"], shard_bytes=8)
    assert [(s.start, s.numel) for s in shards] == [(0, 0)]
    validate_cover(shards, params)


@FAST
@given(params=param_lists, servers=server_lists, shard_bytes=st.integers(4, 600))
def test_assemble_of_shard_views_round_trips(params, servers, shard_bytes):
    shards = plan_shards(params, servers, shard_bytes=shard_bytes)
    full = {p.name: torch.randn(p.shape) for p in params}
    values = {s.shard_id: shard_view(full[s.param], s).clone() for s in shards}

    rebuilt = assemble(shards, values)

    assert list(rebuilt) == [p.name for p in params]
    for name, t in full.items():
        torch.testing.assert_close(rebuilt[name], t, rtol=0, atol=0)


def test_shard_view_is_a_view_of_the_flat_slice():
    w = torch.arange(24.0).reshape(4, 6)
    view = shard_view(w, PLAN[1])

    assert torch.equal(view, torch.arange(8.0, 16.0))
    view.zero_()
    assert torch.equal(w.view(-1)[8:16], torch.zeros(8))
    assert w.view(-1)[7] == 7 and w.view(-1)[16] == 16


def test_shard_view_rejects_wrong_shape_and_non_contiguous():
    with pytest.raises(ValueError, match="needs shape"):
        shard_view(torch.zeros(24), PLAN[0])
    with pytest.raises(ValueError, match="not contiguous"):
        shard_view(torch.zeros(6, 4).t(), PLAN[0])


def test_assemble_rejects_missing_extra_and_wrong_size_values():
    values = {s.shard_id: torch.zeros(s.numel) for s in PLAN}
    with pytest.raises(ValueError, match=r"missing \['b#0'\]"):
        assemble(PLAN, {k: v for k, v in values.items() if k != "b#0"})
    with pytest.raises(ValueError, match=r"unexpected \['z#0'\]"):
        assemble(PLAN, {**values, "z#0": torch.zeros(1)})
    with pytest.raises(ValueError, match="has 7 elements"):
        assemble(PLAN, {**values, "w#1": torch.zeros(7)})
    with pytest.raises(ValueError, match="float64"):
        assemble(PLAN, {**values, "w#1": torch.zeros(8, dtype=torch.float64)})
    with pytest.raises(ValueError, match="not covered"):
        assemble(PLAN[1:], {k: v for k, v in values.items() if k != "w#0"})

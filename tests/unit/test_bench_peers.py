"""The pure pieces of `bench peers`: which rows a step trains, and the checks on a run."""

from __future__ import annotations

import math

import pytest
import torch

from bench.__main__ import main as bench_main
from bench.peers.checks import LOSS_TOL, check, max_loss_diff
from bench.peers.job import PeerJob, step_rows
from bench.peers.report import wire_bytes
from bench.peers.suite import plans
from lmps.core.data import plan_data_shards

JOB = PeerJob("mini", vocab_size=4096, global_batch=8, warmup_steps=1, timed_steps=3, seed=3)


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_step_rows_are_lmps_rows_with_one_batch_per_lease(parts):
    # lmps: shard j = the j-th batch of G/W rows; worker w owns j = w mod W, in order.
    shards = plan_data_shards(JOB.sequences, JOB.global_batch // parts, 1, JOB.seed, 0)
    for step in range(JOB.steps):
        rows = step_rows(JOB, step, parts)
        assert [r.tolist() for r in rows] == [
            shards[step * parts + w].tolist() for w in range(parts)
        ]


def test_a_step_has_the_same_rows_however_it_is_split():
    for step in range(JOB.steps):
        whole = torch.cat(step_rows(JOB, step, 1))
        assert torch.equal(torch.cat(step_rows(JOB, step, 2)), whole)
    every = torch.cat([torch.cat(step_rows(JOB, s, 1)) for s in range(JOB.steps)])
    assert sorted(every.tolist()) == list(range(JOB.sequences))  # one epoch, each row once


def test_step_rows_refuses_an_uneven_split():
    with pytest.raises(ValueError, match="does not split"):
        step_rows(JOB, 0, 3)


def test_job_needs_a_warmup_and_a_timed_step_and_round_trips():
    with pytest.raises(ValueError):
        PeerJob("mini", 4096, 8, warmup_steps=0, timed_steps=2)
    assert PeerJob.from_json(JOB.to_json()) == JOB


def test_check_passes_matching_falling_losses():
    ref = [8.3, 7.9, 7.7]
    assert all(check([8.3, 7.9 + LOSS_TOL / 2, 7.7], ref, {}).values())
    assert check(ref, None, {}) == {"finite": True, "loss_decreased": True}


def test_check_catches_broken_peers():
    ref = [8.3, 7.9, 7.7]
    assert not check([8.3, 8.3, 8.3], ref, {})["loss_decreased"]  # not training
    assert not check([8.3, 8.0, 7.8], ref, {})["matches_torch"]  # training something else
    assert not check([8.3, math.nan, 7.7], ref, {})["finite"]
    assert not check(ref, ref, {"max_param_diff_across_ranks": 1e-3})["replicas_equal"]
    assert not check(ref, ref, {"rows_match": False})["same_rows"]
    assert max_loss_diff([1.0], [1.0, 2.0]) == math.inf


def test_wire_bytes_per_worker_step():
    assert wire_bytes("lmps-2x2", 100, 2) == 200  # pull the parameters, push the gradients
    assert wire_bytes("rpc-ps-2", 100, 2) == 200
    assert wire_bytes("ddp-4", 100, 4) == 150  # ring all-reduce: 2 (W-1)/W
    assert wire_bytes("torch-1", 100, 1) == 0


@pytest.mark.parametrize("quick", [False, True])
def test_large_adds_gpt2_to_the_peers_plans(quick):
    presets = [p.preset for p in plans(quick)]
    assert "gpt2" not in presets
    assert [p.preset for p in plans(quick, large=True)] == [*presets, "gpt2"]


def test_large_without_peers_is_refused_naming_the_fix(capsys):
    # A flag that would change nothing is an error, not silently ignored.
    with pytest.raises(SystemExit) as exit_:
        bench_main(["--large", "codec"])
    assert exit_.value.code == 2
    assert "--large changes only peers: add peers" in capsys.readouterr().err

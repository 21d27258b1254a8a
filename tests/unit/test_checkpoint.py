"""Unit tests for checkpoints on disk (services/coordinator/checkpoint.py). Pure: tmp_path only."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from lmps.core.optim import OptimizerSettings
from lmps.core.partition import ParamInfo, Shard, assemble, plan_shards, shard_view
from lmps.services.coordinator import checkpoint
from lmps.services.parameter_server.store import ParameterStore

JOB = "job-1"
PARAMS = [
    ParamInfo("wte.weight", (12, 8), True),
    ParamInfo("h.0.mlp.c_fc.weight", (8, 20), True),
    ParamInfo("h.0.mlp.c_fc.bias", (20,), False),
    ParamInfo("ln_f.weight", (8,), False),
]


def full_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p.name: torch.randn(p.shape, generator=g) for p in PARAMS}


def adam_state(seed: int, step: float = 3.0) -> dict[str, dict[str, torch.Tensor]]:
    """Per-parameter AdamW-like state: two moments and a 0-d `step`, as torch keeps it."""
    g = torch.Generator().manual_seed(seed)
    return {
        p.name: {
            "exp_avg": torch.randn(p.shape, generator=g),
            "exp_avg_sq": torch.rand(p.shape, generator=g),
            "step": torch.tensor(step),
        }
        for p in PARAMS
    }


def write_version(root: Path, version: int, seed: int | None = None) -> Path:
    seed = version if seed is None else seed
    return checkpoint.write(
        root, JOB, version, full_tensors(seed), adam_state(seed), {"epoch": 0, "done": {}}
    )


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def step_folders(root: Path) -> list[str]:
    return sorted(p.name for p in (root / JOB).iterdir() if p.is_dir())


# -- write / read --------------------------------------------------------------------------


def test_write_read_round_trip(tmp_path):
    params, state = full_tensors(1), adam_state(1, step=7.0)
    manifest = {"epoch": 2, "done": {"0": 3}, "epochs_done": 2}

    path = checkpoint.write(tmp_path, JOB, 42, params, state, manifest)

    assert path == tmp_path / JOB / "step-00000042"
    ckpt = checkpoint.read(path)
    assert ckpt.version == 42 and ckpt.path == path
    assert_same(ckpt.params, params)
    assert set(ckpt.state) == set(state)
    for name in state:
        assert_same(ckpt.state[name], state[name])
        assert ckpt.state[name]["step"].dim() == 0  # 0-d scalars stay 0-d
    for key, value in manifest.items():
        assert ckpt.manifest[key] == value
    assert ckpt.manifest["job_id"] == JOB and ckpt.manifest["version"] == 42
    assert set(ckpt.manifest["sha256"]) == {"model.safetensors", "optimizer.safetensors"}


def test_round_trip_without_optimizer_state(tmp_path):
    params = full_tensors(2)
    ckpt = checkpoint.read(checkpoint.write(tmp_path, JOB, 0, params, {}, {}))
    assert_same(ckpt.params, params)
    assert ckpt.state == {}


def test_write_of_a_non_contiguous_tensor_stores_its_values(tmp_path):
    t = torch.arange(12.0).reshape(3, 4).t()  # (4, 3), not contiguous
    ckpt = checkpoint.read(checkpoint.write(tmp_path, JOB, 1, {"w": t}, {}, {}))
    assert torch.equal(ckpt.params["w"], t)


# -- LATEST and prune ----------------------------------------------------------------------


def test_latest_follows_the_newest_and_never_goes_backwards(tmp_path):
    assert checkpoint.latest(tmp_path, JOB) is None

    write_version(tmp_path, 2)
    assert checkpoint.latest(tmp_path, JOB) == tmp_path / JOB / "step-00000002"
    write_version(tmp_path, 5)
    assert checkpoint.latest(tmp_path, JOB) == tmp_path / JOB / "step-00000005"

    older = write_version(tmp_path, 3)  # written after 5: kept, but not LATEST

    assert older.is_dir()
    latest = checkpoint.latest(tmp_path, JOB)
    assert latest is not None and latest == tmp_path / JOB / "step-00000005"
    assert (tmp_path / JOB / "LATEST").read_text().strip() == "step-00000005"
    assert checkpoint.version_of(latest) == 5
    assert_same(checkpoint.read(latest).params, full_tensors(5))


def test_writing_the_same_version_again_keeps_the_complete_one(tmp_path):
    # One version has one snapshot; a second write of it (a mid-epoch checkpoint that is
    # also the epoch's end) must not delete the complete folder LATEST points at.
    write_version(tmp_path, 4, seed=1)
    path = checkpoint.write(
        tmp_path, JOB, 4, full_tensors(2), adam_state(2), {"epoch": None, "epochs_done": 1}
    )
    assert checkpoint.latest(tmp_path, JOB) == path
    ckpt = checkpoint.read(path)  # the digests still match the files kept
    assert_same(ckpt.params, full_tensors(1))
    assert step_folders(tmp_path) == ["step-00000004"]
    # The progress is the later write's: the epoch ended at this version.
    assert ckpt.manifest["epoch"] is None and ckpt.manifest["epochs_done"] == 1


def test_latest_ignores_a_pointer_to_an_incomplete_folder(tmp_path):
    (tmp_path / JOB / "step-00000009").mkdir(parents=True)  # no manifest.json
    (tmp_path / JOB / "LATEST").write_text("step-00000009\n")
    assert checkpoint.latest(tmp_path, JOB) is None


def test_prune_keeps_the_newest(tmp_path):
    for v in (1, 2, 10, 3):
        write_version(tmp_path, v)

    checkpoint.prune(tmp_path, JOB, keep=2)

    # By version (zero-padded names), not by write order: 10 and 3 were written last.
    assert step_folders(tmp_path) == ["step-00000003", "step-00000010"]
    assert checkpoint.latest(tmp_path, JOB) == tmp_path / JOB / "step-00000010"
    checkpoint.prune(tmp_path, JOB, keep=5)  # fewer than keep: nothing to do
    assert step_folders(tmp_path) == ["step-00000003", "step-00000010"]


# -- corruption and crashes ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_a_corrupted_file_is_detected(tmp_path, name):
    path = write_version(tmp_path, 1)
    f = path / name
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor's data: still a loadable file
    f.write_bytes(bytes(data))

    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.read(path)
    checkpoint.read(path, verify=False)  # it does load: only the digest tells


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_at", [1, 2])  # model.safetensors, optimizer.safetensors
def test_a_crash_mid_write_leaves_no_partial_folder(tmp_path, monkeypatch, fail_at):
    write_version(tmp_path, 1)
    real_save = checkpoint.save_file
    calls = []

    def save_then_crash(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == fail_at:
            Path(filename).write_bytes(b"half a file")  # the crash leaves a partial file
            raise Boom("disk went away")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_then_crash)

    with pytest.raises(Boom):
        write_version(tmp_path, 2)

    assert len(calls) == fail_at
    assert sorted(os.listdir(tmp_path / JOB)) == ["LATEST", "step-00000001"]  # no .tmp-*
    latest = checkpoint.latest(tmp_path, JOB)
    assert latest is not None and latest == tmp_path / JOB / "step-00000001"
    assert_same(checkpoint.read(latest).params, full_tensors(1))


def test_a_crash_rewriting_the_latest_version_keeps_it(tmp_path, monkeypatch):
    write_version(tmp_path, 4, seed=1)
    final = tmp_path / JOB / "step-00000004"
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == final:
            raise Boom("crash before the rename")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    write_version(tmp_path, 4, seed=2)  # kept as it is: no rename onto the complete folder
    monkeypatch.undo()

    latest = checkpoint.latest(tmp_path, JOB)
    assert latest is not None
    assert checkpoint.read(latest).version == 4


# -- re-sharding: gather on one plan, scatter onto another ---------------------------------


def per_shard_state(shards: list[Shard], state: dict[str, dict[str, torch.Tensor]]):
    """What the servers hold: each shard's slice of the moments and the shared 0-d step."""
    return {
        s.shard_id: {
            k: t.clone() if t.dim() == 0 else shard_view(t, s).clone()
            for k, t in state[s.param].items()
        }
        for s in shards
    }


def test_gather_then_scatter_onto_a_different_plan(tmp_path):
    params, state = full_tensors(3), adam_state(3, step=11.0)
    # Two plans that differ in servers and in where tensors are cut.
    two = plan_shards(PARAMS, ["ps-0", "ps-1"], shard_bytes=160)
    three = plan_shards(PARAMS, ["ps-0", "ps-1", "ps-2"], shard_bytes=96)
    assert {s.shard_id for s in two} != {s.shard_id for s in three}

    gathered = checkpoint.gather_state(two, per_shard_state(two, state))
    assert set(gathered) == set(state)
    for name in state:
        # Per-element state is stored flat (it must stay 1-D even for a 0-d parameter).
        flat = {k: v.reshape(-1) if v.dim() else v for k, v in state[name].items()}
        assert_same(gathered[name], flat)

    # Through disk, as the coordinator does on restore.
    path = checkpoint.write(tmp_path, JOB, 9, params, gathered, {})
    ckpt = checkpoint.read(path)
    values, states = checkpoint.scatter_state(three, ckpt.params, ckpt.state)

    assert set(values) == set(states) == {s.shard_id for s in three}
    for s in three:
        assert torch.equal(values[s.shard_id], shard_view(params[s.param], s))
        assert_same(states[s.shard_id], per_shard_state([s], state)[s.shard_id])
    assert_same(assemble(three, values), params)
    for name in state:
        flat = {k: v.reshape(-1) if v.dim() else v for k, v in state[name].items()}
        assert_same(checkpoint.gather_state(three, states)[name], flat)


def test_scatter_without_state_gives_values_only():
    params = full_tensors(4)
    shards = plan_shards(PARAMS, ["a", "b"], shard_bytes=128)
    values, states = checkpoint.scatter_state(shards, params, {})
    assert states == {}
    assert_same(assemble(shards, values), params)


def test_gather_with_state_missing_for_a_shard_is_a_value_error():
    shards = plan_shards(PARAMS, ["a", "b"], shard_bytes=128)
    per_shard = per_shard_state(shards, adam_state(5))
    del per_shard[shards[-1].shard_id]["exp_avg"]
    with pytest.raises(ValueError, match="exp_avg"):
        checkpoint.gather_state(shards, per_shard)


def test_scatter_onto_a_model_of_another_shape_is_a_value_error():
    params = full_tensors(6)
    params["ln_f.weight"] = torch.zeros(9)
    shards = plan_shards(PARAMS, ["a"], shard_bytes=128)
    with pytest.raises(ValueError, match=r"ln_f\.weight"):
        checkpoint.scatter_state(shards, params, {})


ADAMW = OptimizerSettings(kind="adamw", lr=0.05, weight_decay=0.1, beta2=0.99)


def stores_for(shards: list[Shard], params, state, version: int) -> dict[str, ParameterStore]:
    values, states = checkpoint.scatter_state(shards, params, state)
    stores = {}
    for server in sorted({s.server_id for s in shards}):
        mine = [s for s in shards if s.server_id == server]
        store = ParameterStore(server)
        store.load(
            JOB,
            ADAMW,
            mine,
            [(s.shard_id, values[s.shard_id]) for s in mine],
            ["w0"],
            version=version,
            state={s.shard_id: states[s.shard_id] for s in mine} if state else None,
        )
        stores[server] = store
    return stores


def step_all(stores: dict[str, ParameterStore], shards: list[Shard], grads, version: int):
    for server, store in stores.items():
        mine = [s for s in shards if s.server_id == server]
        store.push(
            JOB, "w0", version, 1.0, [(s.shard_id, shard_view(grads[s.param], s)) for s in mine]
        )


def gather_from(stores: dict[str, ParameterStore], shards: list[Shard], version: int):
    values, states = {}, {}
    for store in stores.values():
        snap = store.snapshot(JOB, version, timeout_s=1.0)
        values.update(snap.values)
        states.update(snap.state)
    return assemble(shards, values), checkpoint.gather_state(shards, states)


def test_resume_on_three_servers_matches_continuing_on_two(tmp_path):
    two = plan_shards(PARAMS, ["ps-0", "ps-1"], shard_bytes=160)
    three = plan_shards(PARAMS, ["ps-0", "ps-1", "ps-2"], shard_bytes=96)
    grads = [full_tensors(100 + i) for i in range(4)]
    running = stores_for(two, full_tensors(7), {}, version=0)
    for v in range(3):
        step_all(running, two, grads[v], v)

    params, state = gather_from(running, two, 3)
    ckpt = checkpoint.read(checkpoint.write(tmp_path, JOB, 3, params, state, {}))
    resumed = stores_for(three, ckpt.params, ckpt.state, version=ckpt.version)
    cold = stores_for(three, ckpt.params, {}, version=ckpt.version)  # moments lost
    for stores, shards in [(running, two), (resumed, three), (cold, three)]:
        step_all(stores, shards, grads[3], 3)

    expected = gather_from(running, two, 4)[0]
    assert_same(gather_from(resumed, three, 4)[0], expected)
    cold_params = gather_from(cold, three, 4)[0]
    assert not all(torch.equal(cold_params[k], expected[k]) for k in expected)


# -- a scalar parameter --------------------------------------------------------------------


def test_resume_with_a_scalar_parameter():
    shards = plan_shards([ParamInfo("w", (4, 3), True), ParamInfo("scale", (), False)], ["a"])
    store = ParameterStore("a")
    g = torch.Generator().manual_seed(0)
    init = [(s.shard_id, torch.randn(s.numel, generator=g)) for s in shards]
    store.load(JOB, ADAMW, shards, init, ["w0"])
    store.push(JOB, "w0", 0, 1.0, [(s.shard_id, torch.ones(s.numel)) for s in shards])
    snap = store.snapshot(JOB, 1, timeout_s=1.0)

    gathered = checkpoint.gather_state(shards, snap.state)
    values, states = checkpoint.scatter_state(shards, assemble(shards, snap.values), gathered)
    restored = ParameterStore("a")
    restored.load(JOB, ADAMW, shards, list(values.items()), ["w0"], version=1, state=states)
    for s in (store, restored):
        s.push(JOB, "w0", 1, 1.0, [(sh.shard_id, torch.full((sh.numel,), 0.5)) for sh in shards])

    _, expected = store.pull(JOB, 2, [], timeout_s=1.0)
    _, got = restored.pull(JOB, 2, [], timeout_s=1.0)
    assert_same(dict(got), dict(expected))


def test_manifest_is_json_with_the_digests(tmp_path):
    path = write_version(tmp_path, 12)
    manifest = json.loads((path / "manifest.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest

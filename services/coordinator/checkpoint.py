"""Consistent checkpoints on disk, independent of how parameters are sharded.

A checkpoint is a folder `ROOT/JOB/step-00000042/` with
  model.safetensors      full parameters by name (fp32)
  optimizer.safetensors  optimizer state by "<param>::<key>" (exp_avg, step, ...)
  manifest.json          version, epoch progress, servers, workers, sha256 of both files
Each folder is written under a temporary name, fsynced and renamed; `ROOT/JOB/LATEST` names
the newest complete one and is replaced atomically too, so a crash at any point leaves the
previous checkpoint intact. Because tensors are stored whole, a checkpoint restores into
any number of parameter servers (re-sharding on load), as torch.distributed.checkpoint's
resharding loads a checkpoint into a different world size, and TF2 ParameterServerStrategy
restores variables into a new set of parameter servers. Pure: no gRPC.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmps.core.files import atomic_write_text, fsync_dir
from lmps.core.partition import Shard, assemble, shard_view

SEP = "::"
StateByShard = Mapping[str, Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    version: int
    params: dict[str, torch.Tensor]  # name -> full fp32 tensor
    state: dict[str, dict[str, torch.Tensor]]  # name -> optimizer key -> tensor
    manifest: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gather_state(
    shards: Sequence[Shard], state: StateByShard
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-shard optimizer state -> per-parameter state. Per-element state (1-D per shard)
    is assembled and stored flat, (numel,), so that it stays 1-D even for a 0-d parameter;
    per-shard scalars (0-d, like AdamW's `step`) are shared by the parameter's shards."""
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    keys = {k for st in state.values() for k in st}
    for key in sorted(keys):
        vectors = {
            s.shard_id: state[s.shard_id][key] for s in shards if key in state.get(s.shard_id, {})
        }
        if len(vectors) != len(shards):
            raise ValueError(f"optimizer state {key!r} is missing for some shards")
        scalars = {sid: v for sid, v in vectors.items() if v.dim() == 0}
        if scalars:
            for s in shards:
                by_param.setdefault(s.param, {})[key] = scalars[s.shard_id].clone()
        else:
            for name, full in assemble(shards, vectors).items():
                by_param.setdefault(name, {})[key] = full.reshape(-1)
    return by_param


def scatter_state(
    shards: Sequence[Shard],
    params: Mapping[str, torch.Tensor],
    state: Mapping[str, Mapping[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Full parameters and state -> (value, state) per shard of a (possibly new) shard plan."""
    values: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for s in shards:
        full = params[s.param]
        if tuple(full.shape) != s.param_shape:
            raise ValueError(
                f"{s.param}: checkpoint shape {tuple(full.shape)} != model {s.param_shape}"
            )
        values[s.shard_id] = shard_view(full.contiguous(), s).clone()
        st = {}
        for key, t in state.get(s.param, {}).items():
            if t.dim() == 0:
                st[key] = t.clone()
            else:  # flat (or, in older checkpoints, parameter-shaped) per-element state
                st[key] = shard_view(t.reshape(s.param_shape).contiguous(), s).clone()
        if st:
            states[s.shard_id] = st
    return values, states


def write(
    root: Path,
    job_id: str,
    version: int,
    params: Mapping[str, torch.Tensor],
    state: Mapping[str, Mapping[str, torch.Tensor]],
    manifest: Mapping[str, Any],
) -> Path:
    """Write a checkpoint atomically; returns its folder. Older ones are kept (see prune)."""
    job_dir = root / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    final = job_dir / f"step-{version:08d}"
    tmp = job_dir / f".tmp-step-{version:08d}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in params.items()}, str(tmp / "model.safetensors"))
        flat = {
            f"{name}{SEP}{key}": t.contiguous()
            for name, st in state.items()
            for key, t in st.items()
        }
        save_file(flat, str(tmp / "optimizer.safetensors"))
        for name in ("model.safetensors", "optimizer.safetensors"):
            with (tmp / name).open("rb") as f:
                os.fsync(f.fileno())
        full_manifest = {
            **manifest,
            "job_id": job_id,
            "version": version,
            "created": time.time(),
            "sha256": {n: _sha256(tmp / n) for n in ("model.safetensors", "optimizer.safetensors")},
        }
        atomic_write_text(tmp / "manifest.json", json.dumps(full_manifest, indent=2) + "\n")
        fsync_dir(tmp)
        if (final / "manifest.json").exists():
            # The same version again (a mid-epoch checkpoint that is also the epoch's end, or
            # a restart): the snapshot of a version is the same, so keep the tensors on disk
            # rather than delete a complete checkpoint that LATEST may point at. The manifest
            # is the new one, though: written later, it knows more (the epoch ended), and a
            # restarted coordinator must not find a finished epoch still to be run.
            shutil.rmtree(tmp)
            kept = {n: _sha256(final / n) for n in ("model.safetensors", "optimizer.safetensors")}
            text = json.dumps({**full_manifest, "sha256": kept}, indent=2) + "\n"
            atomic_write_text(final / "manifest.json", text)
            return final
        if final.exists():  # an incomplete folder (no manifest) from a crash: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(job_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    current = latest(root, job_id)
    if current is None or version_of(current) <= version:
        atomic_write_text(job_dir / "LATEST", final.name + "\n")
    return final


def version_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def latest(root: Path, job_id: str) -> Path | None:
    pointer = root / job_id / "LATEST"
    if not pointer.exists():
        return None
    path = root / job_id / pointer.read_text().strip()
    return path if (path / "manifest.json").exists() else None


def read(path: Path, verify: bool = True) -> Checkpoint:
    manifest = json.loads((path / "manifest.json").read_text())
    if verify:
        for name, digest in manifest["sha256"].items():
            if _sha256(path / name) != digest:
                raise ValueError(f"checkpoint {path}: {name} is corrupt (sha256 mismatch)")
    params = load_file(str(path / "model.safetensors"))
    state: dict[str, dict[str, torch.Tensor]] = {}
    for flat, t in load_file(str(path / "optimizer.safetensors")).items():
        name, key = flat.rsplit(SEP, 1)
        state.setdefault(name, {})[key] = t
    return Checkpoint(path, int(manifest["version"]), params, state, manifest)


def prune(root: Path, job_id: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of a job, and the temporary folders a
    crashed process left half-written (`write` removes its own when it fails)."""
    job_dir = root / job_id
    steps = sorted(job_dir.glob("step-*"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in job_dir.glob(".tmp-step-*"):
        # .tmp-step-VERSION-PID-NS: another PID's is a dead process's (one coordinator per
        # state dir); this process's may be a checkpoint being written right now.
        parts = tmp.name.split("-")
        if len(parts) == 5 and parts[3] != str(os.getpid()):
            shutil.rmtree(tmp, ignore_errors=True)


def remove_jobs(root: Path, job_ids: Sequence[str]) -> None:
    """Delete the folders of jobs under root: their data, spec and every checkpoint."""
    for job_id in job_ids:
        if Path(job_id).name != job_id or job_id in ("", ".", ".."):
            continue  # an id from a hand-edited job.json: never a path outside root
        shutil.rmtree(root / job_id, ignore_errors=True)

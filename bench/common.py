"""Shared pieces: run context, timing by medians, machine facts, JSON results."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google.protobuf
import grpc
import torch
from rich.console import Console


@dataclass(frozen=True)
class Context:
    """What every benchmark's `run` gets."""

    quick: bool
    """Reduced sizes and repeats (the whole suite in under ~2 minutes)."""
    console: Console
    """Where tables and progress go."""
    out_dir: Path
    """Results land in `out_dir/<name>.json`; cluster logs under `out_dir/logs/<name>`."""
    stack: ExitStack = field(default_factory=ExitStack)
    """Closed when the whole run ends: for resources benchmarks share (see `bench.ps`)."""
    shared: dict[str, object] = field(default_factory=dict)
    """Those shared resources, by name."""
    large: bool = False
    """`--large`: `peers` adds the gpt2 preset (for machines with cores and memory)."""

    def log_dir(self, name: str) -> Path:
        path = self.out_dir / "logs" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: Sequence[float]) -> float:
    """(max - min) / median: how noisy a set of repeats was."""
    if len(xs) < 2:
        return 0.0
    m = median(xs)
    return (max(xs) - min(xs)) / m if m else float("nan")


def time_per_call(fn: Callable[[], object], min_s: float) -> float:
    """Seconds per call of `fn`, calling it enough times back to back to fill `min_s`.

    One untimed call first sizes the loop (and warms caches), so a sample of a fast call is
    not dominated by timer resolution or a single scheduler hiccup.
    """
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    loops = max(1, int(min_s / once))
    t0 = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t0) / loops


def mb_per_s(nbytes: int, seconds: float) -> float:
    """Throughput in MB/s (10^6 bytes)."""
    return nbytes / seconds / 1e6 if seconds > 0 else float("nan")


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def environment() -> dict[str, Any]:
    """Facts that make a result interpretable later: cores, load, versions."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grpc": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "git": _git_describe(),
    }


def _git_describe() -> str:
    """HEAD's commit, with "+dirty" when the working tree has changes; "" outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def write_result(ctx: Context, name: str, payload: dict[str, Any]) -> Path:
    """Write `runs/bench/<name>.json` with the environment at the start and the end."""
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.out_dir / f"{name}.json"
    doc = {"name": name, "quick": ctx.quick, **payload, "environment_end": environment()}
    path.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")

"""Start a contender's processes, each in a Unix session of its own, and collect results.

With `sched_autogroup` on (as here), the kernel shares the CPUs fairly between sessions
first, so a contender whose processes shared one session would get less of a busy machine
than lmps, whose `LocalCluster` starts every process with `start_new_session=True`. Every
process here is started the same way.

Each process writes its own JSON result (`--result`). CPU time of the whole run, startup
included, comes from `getrusage(RUSAGE_CHILDREN)` around it: a session of its own does not
stop a process from being this one's child, and every one of them is waited for.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POLL_S = 0.2


@dataclass(frozen=True)
class Launched:
    results: list[dict[str, Any]]
    """Each process's JSON, in the order of the commands."""
    wall_s: float
    """Start of the first process to the exit of the last."""
    cpu_s: float
    """User + system CPU of all of them over their whole lives (imports and setup too)."""


def children_cpu() -> float:
    """User + system CPU seconds of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_all(
    name: str,
    commands: list[list[str]],
    log_dir: Path,
    threads: list[int],
    timeout_s: float,
) -> Launched:
    """Run `commands` at once (command i with `threads[i]` OpenMP threads, `--result`
    appended) until all exit; any failure stops the rest and raises with its log's tail."""
    log_dir.mkdir(parents=True, exist_ok=True)
    results = [log_dir / f"{name}-{i}.json" for i in range(len(commands))]
    logs = [log_dir / f"{name}-{i}.log" for i in range(len(commands))]
    for path in results:
        path.unlink(missing_ok=True)
    cpu0, t0 = children_cpu(), time.perf_counter()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cmd, n, result, log in zip(commands, threads, results, logs, strict=True):
            env = {
                **os.environ,
                "OMP_NUM_THREADS": str(n),
                # gloo and TensorPipe pick their interface from the host name otherwise,
                # which need not be reachable in a container.
                "GLOO_SOCKET_IFNAME": "lo",
                "TP_SOCKET_IFNAME": "lo",
                "PYTHONUNBUFFERED": "1",
            }
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [*cmd, "--result", str(result)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                )
        _wait(name, procs, logs, time.monotonic() + timeout_s)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    return Launched([json.loads(r.read_text()) for r in results], wall, cpu)


def _wait(
    name: str, procs: list[subprocess.Popen[bytes]], logs: list[Path], deadline: float
) -> None:
    # Poll all of them: a rank that dies leaves the others blocked in a collective, so
    # waiting on them one by one would only notice at the deadline.
    while True:
        codes = [p.poll() for p in procs]
        for i, code in enumerate(codes):
            if code not in (None, 0):
                tail = logs[i].read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} process {i} exited with {code}:\n{tail}")
        if all(code == 0 for code in codes):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not finish in time (logs: {logs[0].parent})")
        time.sleep(POLL_S)

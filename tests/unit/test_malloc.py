"""`tune_malloc`: what it changes, checked on page faults in a fresh interpreter.

Each check runs in a process of its own: mallopt settings are process-wide and cannot be
undone, and the test process's heap is not the one a worker starts with.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB, as a worker's logits and
# their gradient are) allocated, written and freed CYCLES times: the minor page faults of
# each allocation. Prints null for "tuned" where there is no glibc.
_PROBE = """
import json, resource, sys, torch
from lmps.rpc.malloc import tune_malloc
mode = sys.argv[1]
tuned = None if mode == "default" else tune_malloc(heap_only=mode == "heap_only")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
out = []
for _ in range(int(sys.argv[2])):
    before = faults()
    t = torch.ones(16 << 20)
    out.append(faults() - before)
    del t
print(json.dumps({"tuned": tuned, "faults": out}))
"""

PAGES = (64 << 20) // 4096
CYCLES = 20


def _faults(mode: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, str(CYCLES)],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(out.stdout)
    if got["tuned"] is False:
        pytest.skip("no glibc mallopt here (musl, macOS): tune_malloc leaves malloc alone")
    return [int(n) for n in got["faults"]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_heap_only_reuses_a_freed_large_block_instead_of_faulting_it_in() -> None:
    # glibc's default and the servers' setting: a block this large is a fresh mapping every
    # time, each page faulted in again (the check that the probe can fail).
    for mode in ("default", "shared"):
        late = _faults(mode)[CYCLES // 2 :]
        assert min(late) > PAGES // 2, mode
    # The worker's: from the heap, reused once a freed one has merged with its neighbour
    # (a few cycles: torch's 64-byte alignment needs a little more than the block's size).
    late = _faults("heap_only")[-5:]
    assert max(late) < PAGES // 16, late

"""glibc malloc settings for the serving processes (parameter server, worker).

Each step a server allocates and frees tens of shard-sized blocks (wire bytes, fp32 means,
optimizer temporaries, pull encodings). glibc's defaults hurt both ways:
- from 128 KiB up a block is its own mapping until the first such free raises the threshold
  (dynamically, up to 32 MiB); with the threshold pinned at 128 KiB every block is mmap'ed,
  page-faulted byte by byte and unmapped again: perf showed ~40% of a parameter server's
  CPU in page faults, page clearing and unmapping;
- blocks that come from the heap come from one arena per thread, and the many gRPC handler
  threads each keep their own freed shard-sized blocks: RSS grows with the threads.
So: one arena (M_ARENA_MAX 1; the handlers are GIL-bound anyway, so the arena lock costs
nothing measurable) and a fixed threshold at glibc's maximum (32 MiB: shards are far smaller,
so they are reused from the heap instead of faulted in again). `python -m bench ps_memory`-
style run, small preset, 2 servers, 2 workers, 40 steps: server CPU 19.2-19.8 s -> 10.4-11.4 s;
peak RSS growth 218-246 -> 217-233 MiB (2 x state + one step's gradients: 210-213).
"""

from __future__ import annotations

import ctypes

MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
ARENA_MAX = 1
# <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc() -> bool:
    """Apply ARENA_MAX and MMAP_THRESHOLD; False where there is no glibc (musl, macOS:
    malloc is left alone). Call before the first large allocation."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        arenas = libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
        return bool(arenas and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False

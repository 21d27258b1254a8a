"""glibc malloc settings for the serving processes (parameter server, worker).

Each step a server allocates and frees tens of shard-sized blocks (wire bytes, fp32 means,
optimizer temporaries, pull encodings). glibc's defaults hurt both ways:
- from 128 KiB up a block is its own mapping until the first such free raises the threshold
  (dynamically, up to 32 MiB); with the threshold pinned at 128 KiB every block is mmap'ed,
  page-faulted byte by byte and unmapped again: perf showed ~40% of a parameter server's
  CPU in page faults, page clearing and unmapping;
- blocks that come from the heap come from one arena per thread, and the many gRPC handler
  threads each keep their own freed shard-sized blocks: RSS grows with the threads.
- pinning the mmap threshold also pins the trim threshold at its 128 KiB default: whenever
  a step's blocks at the top of the heap are freed, glibc hands the pages back to the kernel
  and the next step faults them in again (a `small` 1 worker + 1 server run: 9k page faults
  per step on the server; a worker pulling and pushing 56 MB per step: similar).
- blocks above even glibc's largest threshold (32 MiB) are always their own mappings: a
  worker's activations and their gradients are (the `small` preset's logits at batch 8 are
  67 MB, and so is their gradient), so every step faulted in and cleared ~290 MB of fresh
  pages (70k minor faults per step, 6% of the step's CPU in the kernel).
So: one arena (M_ARENA_MAX 1; the handlers are GIL-bound anyway, so the arena lock costs
nothing measurable), a fixed threshold at glibc's maximum (32 MiB: shards are far smaller,
so they are reused from the heap instead of faulted in again) and a trim threshold of
TRIM_THRESHOLD (free memory at the heap's top is kept up to that much: a step's worth of
blocks stays mapped for the next step; the peak RSS is the same, the RSS between steps
stays nearer it). Both serving processes (parameter server and worker) call it; the worker
with `heap_only` (M_MMAP_MAX 0: no block is a mapping of its own, so a step's freed
activations serve the next step's; glibc still maps memory when the heap cannot grow).
`heap_only` costs some peak memory: torch asks for 64-byte-aligned blocks, which a freed
block of the same size cannot serve until it has merged with a free neighbour, so a few
steps' worth of blocks of one size may sit free in the heap before they are reused (a
64 MiB block allocated and freed in a loop: reused from the fourth time on). A parameter
server's blocks are shard-sized, far below 32 MiB: it keeps the default.
The first two, measured in a `python -m bench ps_memory`-style run (small preset, 2 servers,
2 workers, 40 steps): server CPU 19.2-19.8 s -> 10.4-11.4 s; peak RSS growth 218-246 ->
217-233 MiB (2 x state + one step's gradients: 210-213).
`heap_only`, measured on `small`'s forward + backward at batch 8, one thread, 4 interleaved
runs of 6 steps each: 69-74k -> 1.7-4.8k minor faults per step, system CPU 0.14-0.18 ->
0.02-0.05 s and CPU 2.38-2.45 -> 2.13-2.22 s per step; peak RSS 939 -> 986 MiB.
"""

from __future__ import annotations

import ctypes

MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
MMAP_MAX = 0  # blocks that may be mappings of their own at once: none
ARENA_MAX = 1
TRIM_THRESHOLD = 512 << 20
# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def tune_malloc(*, heap_only: bool = False) -> bool:
    """Apply ARENA_MAX, MMAP_THRESHOLD and TRIM_THRESHOLD, and with `heap_only` MMAP_MAX;
    False where there is no glibc (musl, macOS: malloc is left alone). Call before the
    first large allocation."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        arenas = libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
        mmap = arenas and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        mmap = mmap and (not heap_only or libc.mallopt(_M_MMAP_MAX, MMAP_MAX))
        return bool(mmap and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False

"""lmps benchmarks: ratios against baselines measured in the same process tree.

Run with `make bench` or `python -m bench [--quick] [NAME ...]`; see docs/benchmarks.md.
Every benchmark prints a table and writes `runs/bench/<name>.json`. Figures on a shared
2-core machine are noisy, so each one is a median over repeats, and the interesting number is
always a ratio between two things timed side by side, never an absolute.
"""

from __future__ import annotations

BENCHMARKS: dict[str, str] = {
    "codec": "lmps.rpc.codec round trip vs torch.save and protobuf `repeated float`",
    "shards": "pull+push rounds against 2 real parameter servers per shard size",
    "training": "tokens/s of a 2-server, 2-worker cluster vs one torch process",
    "wire_dtype": "pull+push rounds with bfloat16 vs float32 on the wire",
    "ps_memory": "parameter-server peak RSS growth vs state held (small, AdamW, 2 workers)",
    "barrier": "a SYNC step's mean at the barrier (as built) vs accumulated on arrival, W = 2",
    "peers": "lmps vs torch (1 / N threads), DDP and a torch.distributed.rpc PS: same job",
    "wire": "GB/s of the small model's bytes: lmps Pull/Push vs bare grpcio vs raw TCP",
    "scaling": "lmps SYNC vs DDP at W = 1, 2, 4 workers: step time, CPU, bytes per step",
    "slowlink": "lmps vs DDP on 100 Mbit/s shaped links (netns + tbf): loss vs time and bytes",
}
"""Benchmark name -> one line on what it measures. Each name is a module of this package."""

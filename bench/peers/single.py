"""Contender: one torch process, the whole global batch per step, AdamW in place.

`python -m bench.peers.single --job JSON --threads N --result FILE`
"""

from __future__ import annotations

import sys
import time

import torch

from bench.peers.job import (
    adamw,
    build_model,
    child_parser,
    cpu_now,
    forward_backward,
    load_sequences,
    step_rows,
    write_json,
)


def main(argv: list[str] | None = None) -> int:
    args = child_parser("bench.peers.single").parse_args(argv)
    job = args.job
    torch.set_num_threads(args.threads)
    sequences = load_sequences(job)
    model = build_model(job)
    opt = adamw(model, job)
    losses: list[float] = []
    t0 = cpu0 = 0.0
    for step in range(job.steps):
        if step == job.warmup_steps:
            t0, cpu0 = time.perf_counter(), cpu_now()
        batch = sequences[torch.cat(step_rows(job, step, 1))]
        opt.zero_grad()
        losses.append(forward_backward(model, batch))
        opt.step()
    wall, cpu = time.perf_counter() - t0, cpu_now() - cpu0
    write_json(
        args.result,
        {"role": "single", "threads": args.threads, "wall_s": wall, "cpu_s": cpu, "losses": losses},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

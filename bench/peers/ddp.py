"""Contender: torch DistributedDataParallel over gloo, W processes on 127.0.0.1.

`python -m bench.peers.ddp --job JSON --rank R --world W --port P --threads T --result FILE`

Each rank trains its G/W rows of every global step (`step_rows`); DDP all-reduces the
gradients (mean over ranks, which is the global batch's gradient: the loss is a per-token
mean over equal-length sequences) and every rank runs the same AdamW. The timed window opens
and closes on a `dist.barrier()`, so all ranks measure the same span. After it, every rank
compares its parameters with rank 0's: DDP that trains correctly keeps them identical.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

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
    parser = child_parser("bench.peers.ddp")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="rank 0's TCP store")
    args = parser.parse_args(argv)
    job = args.job
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=args.rank,
        world_size=args.world,
    )
    try:
        sequences = load_sequences(job)
        model = build_model(job)  # same seed everywhere; DDP also broadcasts rank 0's
        ddp = DistributedDataParallel(model)
        opt = adamw(model, job)
        losses: list[float] = []
        t0 = cpu0 = 0.0
        for step in range(job.steps):
            if step == job.warmup_steps:
                dist.barrier()
                t0, cpu0 = time.perf_counter(), cpu_now()
            batch = sequences[step_rows(job, step, args.world)[args.rank]]
            opt.zero_grad()
            losses.append(forward_backward(ddp, batch))
            opt.step()
        dist.barrier()
        wall, cpu = time.perf_counter() - t0, cpu_now() - cpu0

        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        diff = float((flat - reference).abs().max())
    finally:
        dist.destroy_process_group()
    write_json(
        args.result,
        {
            "role": f"rank{args.rank}",
            "threads": args.threads,
            "wall_s": wall,
            "cpu_s": cpu,
            "losses": losses,  # this rank's own rows; the global loss is the mean over ranks
            "max_abs_diff_vs_rank0": diff,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

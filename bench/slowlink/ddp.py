"""Contender: torch DDP over gloo, one rank per worker namespace, across the shaped links.

`ip netns exec NS python -m bench.slowlink.ddp --job JSON --rank R --world W
 --master IP:PORT --ifname IF --threads T --result FILE`

Rank 0's TCP store listens on its namespace's address; gloo binds to `--ifname` (the
namespace's shaped link), so every all-reduce byte crosses two shaped links. Each rank
trains its G/W rows of every step (`step_rows`, lmps's rows) for `epochs` epochs; AdamW as
lmps's servers run it. The eval split is scored before the first step and after every
epoch, split over the ranks as lmps's coordinator splits it over workers (`tensor_split`),
sums all-reduced. Times are `time.time()`, comparable with the bench process's byte samples.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bench.peers.job import cpu_now, forward_backward, write_json
from bench.slowlink.job import SlowJob, adamw, build_model, eval_sums, split_tokens, step_rows
from lmps.core.data import to_sequences


def evaluate(model: nn.Module, evals: torch.Tensor, rank: int, world: int) -> float:
    part = torch.tensor_split(evals, world)[rank]
    loss_sum, count = eval_sums(model, part) if part.shape[0] else (0.0, 0)
    sums = torch.tensor([loss_sum, float(count)], dtype=torch.float64)
    dist.all_reduce(sums)
    return float(sums[0] / sums[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slowlink.ddp")
    parser.add_argument("--job", required=True, type=SlowJob.from_json)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--master", required=True, help="rank 0's TCP store, IP:PORT")
    parser.add_argument("--ifname", required=True, help="the interface gloo binds to")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    job: SlowJob = args.job
    torch.set_num_threads(args.threads)
    os.environ["GLOO_SOCKET_IFNAME"] = args.ifname
    dist.init_process_group(
        "gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=args.world
    )
    try:
        train, eval_tokens = split_tokens(job)
        sequences = to_sequences(train, job.config.block_size)
        evals = to_sequences(eval_tokens, job.config.block_size)
        model = build_model(job)  # same seed everywhere; DDP also broadcasts rank 0's
        ddp = DistributedDataParallel(model)
        opt = adamw(model, job)
        first_eval = evaluate(model, evals, args.rank, args.world)
        dist.barrier()
        t0, cpu0 = time.time(), cpu_now()
        evals_at: list[list[float]] = [[t0, t0, 0, first_eval]]
        step_times: list[float] = []
        losses: list[float] = []
        for epoch in range(job.epochs):
            for k in range(job.steps_per_epoch):
                batch = sequences[step_rows(job, epoch, k, args.world)[args.rank]]
                opt.zero_grad()
                losses.append(forward_backward(ddp, batch))
                opt.step()
                step_times.append(time.time())
            begun = time.time()
            loss = evaluate(model, evals, args.rank, args.world)
            evals_at.append([begun, time.time(), (epoch + 1) * job.steps_per_epoch, loss])
        dist.barrier()
        t1, cpu1 = time.time(), cpu_now()
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
            "t0": t0,
            "t1": t1,
            "cpu_s": cpu1 - cpu0,
            "step_times": step_times,
            "losses": losses,  # this rank's rows; the global batch's loss is the ranks' mean
            "evals": evals_at,  # [eval begun, eval done, steps done, eval loss]
            "max_abs_diff_vs_rank0": diff,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

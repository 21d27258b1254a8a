"""Contender: a torch.distributed.rpc parameter server, as in PyTorch's tutorial
"Implementing Batch RPC Processing Using Asynchronous Executions" (its
`BatchUpdateParameterServer`): rank 0 holds the parameters and the optimizer, ranks 1..W
train.

`python -m bench.peers.rpc_ps --job JSON --rank R --world W+1 --port P --threads T --result F`

A trainer computes the gradient of its G/W rows and calls `update_and_fetch` on the server,
an `@rpc.functions.async_execution` function: the server adds the gradient and hands back a
future; the W-th gradient of a step divides the sum by W, runs AdamW and completes that
future with the new parameters, so every trainer of the step gets the same weights back
(synchronous, like lmps's SYNC barrier). The tutorial returns the whole `nn.Module`; here
the parameter tensors, the same bytes without pickling the module around them.

Tensors go over TCP (TensorPipe's `uv` transport, `basic` channel), as they would between
hosts and as lmps's and gloo's do here; on one host TensorPipe would otherwise pick shared
memory and cross-memory attach, which no multi-host deployment gets.

The server notes the time and its CPU time when it applies the last warm-up update and the
last update; the trainers time the same span, from receiving those weights to receiving
the final ones.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import torch
import torch.distributed.rpc as rpc
from torch import Tensor
from torch.futures import Future

from bench.peers.job import (
    PeerJob,
    adamw,
    build_model,
    child_parser,
    cpu_now,
    forward_backward,
    load_sequences,
    step_rows,
    write_json,
)

SERVER = "ps"
RPC_TIMEOUT_S = 600.0  # a step on a busy machine (or gpt2 on CPU) can take minutes


class BatchUpdateParameterServer:
    """The parameters, their AdamW, and the step's pending gradient sum."""

    def __init__(self, job: PeerJob, trainers: int) -> None:
        self.job = job
        self.trainers = trainers
        self.model = build_model(job)
        self.opt = adamw(self.model, job)
        self.params = list(self.model.parameters())
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.lock = threading.Lock()
        self.future: Future[list[Tensor]] = Future()
        self.pending = 0
        self.updates = 0
        self.marks: dict[str, tuple[float, float]] = {}

    def weights(self) -> list[Tensor]:
        return [p.detach() for p in self.params]

    def add(self, grads: list[Tensor]) -> Future[list[Tensor]]:
        with self.lock:
            for p, g in zip(self.params, grads, strict=True):
                assert p.grad is not None
                p.grad += g
            self.pending += 1
            fut = self.future
            if self.pending == self.trainers:
                for p in self.params:
                    assert p.grad is not None
                    p.grad /= self.trainers
                self.opt.step()
                for p in self.params:
                    assert p.grad is not None
                    p.grad.zero_()
                self.pending = 0
                self.updates += 1
                if self.updates in (self.job.warmup_steps, self.job.steps):
                    which = "start" if self.updates == self.job.warmup_steps else "end"
                    self.marks[which] = (time.perf_counter(), cpu_now())
                # The trainers of the next step need these weights first, so nothing
                # changes them while the responses are being sent.
                fut.set_result(self.weights())
                self.future = Future()
        return fut


_server: BatchUpdateParameterServer | None = None
"""The server object, in the server process only (functions called by RPC reach it here)."""


def _the_server() -> BatchUpdateParameterServer:
    if _server is None:
        raise RuntimeError("update_and_fetch called outside the parameter-server process")
    return _server


def fetch() -> list[Tensor]:
    """The current parameters (a trainer's first call)."""
    return _the_server().weights()


@rpc.functions.async_execution
def update_and_fetch(grads: list[Tensor]) -> Future[list[Tensor]]:
    """One trainer's gradient; completes when the step's update is applied."""
    return _the_server().add(grads)


def _options(port: int) -> rpc.TensorPipeRpcBackendOptions:
    return rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{port}",
        rpc_timeout=RPC_TIMEOUT_S,
        _transports=["uv"],
        _channels=["basic"],
    )


def serve(job: PeerJob, world: int, port: int) -> dict[str, Any]:
    global _server
    _server = BatchUpdateParameterServer(job, trainers=world - 1)
    rpc.init_rpc(SERVER, rank=0, world_size=world, rpc_backend_options=_options(port))
    rpc.shutdown()  # graceful: returns once every trainer has finished and shut down too
    (t0, cpu0), (t1, cpu1) = _server.marks["start"], _server.marks["end"]
    return {"role": SERVER, "wall_s": t1 - t0, "cpu_s": cpu1 - cpu0, "updates": _server.updates}


def train(job: PeerJob, rank: int, world: int, port: int) -> dict[str, Any]:
    rpc.init_rpc(f"trainer{rank}", rank=rank, world_size=world, rpc_backend_options=_options(port))
    sequences = load_sequences(job)
    model = build_model(job)
    params = list(model.parameters())

    def load(values: list[Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(params, values, strict=True):
                p.copy_(v)

    load(rpc.rpc_sync(SERVER, fetch))
    losses: list[float] = []
    t0 = cpu0 = 0.0
    for step in range(job.steps):
        if step == job.warmup_steps:
            t0, cpu0 = time.perf_counter(), cpu_now()
        batch = sequences[step_rows(job, step, world - 1)[rank - 1]]
        model.zero_grad(set_to_none=False)
        losses.append(forward_backward(model, batch))
        grads = [p.grad for p in params]
        load(rpc.rpc_sync(SERVER, update_and_fetch, args=(grads,)))
    wall, cpu = time.perf_counter() - t0, cpu_now() - cpu0
    rpc.shutdown()
    return {"role": f"trainer{rank}", "wall_s": wall, "cpu_s": cpu, "losses": losses}


def main(argv: list[str] | None = None) -> int:
    parser = child_parser("bench.peers.rpc_ps")
    parser.add_argument("--rank", type=int, required=True, help="0 = the parameter server")
    parser.add_argument("--world", type=int, required=True, help="trainers + 1")
    parser.add_argument("--port", type=int, required=True, help="rank 0's TCP store")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rank == 0:
        out = serve(args.job, args.world, args.port)
    else:
        out = train(args.job, args.rank, args.world, args.port)
    write_json(args.result, {**out, "threads": args.threads})
    return 0


if __name__ == "__main__":
    # RPC names functions by module path: run the imported `bench.peers.rpc_ps`, not this
    # `__main__` copy, so `_server` and `update_and_fetch` are the ones the callers name.
    from bench.peers import rpc_ps

    sys.exit(rpc_ps.main())

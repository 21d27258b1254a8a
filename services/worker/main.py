"""`lmps serve worker`: run one worker."""

from __future__ import annotations

import argparse

from lmps.rpc.bootstrap import Service, advertised_address, run_until_signal, start_server
from lmps.rpc.flags import (
    HelpFormatter,
    add_serve_flags,
    env,
    run_service,
    serve_options,
    setup_logging,
)
from lmps.rpc.malloc import tune_malloc
from lmps.rpc.metrics import process_registry
from lmps.rpc.registration import Registration
from lmps.v1 import coordinator_pb2, worker_pb2_grpc


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="lmps serve worker", formatter_class=HelpFormatter
    )
    parser.epilog = "example:\n  lmps serve worker --coordinator coord:50051 --device cuda"
    parser.description = (
        "Run a worker: a model replica (CPU or CUDA) that leases data shards from the "
        "coordinator, pulls parameters from every server and pushes gradients back."
    )
    add_serve_flags(parser, port=50071, metrics_port=9102, member=True)
    parser.add_argument(
        "--device",
        default=env("LMPS_DEVICE", "auto"),
        help="auto (CUDA when present), cpu, cuda, cuda:N (LMPS_DEVICE)",
    )
    return parser


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    args = args or build_parser().parse_args(argv)
    # Imported here, not at the top: `build_parser` (every `--help`) stays torch-free.
    from lmps.services.worker.metrics import WorkerMetrics
    from lmps.services.worker.servicer import WorkerServicer

    setup_logging(args.log_level)
    # Before the first pull or activation is allocated; activations above 32 MiB come from
    # the heap too (see lmps.rpc.malloc).
    tune_malloc(heap_only=True)
    metrics = process_registry()  # this role's series only (docs/metrics.md)
    servicer = WorkerServicer(
        worker_id=args.id,
        coordinator=args.coordinator,
        device=args.device,
        metrics=WorkerMetrics(metrics),
    )
    running = start_server(
        serve_options(args),
        [
            Service(
                "lmps.v1.WorkerService",
                worker_pb2_grpc.add_WorkerServiceServicer_to_server,
                servicer,
            )
        ],
        registry=metrics,
    )
    address = advertised_address(args.host, running.port, args.advertise)
    member = Registration(args.coordinator, coordinator_pb2.WORKER, address, args.id)
    servicer.worker_id = member.register()
    member.start()
    running.on_stop.append(member.stop)
    return run_until_signal(running)


if __name__ == "__main__":
    raise SystemExit(run_service(main, "lmps serve worker"))

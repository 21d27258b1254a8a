"""`lmps serve coordinator`: run the coordinator."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmps.rpc.bootstrap import Service, run_until_signal, start_server
from lmps.rpc.flags import (
    HelpFormatter,
    add_serve_flags,
    env,
    env_number,
    run_service,
    serve_options,
    setup_logging,
)
from lmps.rpc.metrics import process_registry


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="lmps serve coordinator", formatter_class=HelpFormatter
    )
    parser.epilog = "example:\n  lmps serve coordinator --port 50051 --state-dir .lmps/coordinator"
    parser.description = (
        "Run the coordinator: membership, shard map, data leases, jobs and epochs. "
        "Parameter servers and workers register with it; `lmps train` talks only to it."
    )
    add_serve_flags(parser, port=50051, metrics_port=9100, member=False)
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=env_number("LMPS_HEARTBEAT_S", 2.0, float),
        help="seconds between member heartbeats (LMPS_HEARTBEAT_S)",
    )
    parser.add_argument(
        "--expiry",
        type=float,
        default=env_number("LMPS_EXPIRY_S", 10.0, float),
        help="a member missing heartbeats this long is considered dead (LMPS_EXPIRY_S)",
    )
    parser.add_argument(
        "--state-dir",
        default=env("LMPS_STATE_DIR", ".lmps/coordinator"),
        help="where jobs and checkpoints live; a restarted coordinator resumes from here; "
        "empty = keep nothing (LMPS_STATE_DIR)",
    )
    return parser


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    args = args or build_parser().parse_args(argv)
    # Imported here, not at the top: `build_parser` (every `--help`) stays torch-free.
    from lmps.services.coordinator.driver import Driver
    from lmps.services.coordinator.metrics import CoordinatorCollector
    from lmps.services.coordinator.registry import Registry
    from lmps.services.coordinator.servicer import CoordinatorServicer
    from lmps.v1 import coordinator_pb2_grpc

    setup_logging(args.log_level)
    registry = Registry(heartbeat_s=args.heartbeat, expiry_s=args.expiry)
    state_dir = Path(args.state_dir) if args.state_dir else None
    driver = Driver(registry, state_dir)
    servicer = CoordinatorServicer(registry, driver)
    metrics = process_registry()  # this role's series only (docs/metrics.md)
    metrics.register(CoordinatorCollector(registry, driver))
    running = start_server(
        serve_options(args),
        [
            Service(
                "lmps.v1.CoordinatorService",
                coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server,
                servicer,
            )
        ],
        registry=metrics,
    )
    return run_until_signal(running)


if __name__ == "__main__":
    raise SystemExit(run_service(main, "lmps serve coordinator"))

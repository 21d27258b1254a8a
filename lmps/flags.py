"""Command-line flags shared by the three services; every flag has an LMPS_* env variable."""

from __future__ import annotations

import argparse
import logging
import os

from lmps.bootstrap import ServeOptions


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def add_serve_flags(
    parser: argparse.ArgumentParser, *, port: int, metrics_port: int, member: bool
) -> None:
    """--host/--port/--metrics-port/--grace (+ --coordinator/--id/--advertise for members)."""
    g = parser.add_argument_group("listening")
    g.add_argument(
        "--host", default=env("LMPS_HOST", "0.0.0.0"), help="interface to bind (LMPS_HOST)"
    )
    g.add_argument(
        "--port", type=int, default=int(env("LMPS_PORT", str(port))), help="gRPC port (LMPS_PORT)"
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=int(env("LMPS_METRICS_PORT", str(metrics_port))),
        help="Prometheus /metrics port; -1 = off, 0 = any free port (LMPS_METRICS_PORT)",
    )
    g.add_argument(
        "--grace",
        type=float,
        default=float(env("LMPS_GRACE_S", "5")),
        help="seconds in-flight RPCs get after SIGTERM (LMPS_GRACE_S)",
    )
    g.add_argument("--log-level", default=env("LMPS_LOG_LEVEL", "INFO"), help="(LMPS_LOG_LEVEL)")
    if member:
        m = parser.add_argument_group("membership")
        m.add_argument(
            "--coordinator",
            default=env("LMPS_COORDINATOR", "127.0.0.1:50051"),
            help="coordinator address host:port (LMPS_COORDINATOR)",
        )
        m.add_argument(
            "--id", default=env("LMPS_ID", ""), help="stable member id; empty = assigned (LMPS_ID)"
        )
        m.add_argument(
            "--advertise",
            default=env("LMPS_ADVERTISE", ""),
            help="host:port others dial to reach this service; "
            "default: this host's IP (LMPS_ADVERTISE)",
        )


def serve_options(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        host=args.host, port=args.port, metrics_port=args.metrics_port, grace_s=args.grace
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

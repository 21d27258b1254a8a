"""`lmps serve coordinator`: run the coordinator."""

from __future__ import annotations

import argparse
import fcntl
import logging
from pathlib import Path
from typing import IO

from lmps.rpc.bootstrap import Service, run_until_signal, start_server
from lmps.rpc.flags import (
    EnvError,
    HelpFormatter,
    add_serve_flags,
    env,
    env_number,
    run_service,
    serve_options,
    setup_logging,
)
from lmps.rpc.metrics import process_registry

# Enough to come back to the last few runs (generate, resume), few enough that state stays
# bounded: each kept job holds its data and up to `keep_checkpoints` checkpoints on disk.
DEFAULT_KEEP_JOBS = 5


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
    parser.add_argument(
        "--keep-jobs",
        type=_count,
        default=env_number("LMPS_KEEP_JOBS", DEFAULT_KEEP_JOBS),
        metavar="N",
        help="jobs kept, in memory and under --state-dir: when a job is submitted, all but "
        "the newest N are forgotten and their folders deleted; 0 = keep every job "
        "(LMPS_KEEP_JOBS)",
    )
    return parser


def _count(text: str) -> int:
    """An integer >= 0 (argparse's error names the flag and the value)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; 0 keeps every job")
    return value


LOCK = ".lock"


def hold_state_dir(state_dir: Path) -> IO[str] | None:
    """An advisory lock on STATE_DIR/.lock for as long as the returned file stays open (the
    process's life): `lmps clean` will not delete a state dir a live coordinator uses. Not
    getting it is only a warning: a filesystem without locks must not stop a coordinator."""
    log = logging.getLogger("lmps.coordinator")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = (state_dir / LOCK).open("a")
    except OSError as err:
        log.warning("%s: no lock file (%s)", state_dir, err)
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        log.warning("%s: not locked (%s); is another coordinator using it?", state_dir, err)
    return lock


def state_dir_in_use(state_dir: Path) -> bool:
    """Whether a running coordinator holds `state_dir` (see `hold_state_dir`)."""
    path = state_dir / LOCK
    if not path.exists():
        return False
    with path.open("a") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
    return False


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
    if args.keep_jobs < 0:  # LMPS_KEEP_JOBS skips the flag's type check
        raise EnvError(f"LMPS_KEEP_JOBS={args.keep_jobs} is negative: 0 keeps every job")
    lock = hold_state_dir(state_dir) if state_dir is not None else None
    driver = Driver(registry, state_dir, keep_jobs=args.keep_jobs)
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
    try:
        return run_until_signal(running)
    finally:
        if lock is not None:
            lock.close()  # releases the state dir (a killed process's lock goes with it)


if __name__ == "__main__":
    raise SystemExit(run_service(main, "lmps serve coordinator"))

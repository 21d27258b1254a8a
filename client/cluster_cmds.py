"""`lmps cluster up|down|status` and `lmps clean`: the local cluster of processes recorded in
.lmps/cluster.json, and the state it leaves behind. Their flags are here too (`cluster` has
its own sub-commands); `lmps.client.cli` lists them with the other commands."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from lmps.client.cli_common import CACHE_DIR, console, default_coordinator, error, example
from lmps.rpc.flags import HelpFormatter

CLUSTER_FILE = Path(".lmps/cluster.json")
COORDINATOR_STATE = Path(".lmps/coordinator")  # `lmps serve coordinator --state-dir` default


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from lmps.client.launcher import ClusterSpec, LocalCluster, running_saved

    if running_saved(CLUSTER_FILE):
        error(f"the cluster recorded in {CLUSTER_FILE} is running; `lmps cluster down` first")
        return 1
    spec = ClusterSpec(
        servers=args.servers,
        workers=args.workers,
        coordinator_port=args.port,
        run_dir=str(CLUSTER_FILE.parent / "logs"),
    )
    cluster = LocalCluster(spec)
    with console.status(f"starting coordinator, {args.servers} servers, {args.workers} workers"):
        cluster.start()
    cluster.save(CLUSTER_FILE)
    for p in cluster.procs:
        console.print(f"  {p.name:<12} {p.address:<18} metrics :{p.metrics_port}  log {p.log}")
    console.print(f"coordinator at [bold]{cluster.coordinator}[/]; stop with `lmps cluster down`")
    return 0


def cmd_cluster_down(args: argparse.Namespace) -> int:
    from lmps.client.launcher import saved_procs, stop_saved

    recorded = [p.name for p in saved_procs(CLUSTER_FILE)]
    stopped = stop_saved(CLUSTER_FILE)
    console.print(f"stopped {', '.join(stopped) or 'nothing (already gone)'}")
    gone = [name for name in recorded if name not in stopped]
    if stopped and gone:
        console.print(
            f"already gone (or their PID now belongs to another process): {', '.join(gone)}"
        )
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from lmps.client.commands import cmd_status
    from lmps.client.launcher import recorded_coordinator

    if not args.coordinator:
        args.coordinator = recorded_coordinator(CLUSTER_FILE) or default_coordinator()
    return cmd_status(args)


def cmd_clean(args: argparse.Namespace) -> int:
    """Remove what `lmps cluster up` leaves under .lmps/ (and the corpus cache with --cache),
    once no process of a recorded cluster is still running."""
    from lmps.client.launcher import running_saved
    from lmps.services.coordinator.main import state_dir_in_use

    running = running_saved(CLUSTER_FILE)
    if running:
        names = ", ".join(p.name for p in running)
        error(f"a local cluster is still running ({names}); stop it with `lmps cluster down`")
        return 1
    logs = CLUSTER_FILE.parent / "logs"
    # The local cluster's coordinator keeps its state in logs/state; `lmps serve coordinator`
    # in COORDINATOR_STATE (its --state-dir default). Neither is deleted under a live one.
    for state in (logs / "state", COORDINATOR_STATE):
        if state_dir_in_use(state):
            error(
                f"a coordinator is running with its state in {state}; stop it first "
                "(`lmps clean` would delete its jobs and checkpoints)"
            )
            return 1
    targets = [CLUSTER_FILE, logs, COORDINATOR_STATE]
    if args.cache:
        targets.append(Path(args.cache_dir))
    removed = []
    for path in targets:
        if not path.exists():
            continue
        # A coordinator's state: say how many jobs (their data and checkpoints) go with it.
        jobs = sum(1 for _ in path.glob("**/jobs/*/job.json")) if path.is_dir() else 0
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(f"{path} ({jobs} job{'s' * (jobs != 1)})" if jobs else str(path))
    console.print(f"removed {', '.join(removed)}" if removed else "nothing to clean")
    return 0


# -- flags ---------------------------------------------------------------------------------


def add_cluster(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser(
        "up",
        help="start a coordinator, parameter servers and workers as local processes",
        description="Start a local cluster on 127.0.0.1, detached; `lmps cluster down` "
        f"stops it. Logs and the coordinator's state go under {CLUSTER_FILE.parent / 'logs'}.",
        formatter_class=HelpFormatter,
        epilog=example("lmps cluster up --servers 2 --workers 2 --port 50051"),
    )
    up.add_argument("--servers", type=int, default=2, help="parameter servers")
    up.add_argument("--workers", type=int, default=2, help="workers")
    up.add_argument("--port", type=int, default=50051, help="coordinator port (0 = any free)")
    up.set_defaults(func=cmd_cluster_up)
    down = actions.add_parser(
        "down",
        help="stop the local cluster `lmps cluster up` started",
        description=f"Stop the processes recorded in {CLUSTER_FILE} (only those that are "
        "still the processes it started), then forget the record.",
        formatter_class=HelpFormatter,
        epilog=example("lmps cluster down"),
    )
    down.set_defaults(func=cmd_cluster_down)
    status = actions.add_parser(
        "status",
        help="members and jobs of the cluster (as `lmps status`)",
        formatter_class=HelpFormatter,
        epilog=example("lmps cluster status"),
    )
    status.add_argument(
        "--coordinator",
        default="",
        help=f"coordinator address host:port; default: the one recorded in {CLUSTER_FILE}, "
        "else LMPS_COORDINATOR or 127.0.0.1:50051",
    )
    status.set_defaults(func=cmd_cluster_status)


def add_clean(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache", action="store_true", help="also remove the prepared-corpus cache (--cache-dir)"
    )
    p.add_argument("--cache-dir", default=CACHE_DIR, help="the corpus cache `--cache` removes")
    p.set_defaults(func=cmd_clean)

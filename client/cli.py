"""`lmps`: run, drive and inspect an lmps cluster.

lmps demo                        # local cluster, train the tiny model, sample, stop
lmps cluster up --servers 2 --workers 2
lmps train --preset tiny --epochs 3 --out runs/tiny
lmps generate --model runs/tiny --prompt "The for statement"
lmps report runs/tiny            # losses, tokens/s, steps; the loss plot's path
lmps shards                      # which server holds which slice, with stats
lmps status
lmps cluster down
lmps clean                       # remove the local cluster's logs and state (README: state)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from rich.console import Console

from lmps.rpc.flags import EnvError, HelpFormatter, env, env_number

if TYPE_CHECKING:
    from lmps.client.train import TrainOptions

CLUSTER_FILE = Path(".lmps/cluster.json")
COORDINATOR_STATE = Path(".lmps/coordinator")  # `lmps serve coordinator --state-dir` default
CACHE_DIR = ".cache/lmps"
console = Console()


def _coordinator_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator",
        default=env("LMPS_COORDINATOR", "127.0.0.1:50051"),
        help="coordinator address host:port (LMPS_COORDINATOR; default %(default)s)",
    )


def _train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per `TrainOptions` field that carries a `Flag`: name, help, choices and group
    from the field's metadata, type and default from the field."""
    from lmps.client.train import flags

    groups: dict[str, argparse._ArgumentGroup] = {}
    for field, default, how in flags():
        if how.group not in groups:
            groups[how.group] = p.add_argument_group(how.group)
        if how.env:
            if isinstance(default, str):
                default = env(how.env, default)
            else:
                default = env_number(how.env, default, type(default))
        kwargs: dict[str, Any] = {"default": default}
        if not isinstance(default, str):
            kwargs["type"] = type(default)
        for key in ("help", "choices", "metavar"):
            if getattr(how, key) is not None:
                kwargs[key] = getattr(how, key)
        name = how.name or f"--{field.replace('_', '-')}"
        groups[how.group].add_argument(name, dest=field, **kwargs)


def _train_options(args: argparse.Namespace, **overrides: object) -> TrainOptions:
    from lmps.client.train import TrainOptions

    names = {f.name for f in dataclasses.fields(TrainOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return TrainOptions(**values)


# -- commands ------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    if args.role == "coordinator":
        from lmps.services.coordinator.main import main
    elif args.role == "ps":
        from lmps.services.parameter_server.main import main
    else:
        from lmps.services.worker.main import main
    return main(args=args)


def cmd_train(args: argparse.Namespace) -> int:
    from lmps.client.train import train

    train(_train_options(args), console)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lmps.client import model_io

    if args.model:
        trained = model_io.load(Path(args.model))
    else:
        trained = model_io.fetch_model(args.coordinator, args.job, wait=False)
    for i in range(args.samples):
        text = model_io.sample(
            trained,
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            seed=args.seed + i,
        )
        if args.samples > 1:
            console.rule(f"sample {i + 1}")
        print(text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lmps.client.report import render, summarize

    for line in render(summarize(Path(args.run_dir))):
        print(line)
    return 0


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from lmps.client.launcher import ClusterSpec, LocalCluster, running_saved

    if running_saved(CLUSTER_FILE):
        _error(f"the cluster recorded in {CLUSTER_FILE} is running; `lmps cluster down` first")
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
    from lmps.client.launcher import recorded_coordinator

    if not args.coordinator:
        args.coordinator = recorded_coordinator(CLUSTER_FILE) or env(
            "LMPS_COORDINATOR", "127.0.0.1:50051"
        )
    return cmd_status(args)


def cmd_clean(args: argparse.Namespace) -> int:
    """Remove what `lmps cluster up` leaves under .lmps/ (and the corpus cache with --cache),
    once no process of a recorded cluster is still running."""
    from lmps.client.launcher import running_saved
    from lmps.services.coordinator.main import state_dir_in_use

    running = running_saved(CLUSTER_FILE)
    if running:
        names = ", ".join(p.name for p in running)
        _error(f"a local cluster is still running ({names}); stop it with `lmps cluster down`")
        return 1
    logs = CLUSTER_FILE.parent / "logs"
    # The local cluster's coordinator keeps its state in logs/state; `lmps serve coordinator`
    # in COORDINATOR_STATE (its --state-dir default). Neither is deleted under a live one.
    for state in (logs / "state", COORDINATOR_STATE):
        if state_dir_in_use(state):
            _error(
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


def cmd_status(args: argparse.Namespace) -> int:
    from lmps.client import inspect

    inspect.show_status(args.coordinator, console)
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from lmps.client import inspect

    inspect.show_shards(args.coordinator, args.job, console, stats=not args.no_stats)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from lmps.client.launcher import wait_healthy

    try:
        wait_healthy(args.address, timeout_s=args.timeout, service=args.service)
    except TimeoutError as err:
        print(err, file=sys.stderr)
        return 1
    print("SERVING")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from lmps.client.certs import make_dev_pki, usage

    try:
        pki = make_dev_pki(Path(args.out), args.hosts, days=args.days, force=args.force)
    except FileExistsError as err:
        console.print(f"[red]error[/] {err}")
        return 1
    print(usage(pki))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from lmps.core.data import prepare_corpus

    corpus = prepare_corpus(args.data, args.vocab_size, args.eval_fraction, Path(args.cache_dir))
    console.print(
        f"{args.data}: vocab {corpus.vocab_size}, {corpus.train.numel():,} train and "
        f"{corpus.eval.numel():,} eval tokens (cached in {args.cache_dir})"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lmps.client.launcher import ClusterSpec, LocalCluster
    from lmps.client.train import train

    out = args.out or "runs/demo"
    spec = ClusterSpec(servers=2, workers=2, run_dir=str(Path(out) / "logs"))
    console.rule("lmps demo: 1 coordinator, 2 parameter servers, 2 workers on 127.0.0.1")
    with console.status("starting the cluster"):
        cluster = LocalCluster(spec).start()
    try:
        for p in cluster.procs:
            console.print(f"  {p.name:<12} {p.address:<18} pid {p.pid}  log {p.log}")
        opts = _train_options(
            args,
            coordinator=cluster.coordinator,
            out=out,
            sample_prompt=args.sample_prompt or "The for statement",
        )
        report = train(opts, console)
        console.print(f"demo finished in {report['wall_s']:.0f}s; model in {out}")
    finally:
        codes = cluster.stop()
        bad = {k: v for k, v in codes.items() if v != 0}
        if bad:
            console.print(f"[yellow]unclean exits: {bad}[/]")
    return 0


# -- parser --------------------------------------------------------------------------------


def _example(*lines: str) -> str:
    return ("example:" if len(lines) == 1 else "examples:") + "".join(f"\n  {x}" for x in lines)


def _add_demo(p: argparse.ArgumentParser) -> None:
    _train_flags(p)
    p.set_defaults(func=cmd_demo, epochs=15, lr=6e-3)


def _add_train(p: argparse.ArgumentParser) -> None:
    _coordinator_flag(p)
    _train_flags(p)
    p.set_defaults(func=cmd_train)


def _add_generate(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="folder written by `lmps train --out`")
    _coordinator_flag(p)
    p.add_argument(
        "--job", default="", help="job id when sampling from a cluster (default: latest)"
    )
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 = no top-k filtering")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run folder written by `lmps train` (runs/JOB by default, or its --out)",
    )
    p.set_defaults(func=cmd_report)


def _add_cluster(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser(
        "up",
        help="start a coordinator, parameter servers and workers as local processes",
        description="Start a local cluster on 127.0.0.1, detached; `lmps cluster down` "
        f"stops it. Logs and the coordinator's state go under {CLUSTER_FILE.parent / 'logs'}.",
        formatter_class=HelpFormatter,
        epilog=_example("lmps cluster up --servers 2 --workers 2 --port 50051"),
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
        epilog=_example("lmps cluster down"),
    )
    down.set_defaults(func=cmd_cluster_down)
    status = actions.add_parser(
        "status",
        help="members and jobs of the cluster (as `lmps status`)",
        formatter_class=HelpFormatter,
        epilog=_example("lmps cluster status"),
    )
    status.add_argument(
        "--coordinator",
        default="",
        help=f"coordinator address host:port; default: the one recorded in {CLUSTER_FILE}, "
        "else LMPS_COORDINATOR or 127.0.0.1:50051",
    )
    status.set_defaults(func=cmd_cluster_status)


def _add_status(p: argparse.ArgumentParser) -> None:
    _coordinator_flag(p)
    p.set_defaults(func=cmd_status)


def _add_shards(p: argparse.ArgumentParser) -> None:
    _coordinator_flag(p)
    p.add_argument("--job", default="", help="job id (default: latest)")
    p.add_argument("--no-stats", action="store_true", help="skip norm/mean/max-abs (faster)")
    p.set_defaults(func=cmd_shards)


def _add_health(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", nargs="?", default=f"127.0.0.1:{env_number('LMPS_PORT', 50051)}")
    p.add_argument("--service", default="", help="service name; empty = the whole server")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    p.set_defaults(func=cmd_health)


def _add_certs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=".lmps/certs", help="folder to write")
    p.add_argument(
        "--hosts",
        nargs="*",
        default=[],
        help="extra server names/IPs (localhost, 127.0.0.1, ::1, lmps are always in)",
    )
    p.add_argument("--days", type=int, default=365, help="validity")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_certs)


def _add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="builtin:pydoc")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--cache-dir", default=CACHE_DIR)
    p.set_defaults(func=cmd_prepare)


def _add_clean(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache", action="store_true", help="also remove the prepared-corpus cache (--cache-dir)"
    )
    p.add_argument("--cache-dir", default=CACHE_DIR, help="the corpus cache `--cache` removes")
    p.set_defaults(func=cmd_clean)


def _add_serve(p: argparse.ArgumentParser) -> None:
    # The services' parsers import no torch: `lmps serve ROLE --help` stays quick.
    from lmps.services.coordinator.main import build_parser as coordinator_parser
    from lmps.services.parameter_server.main import build_parser as ps_parser
    from lmps.services.worker.main import build_parser as worker_parser

    roles = p.add_subparsers(dest="role", required=True, metavar="ROLE")
    builders: dict[str, Callable[[argparse.ArgumentParser], argparse.ArgumentParser]] = {
        "coordinator": coordinator_parser,
        "ps": ps_parser,
        "worker": worker_parser,
    }
    for role, build in builders.items():
        build(roles.add_parser(role, help=f"run a {role}", formatter_class=HelpFormatter))
    p.set_defaults(func=cmd_serve)


# name -> (one-line help, how to add its flags, example)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "demo": (
        "start a local cluster, train the tiny model, sample, stop",
        _add_demo,
        _example("lmps demo --epochs 5 --out runs/demo"),
    ),
    "train": (
        "train a model on a running cluster",
        _add_train,
        _example("lmps train --preset tiny --epochs 3 --out runs/tiny"),
    ),
    "generate": (
        "sample text from a saved model or a running cluster",
        _add_generate,
        _example('lmps generate --model runs/tiny --prompt "The for statement"'),
    ),
    "report": (
        "summary of a training run folder: losses, tokens/s, steps, the loss plot",
        _add_report,
        _example("lmps report runs/tiny"),
    ),
    "cluster": (
        "start/stop a local cluster of processes (up, down, status)",
        _add_cluster,
        _example("lmps cluster up --servers 2", "lmps cluster status", "lmps cluster down"),
    ),
    "status": ("members and jobs of a cluster", _add_status, _example("lmps status")),
    "shards": (
        "the shard map and per-shard statistics",
        _add_shards,
        _example("lmps shards --job JOB --no-stats"),
    ),
    "health": (
        "exit 0 iff ADDRESS answers SERVING on grpc.health.v1",
        _add_health,
        _example("lmps health 127.0.0.1:50051 --timeout 5"),
    ),
    "certs": (
        "make a dev CA, server/client certificates and a token (docs/security.md)",
        _add_certs,
        _example("lmps certs --out .lmps/certs --hosts coordinator"),
    ),
    "prepare": (
        "tokenize a corpus into the cache (train does this too)",
        _add_prepare,
        _example("lmps prepare --data corpus.jsonl --vocab-size 4096"),
    ),
    "clean": (
        "remove local state: cluster logs, the local cluster's coordinator state",
        _add_clean,
        _example("lmps clean --cache"),
    ),
    "serve": (
        "run one service: coordinator, ps (parameter server) or worker",
        _add_serve,
        _example("lmps serve coordinator --port 50051"),
    ),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The `lmps` parser; only `commands` (default: all) get their flags, so `lmps --help`
    and `lmps COMMAND` build (and import) no more than they need."""
    wanted = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="lmps",
        description="lmps: a parameter-server cluster for training Transformer language models.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add, example) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text[:1].upper() + help_text[1:] + ".",
            epilog=example,
            formatter_class=HelpFormatter,
        )
        if name in wanted:
            add(p)
    return parser


def _health_parser() -> argparse.ArgumentParser:
    help_text, add, example = COMMANDS["health"]
    p = argparse.ArgumentParser(
        prog="lmps health", description=help_text, epilog=example, formatter_class=HelpFormatter
    )
    add(p)
    return p


def _stop_on_sigterm() -> None:
    """`lmps train` in a container is PID 1: without a handler SIGTERM would be ignored."""

    def handle(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handle)


def _error(message: object) -> None:
    """One line on stderr: `lmps: error: ...`."""
    print(f"lmps: error: {' '.join(str(message).split())}", file=sys.stderr)


def _coordinator_answers(address: str) -> bool:
    """Whether anything answers gRPC health at `address` (even NOT_SERVING, even a refusal
    for a missing token): then an UNAVAILABLE came from further away than the connection."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lmps.rpc.channel import open_channel

    with open_channel(address) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3.0)
        except grpc.RpcError as err:
            return err.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
    return True


def _parse(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["health"]:
        # Probes run this every few seconds: no torch, no full parser.
        return _health_parser().parse_args(argv[1:])
    command = argv[0] if argv and argv[0] in COMMANDS else None
    return build_parser([command] if command else []).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from lmps.client.launcher import MemberExited

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
    except EnvError as err:  # a bad LMPS_* default: even --help says so, in one line
        _error(err)
        return 2
    if getattr(args, "command", "health") in ("train", "demo", "generate"):
        _stop_on_sigterm()
    try:
        code: int = args.func(args)
        return code
    except grpc.RpcError as err:
        code_name = err.code().name if callable(getattr(err, "code", None)) else "?"
        details = err.details() if callable(getattr(err, "details", None)) else str(err)
        address = getattr(args, "coordinator", None)
        if code_name == "UNAVAILABLE" and address and not _coordinator_answers(address):
            _error(f"no coordinator at {address}; start one with `lmps cluster up`")
        else:
            _error(f"{code_name}: {details}")
        return 2
    except MemberExited as err:
        _error(err.summary())
        return 2
    except (ValueError, OSError) as err:  # FileNotFoundError, PortInUse, preflight refusals
        _error(err)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())

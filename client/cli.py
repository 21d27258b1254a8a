"""`lmps`: run, drive and inspect an lmps cluster.

lmps demo                        # local cluster, train the tiny model, sample, stop
lmps cluster up --servers 2 --workers 2
lmps train --preset tiny --epochs 3 --out runs/tiny
lmps generate --model runs/tiny --prompt "The for statement"
lmps shards                      # which server holds which slice, with stats
lmps status
lmps cluster down
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from rich.console import Console

from lmps.rpc.flags import env

if TYPE_CHECKING:
    from lmps.client.train import TrainOptions

CLUSTER_FILE = Path(".lmps/cluster.json")
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
            default = type(default)(env(how.env, str(default)))
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
        trained = model_io.fetch_model(args.coordinator, args.job)
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


def cmd_cluster(args: argparse.Namespace) -> int:
    from lmps.client.launcher import ClusterSpec, LocalCluster, stop_saved

    if args.action == "down":
        stopped = stop_saved(CLUSTER_FILE)
        console.print(f"stopped {', '.join(stopped) or 'nothing (already gone)'}")
        return 0
    if args.action == "status":
        return cmd_status(args)
    if CLUSTER_FILE.exists():
        console.print(
            f"[red]a cluster is already recorded in {CLUSTER_FILE}[/]; "
            "run `lmps cluster down` first"
        )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmps",
        description="lmps: a parameter-server cluster for training Transformer language models.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="start a local cluster, train the tiny model, sample, stop")
    _train_flags(p)
    p.set_defaults(func=cmd_demo, epochs=15, lr=6e-3)

    p = sub.add_parser("train", help="train a model on a running cluster")
    _coordinator_flag(p)
    _train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a saved model or a running cluster")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="folder written by `lmps train --out`")
    _coordinator_flag(p)
    p.add_argument(
        "--job", default="", help="job id when sampling from a cluster (default: latest)"
    )
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 = no top-k filtering")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("cluster", help="start/stop a local cluster of processes")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=50051, help="coordinator port (0 = any free)")
    _coordinator_flag(p)
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("status", help="members and jobs of a cluster")
    _coordinator_flag(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("shards", help="the shard map and per-shard statistics")
    _coordinator_flag(p)
    p.add_argument("--job", default="", help="job id (default: latest)")
    p.add_argument("--no-stats", action="store_true", help="skip norm/mean/max-abs (faster)")
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("health", help="exit 0 iff ADDRESS answers SERVING on grpc.health.v1")
    p.add_argument("address", nargs="?", default=f"127.0.0.1:{env('LMPS_PORT', '50051')}")
    p.add_argument("--service", default="", help="service name; empty = the whole server")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser(
        "certs", help="make a dev CA, server/client certificates and a token (docs/security.md)"
    )
    p.add_argument("--out", default=".lmps/certs", help="folder to write (default %(default)s)")
    p.add_argument(
        "--hosts",
        nargs="*",
        default=[],
        help="extra server names/IPs (localhost, 127.0.0.1, ::1, lmps are always in)",
    )
    p.add_argument("--days", type=int, default=365, help="validity (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("prepare", help="tokenize a corpus into the cache (train does this too)")
    p.add_argument("--data", default="builtin:pydoc")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--cache-dir", default=".cache/lmps")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "serve", help="run one service: coordinator, ps (parameter server) or worker"
    )
    roles = p.add_subparsers(dest="role", required=True, metavar="ROLE")
    from lmps.services.coordinator.main import build_parser as coordinator_parser
    from lmps.services.parameter_server.main import build_parser as ps_parser
    from lmps.services.worker.main import build_parser as worker_parser

    builders: dict[str, Callable[[argparse.ArgumentParser], argparse.ArgumentParser]] = {
        "coordinator": coordinator_parser,
        "ps": ps_parser,
        "worker": worker_parser,
    }
    for role, build in builders.items():
        build(roles.add_parser(role, help=f"run a {role}"))
    p.set_defaults(func=cmd_serve)
    return parser


def _health_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmps health", description="exit 0 iff ADDRESS answers SERVING on grpc.health.v1"
    )
    p.add_argument("address", nargs="?", default=f"127.0.0.1:{env('LMPS_PORT', '50051')}")
    p.add_argument("--service", default="", help="service name; empty = the whole server")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=cmd_health)
    return p


def _stop_on_sigterm() -> None:
    """`lmps train` in a container is PID 1: without a handler SIGTERM would be ignored."""

    def handle(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handle)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["health"]:
        # Probes run this every few seconds: no torch, no full parser (0.1 s, not 3 s).
        args = _health_parser().parse_args(argv[1:])
        return int(cmd_health(args))
    args = build_parser().parse_args(argv)
    if args.command in ("train", "demo", "generate"):
        _stop_on_sigterm()
    try:
        code: int = args.func(args)
        return code
    except grpc.RpcError as err:
        code_name = err.code().name if hasattr(err, "code") else "?"
        details = err.details() if hasattr(err, "details") else str(err)
        console.print(f"[red]error[/] {code_name}: {details}")
        if code_name == "UNAVAILABLE":
            console.print(
                f"is a coordinator running at {getattr(args, 'coordinator', '?')}? "
                "try `lmps cluster up`"
            )
        return 2
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error[/] {err}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())

"""What each `lmps` command does, given its parsed flags (`lmps.client.cli` builds them):
one `cmd_*` a command, returning the exit code. The local cluster's commands (`cluster`,
`clean`) are in `lmps.client.cluster_cmds`. Each imports what it needs when it runs, so
that `lmps --help` stays quick."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmps.client.cli_common import console, options_from_args


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

    train(options_from_args(args), console)
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
        opts = options_from_args(
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

"""`python -m bench [--quick] [NAME ...]`: run the benchmarks, print tables, write JSON."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from bench import BENCHMARKS
from bench.common import Context


def build_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<11} {what}" for name, what in BENCHMARKS.items())
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="lmps benchmarks: ratios against baselines timed side by side on this "
        "machine. Results go to OUT/<name>.json.",
        epilog=f"benchmarks:\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="benchmarks to run (default: all, in order)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="reduced sizes and repeats (< 2 minutes in all)"
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="peers also runs the gpt2 preset (124M): for machines with cores and memory",
    )
    parser.add_argument(
        "--out", default="runs/bench", type=Path, help="results folder (default: runs/bench)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        build_parser().error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    if args.large and "peers" not in names:
        build_parser().error("--large changes only peers: add peers to the benchmarks to run")
    # Tables are wide: outside a terminal (CI logs, pipes) rich would wrap them at 80.
    console = Console(width=None if sys.stdout.isatty() else 120)
    walls: dict[str, float] = {}
    # The stack stops whatever benchmarks share (the parameter-server rig) when all are done.
    with ExitStack() as stack:
        ctx = Context(
            quick=args.quick, console=console, out_dir=args.out, stack=stack, large=args.large
        )
        for name in names:
            console.rule(f"bench {name}{' (quick)' if args.quick else ''}")
            module = importlib.import_module(f"bench.{name}")
            t0 = time.perf_counter()
            module.run(ctx)
            walls[name] = time.perf_counter() - t0
    console.rule()
    console.print(
        "wall time: "
        + ", ".join(f"{n} {s:.0f}s" for n, s in walls.items())
        + f"; total {sum(walls.values()):.0f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

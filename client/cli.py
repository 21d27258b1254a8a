"""`lmps`: run, drive and inspect an lmps cluster.

lmps demo                        # local cluster: train, sample, fine-tune a classifier, predict
lmps cluster up --servers 2 --workers 2
lmps train --preset tiny --epochs 3 --out runs/tiny
lmps generate --model runs/tiny "The for statement"   # streamed; tokens/s on stderr
lmps predict --model runs/cls "some text"   # a --task classify model: label, probabilities
lmps chat --model runs/sft                  # a --task sft model: a conversation
lmps report runs/tiny            # losses, tokens/s, steps; the loss plot's path
lmps export runs/tiny hf/tiny    # a Hugging Face GPT-2 folder (pip install 'lmps[hf]')
lmps shards                      # which server holds which slice, with stats
lmps status
lmps cluster down
lmps clean                       # remove the local cluster's logs and state (README: state)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterable, Sequence

import grpc

from lmps.client.cli_common import error, example, options_from_args
from lmps.client.cli_flags import (
    add_certs,
    add_chat,
    add_demo,
    add_export,
    add_generate,
    add_health,
    add_predict,
    add_prepare,
    add_report,
    add_serve,
    add_shards,
    add_status,
    add_train,
)
from lmps.client.cluster_cmds import add_clean, add_cluster
from lmps.rpc.flags import EnvError, HelpFormatter

_train_options = options_from_args  # the tests' name for it


# -- parser (each command's flags: lmps.client.cli_flags) ---------------------------------

# name -> (one-line help, how to add its flags, example)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "demo": (
        "start a local cluster, train the tiny model, sample, fine-tune a classifier from it, stop",
        add_demo,
        example("lmps demo --epochs 5 --out runs/demo"),
    ),
    "train": (
        "train a model on a running cluster",
        add_train,
        example("lmps train --preset tiny --epochs 3 --out runs/tiny"),
    ),
    "generate": (
        "sample text from a saved model or a running cluster",
        add_generate,
        example(
            'lmps generate --model runs/tiny "The for statement" --top-p 0.9 --stop "\\n\\n"',
            'lmps generate --job JOB "The with statement" --temperature 0',
        ),
    ),
    "predict": (
        "classify texts with a --task classify model: labels and probabilities",
        add_predict,
        example(
            'lmps predict --model runs/sentiment "a fine film" "dull and long" --top 2',
            "lmps predict --job JOB --file texts.jsonl --json",
        ),
    ),
    "chat": (
        "talk to a --task sft model, the reply streamed token by token",
        add_chat,
        example(
            "lmps chat --model runs/sft",
            'lmps chat --model runs/sft --system "Be brief." --prompt "What is a shard?"',
        ),
    ),
    "report": (
        "summary of a training run folder: losses, tokens/s, steps, the loss plot",
        add_report,
        example("lmps report runs/tiny"),
    ),
    "export": (
        "write a trained model as a Hugging Face GPT-2 folder (or an lmps one)",
        add_export,
        example(
            "lmps export runs/tiny hf/tiny --format hf",
            "lmps export --job JOB hf/job",
        ),
    ),
    "cluster": (
        "start/stop a local cluster of processes (up, down, status)",
        add_cluster,
        example("lmps cluster up --servers 2", "lmps cluster status", "lmps cluster down"),
    ),
    "status": ("members and jobs of a cluster", add_status, example("lmps status")),
    "shards": (
        "the shard map and per-shard statistics",
        add_shards,
        example("lmps shards --job JOB --no-stats"),
    ),
    "health": (
        "exit 0 iff ADDRESS answers SERVING on grpc.health.v1",
        add_health,
        example("lmps health 127.0.0.1:50051 --timeout 5"),
    ),
    "certs": (
        "make a dev CA, server/client certificates and a token (docs/security.md)",
        add_certs,
        example("lmps certs --out .lmps/certs --hosts coordinator"),
    ),
    "prepare": (
        "tokenize a corpus into the cache (train does this too)",
        add_prepare,
        example("lmps prepare --data corpus.jsonl --vocab-size 4096"),
    ),
    "clean": (
        "remove local state: cluster logs, the local cluster's coordinator state",
        add_clean,
        example("lmps clean --cache"),
    ),
    "serve": (
        "run one service: coordinator, ps (parameter server) or worker",
        add_serve,
        example("lmps serve coordinator --port 50051"),
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
    for name, (help_text, add, epilog) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text[:1].upper() + help_text[1:] + ".",
            epilog=epilog,
            formatter_class=HelpFormatter,
        )
        if name in wanted:
            add(p)
    return parser


def _health_parser() -> argparse.ArgumentParser:
    help_text, add, epilog = COMMANDS["health"]
    p = argparse.ArgumentParser(
        prog="lmps health", description=help_text, epilog=epilog, formatter_class=HelpFormatter
    )
    add(p)
    return p


def _stop_on_sigterm() -> None:
    """`lmps train` in a container is PID 1: without a handler SIGTERM would be ignored."""

    def handle(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handle)


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
        error(err)
        return 2
    if getattr(args, "command", "health") in ("train", "demo", "generate", "chat", "predict"):
        _stop_on_sigterm()
    try:
        code: int = args.func(args)
        return code
    except grpc.RpcError as err:
        code_name = err.code().name if callable(getattr(err, "code", None)) else "?"
        details = err.details() if callable(getattr(err, "details", None)) else str(err)
        address = getattr(args, "coordinator", None)
        if code_name == "UNAVAILABLE" and address and not _coordinator_answers(address):
            error(f"no coordinator at {address}; start one with `lmps cluster up`")
        else:
            error(f"{code_name}: {details}")
        return 2
    except MemberExited as err:
        error(err.summary())
        return 2
    except (ValueError, OSError) as err:  # FileNotFoundError, PortInUse, preflight refusals
        error(err)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())

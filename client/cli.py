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

from lmps.client.cli_common import (
    CACHE_DIR,
    coordinator_flag,
    error,
    example,
    options_from_args,
    train_flags,
)
from lmps.client.cluster_cmds import add_clean, add_cluster
from lmps.client.commands import (
    cmd_certs,
    cmd_demo,
    cmd_export,
    cmd_generate,
    cmd_health,
    cmd_prepare,
    cmd_report,
    cmd_serve,
    cmd_shards,
    cmd_status,
    cmd_train,
)
from lmps.rpc.flags import EnvError, HelpFormatter, env_number

_train_options = options_from_args  # the tests' name for it


# -- parser --------------------------------------------------------------------------------


def _add_demo(p: argparse.ArgumentParser) -> None:
    train_flags(p)
    p.set_defaults(func=cmd_demo, epochs=15, lr=6e-3)


def _add_train(p: argparse.ArgumentParser) -> None:
    coordinator_flag(p)
    train_flags(p)
    p.set_defaults(func=cmd_train)


def _sampling_flags(p: argparse.ArgumentParser, what: str = "tokens to add") -> None:
    """`lmps generate`'s and `lmps chat`'s sampling flags (`generation.sampling_settings`)."""
    p.add_argument(
        "--max-new-tokens",
        "--max-tokens",
        type=int,
        default=100,
        metavar="N",
        help=f"{what}, at most",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 = no top-k filtering")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling: keep mass p; 1 = off"
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="CTRL's penalty on tokens already in the text (e.g. 1.2); 1 = off",
    )


def _model_flags(p: argparse.ArgumentParser, command: str) -> None:
    """--model DIR | --job JOB, and --coordinator."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="a model folder written by `lmps train`")
    src.add_argument(
        "--job",
        default=None,
        help=f"{command} with this job's model, fetched from the cluster at --coordinator "
        "(without --model or --job: the latest job's)",
    )
    coordinator_flag(p)


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.usage = "lmps predict [--model DIR | --job JOB] [TEXT ...] [--file F] [options]"
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    _model_flags(p, "classify")
    p.add_argument(
        "--file",
        metavar="F",
        help='more texts, one a line: plain text or {"text": ...} (.jsonl: JSON only; '
        'with a "label", the output marks each answer and gives the accuracy); - reads stdin',
    )
    p.add_argument(
        "--top", type=int, default=None, metavar="K", help="show the K likeliest classes"
    )
    p.add_argument("--json", action="store_true", help="JSON lines: text, label, probs")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from lmps.client.predict import cmd_predict  # torch: only when it runs

    return cmd_predict(args)


def _add_chat(p: argparse.ArgumentParser) -> None:
    p.usage = "lmps chat [--model DIR | --job JOB] [--prompt TEXT] [--system TEXT] [options]"
    _model_flags(p, "chat")
    p.add_argument(
        "--prompt", default=None, help="one message: print the reply and exit (no session)"
    )
    p.add_argument("--system", default=None, help="a system message that opens the chat")
    _sampling_flags(p, "reply tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (reply i: SEED + i)")
    p.set_defaults(func=_cmd_chat, no_cache=False)


def _cmd_chat(args: argparse.Namespace) -> int:
    from lmps.client.chat import cmd_chat  # torch: only when it runs

    return cmd_chat(args)


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.usage = "lmps generate [--model DIR | --job JOB] [PROMPT] [options]"
    p.add_argument(
        "prompt_text",
        nargs="?",
        default=None,
        metavar="PROMPT",
        help="text to continue (or --prompt; default: a newline)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="a run folder written by `lmps train`")
    src.add_argument(
        "--job",
        default=None,
        help="fetch this job's model from the cluster at --coordinator (without --model or "
        "--job: the latest job's)",
    )
    coordinator_flag(p)
    p.add_argument("--prompt", default=None, help="the same as PROMPT")
    _sampling_flags(p)
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when the text contains TEXT, not printed (\\n: a newline); repeatable",
    )
    p.add_argument(
        "--stop-at-eot", action="store_true", help="stop at the end-of-text token as well"
    )
    p.add_argument("--samples", type=int, default=1, help="continuations, seeds SEED, SEED+1, ...")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same text again)")
    p.add_argument(
        "--no-stream", action="store_true", help="print each text when done, not token by token"
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the whole context every step (no KV cache; same tokens, to compare)",
    )
    p.set_defaults(func=cmd_generate)


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run folder written by `lmps train` (runs/JOB by default, or its --out)",
    )
    p.set_defaults(func=cmd_report)


def _add_export(p: argparse.ArgumentParser) -> None:
    p.usage = "lmps export (RUN_DIR | --job JOB) OUT [--format {hf,lmps}] [options]"
    p.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_DIR OUT",
        help="the run folder to export (written by `lmps train`; not with --job) and the "
        "folder to write",
    )
    coordinator_flag(p)
    p.add_argument(
        "--job",
        default=None,
        help="export this job's model from the cluster instead of a run folder ('' = latest)",
    )
    p.add_argument(
        "--format",
        choices=("hf", "lmps"),
        default="hf",
        help="hf: a Hugging Face GPT-2 folder (GPT2LMHeadModel / AutoTokenizer .from_pretrained"
        " load it; needs `pip install 'lmps[hf]'`); lmps: a run folder's model files "
        "(default %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="write into OUT even if not empty")
    p.set_defaults(func=cmd_export)


def _add_status(p: argparse.ArgumentParser) -> None:
    coordinator_flag(p)
    p.set_defaults(func=cmd_status)


def _add_shards(p: argparse.ArgumentParser) -> None:
    coordinator_flag(p)
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
        "start a local cluster, train the tiny model, sample, fine-tune a classifier from it, stop",
        _add_demo,
        example("lmps demo --epochs 5 --out runs/demo"),
    ),
    "train": (
        "train a model on a running cluster",
        _add_train,
        example("lmps train --preset tiny --epochs 3 --out runs/tiny"),
    ),
    "generate": (
        "sample text from a saved model or a running cluster",
        _add_generate,
        example(
            'lmps generate --model runs/tiny "The for statement" --top-p 0.9 --stop "\\n\\n"',
            'lmps generate --job JOB "The with statement" --temperature 0',
        ),
    ),
    "predict": (
        "classify texts with a --task classify model: labels and probabilities",
        _add_predict,
        example(
            'lmps predict --model runs/sentiment "a fine film" "dull and long" --top 2',
            "lmps predict --job JOB --file texts.jsonl --json",
        ),
    ),
    "chat": (
        "talk to a --task sft model, the reply streamed token by token",
        _add_chat,
        example(
            "lmps chat --model runs/sft",
            'lmps chat --model runs/sft --system "Be brief." --prompt "What is a shard?"',
        ),
    ),
    "report": (
        "summary of a training run folder: losses, tokens/s, steps, the loss plot",
        _add_report,
        example("lmps report runs/tiny"),
    ),
    "export": (
        "write a trained model as a Hugging Face GPT-2 folder (or an lmps one)",
        _add_export,
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
    "status": ("members and jobs of a cluster", _add_status, example("lmps status")),
    "shards": (
        "the shard map and per-shard statistics",
        _add_shards,
        example("lmps shards --job JOB --no-stats"),
    ),
    "health": (
        "exit 0 iff ADDRESS answers SERVING on grpc.health.v1",
        _add_health,
        example("lmps health 127.0.0.1:50051 --timeout 5"),
    ),
    "certs": (
        "make a dev CA, server/client certificates and a token (docs/security.md)",
        _add_certs,
        example("lmps certs --out .lmps/certs --hosts coordinator"),
    ),
    "prepare": (
        "tokenize a corpus into the cache (train does this too)",
        _add_prepare,
        example("lmps prepare --data corpus.jsonl --vocab-size 4096"),
    ),
    "clean": (
        "remove local state: cluster logs, the local cluster's coordinator state",
        add_clean,
        example("lmps clean --cache"),
    ),
    "serve": (
        "run one service: coordinator, ps (parameter server) or worker",
        _add_serve,
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

"""Each `lmps` command's flags: `add_COMMAND(parser)` adds them and sets the function that
runs it (`lmps.client.commands`); `lmps.client.cli` lists the commands and builds the parser.

Nothing here imports torch at module level: `lmps --help` imports this module."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from lmps.client.cli_common import CACHE_DIR, coordinator_flag, train_flags
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
from lmps.rpc.flags import HelpFormatter, env_number


def add_demo(p: argparse.ArgumentParser) -> None:
    train_flags(p)
    p.set_defaults(func=cmd_demo, epochs=15, lr=6e-3)


def add_train(p: argparse.ArgumentParser) -> None:
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


def add_predict(p: argparse.ArgumentParser) -> None:
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


def add_chat(p: argparse.ArgumentParser) -> None:
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


def add_generate(p: argparse.ArgumentParser) -> None:
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


def add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run folder written by `lmps train` (runs/JOB by default, or its --out)",
    )
    p.set_defaults(func=cmd_report)


def add_export(p: argparse.ArgumentParser) -> None:
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


def add_status(p: argparse.ArgumentParser) -> None:
    coordinator_flag(p)
    p.set_defaults(func=cmd_status)


def add_shards(p: argparse.ArgumentParser) -> None:
    coordinator_flag(p)
    p.add_argument("--job", default="", help="job id (default: latest)")
    p.add_argument("--no-stats", action="store_true", help="skip norm/mean/max-abs (faster)")
    p.set_defaults(func=cmd_shards)


def add_health(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", nargs="?", default=f"127.0.0.1:{env_number('LMPS_PORT', 50051)}")
    p.add_argument("--service", default="", help="service name; empty = the whole server")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    p.set_defaults(func=cmd_health)


def add_certs(p: argparse.ArgumentParser) -> None:
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


def add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="builtin:pydoc")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--cache-dir", default=CACHE_DIR)
    p.set_defaults(func=cmd_prepare)


def add_serve(p: argparse.ArgumentParser) -> None:
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

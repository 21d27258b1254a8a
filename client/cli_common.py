"""What every `lmps` command shares: the console, the error line, the example epilogue,
the --coordinator flag and the `lmps train` / `lmps demo` flags built from `TrainOptions`.

Nothing here imports torch at module level: `lmps --help` imports this module."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console

from lmps.rpc.flags import env, env_number

if TYPE_CHECKING:
    from lmps.client.train_options import TrainOptions

CACHE_DIR = ".cache/lmps"
console = Console()


def error(message: object) -> None:
    """One line on stderr: `lmps: error: ...`."""
    print(f"lmps: error: {' '.join(str(message).split())}", file=sys.stderr)


def example(*lines: str) -> str:
    """A --help epilogue: `example:` (or `examples:`) and the command lines, indented."""
    return ("example:" if len(lines) == 1 else "examples:") + "".join(f"\n  {x}" for x in lines)


def default_coordinator() -> str:
    """The coordinator a command talks to when not told: LMPS_COORDINATOR, else the local one."""
    return env("LMPS_COORDINATOR", "127.0.0.1:50051")


def coordinator_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator",
        default=default_coordinator(),
        help="coordinator address host:port (LMPS_COORDINATOR; default %(default)s)",
    )


def train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per `TrainOptions` field that carries a `Flag`: name, help, choices and group
    from the field's metadata, type and default from the field."""
    from lmps.client.train_options import flags

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
        if isinstance(default, bool):  # an on/off switch: --flag turns it on
            kwargs["action"] = "store_false" if default else "store_true"
        elif not isinstance(default, str):
            kwargs["type"] = type(default)
        for key in ("help", "choices", "metavar"):
            if getattr(how, key) is not None:
                kwargs[key] = getattr(how, key)
        name = how.name or f"--{field.replace('_', '-')}"
        groups[how.group].add_argument(name, dest=field, **kwargs)


def options_from_args(args: argparse.Namespace, **overrides: object) -> TrainOptions:
    """The `TrainOptions` of parsed `lmps train` / `lmps demo` flags, with `overrides`."""
    from lmps.client.train_options import TrainOptions

    names = {f.name for f in dataclasses.fields(TrainOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return TrainOptions(**values)

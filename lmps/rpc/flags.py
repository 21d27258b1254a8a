"""Command-line flags shared by the three services; every flag has an LMPS_* env variable."""

from __future__ import annotations

import argparse
import copy
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lmps.rpc import security
from lmps.rpc.bootstrap import PortInUse, ServeOptions


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` with each flag's default (where it says something) and an epilog kept as
    written (the examples)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        text = action.help or ""
        if "%(default)" in text or "(default" in text or not action.option_strings:
            return False
        default = action.default
        # None, False (store_true), "" and [] say nothing worth a line; 0 does.
        return not (default is None or default is False or default in ("", [], argparse.SUPPRESS))

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._shows_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"  # a flag without help still shows it
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not self._shows_default(action) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


class EnvError(ValueError):
    """An LMPS_* variable that sets a flag's default holds a value the flag cannot take."""


def env_number(name: str, default: float | int, kind: type[float] | type[int] = int) -> Any:
    """The LMPS_* variable `name` as a `kind` (int or float), else `default`; a value that
    does not parse is an `EnvError` naming the variable (raised while the parser is built, so
    `--help` says it too, in one line)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return kind(default)
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise EnvError(f"{name}={raw!r} is not {what}: fix or unset it") from None


def add_serve_flags(
    parser: argparse.ArgumentParser, *, port: int, metrics_port: int, member: bool
) -> None:
    """--host/--port/--metrics-port/--grace, security flags (+ --coordinator/--id/--advertise).

    Security flags beat their LMPS_* variables process-wide (`lmps.rpc.security`).
    """
    g = parser.add_argument_group("listening")
    g.add_argument(
        "--host", default=env("LMPS_HOST", "0.0.0.0"), help="interface to bind (LMPS_HOST)"
    )
    g.add_argument(
        "--port", type=int, default=env_number("LMPS_PORT", port), help="gRPC port (LMPS_PORT)"
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=env_number("LMPS_METRICS_PORT", metrics_port),
        help="Prometheus /metrics port; -1 = off, 0 = any free port (LMPS_METRICS_PORT)",
    )
    g.add_argument(
        "--grace",
        type=float,
        default=env_number("LMPS_GRACE_S", 5.0, float),
        help="seconds in-flight RPCs get after SIGTERM (LMPS_GRACE_S)",
    )
    g.add_argument("--log-level", default=env("LMPS_LOG_LEVEL", "INFO"), help="(LMPS_LOG_LEVEL)")
    add_security_flags(parser)
    if member:
        m = parser.add_argument_group("membership")
        m.add_argument(
            "--coordinator",
            default=env("LMPS_COORDINATOR", "127.0.0.1:50051"),
            help="coordinator address host:port (LMPS_COORDINATOR)",
        )
        m.add_argument(
            "--id", default=env("LMPS_ID", ""), help="stable member id; empty = assigned (LMPS_ID)"
        )
        m.add_argument(
            "--advertise",
            default=env("LMPS_ADVERTISE", ""),
            help="host:port others dial to reach this service; "
            "default: this host's IP (LMPS_ADVERTISE)",
        )


class _ProcessSetting(argparse.Action):
    """Stores the flag and makes it this process's value of its LMPS_* variable, so the
    channels the service opens (membership, fan-out, pulls, pushes) follow the flag too."""

    def __init__(self, *args: Any, env_name: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env_name = env_name

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        security.set_setting(self.env_name, str(values))


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """TLS, token and limit flags; each overrides its LMPS_* variable (docs/security.md)."""
    g = parser.add_argument_group("security (docs/security.md)")

    def flag(name: str, env_name: str, help: str, default: str = "", **kw: Any) -> None:
        value: Any = env(env_name, default)
        if "type" in kw:  # checked here, so a bad variable is named (argparse would not)
            value = env_number(env_name, kw["type"](default), kw["type"])
        g.add_argument(
            name,
            action=_ProcessSetting,
            env_name=env_name,
            default=value,
            help=f"{help} ({env_name})",
            **kw,
        )

    flag("--tls-cert", "LMPS_TLS_CERT", "PEM certificate chain of this server: turns TLS on")
    flag("--tls-key", "LMPS_TLS_KEY", "PEM private key of --tls-cert")
    flag(
        "--tls-ca",
        "LMPS_TLS_CA",
        "PEM CA bundle verifying servers dialled and, with --tls-client-auth require, clients",
    )
    flag(
        "--tls-client-auth",
        "LMPS_TLS_CLIENT_AUTH",
        "require = mutual TLS: refuse clients without a certificate from --tls-ca",
        default="none",
        choices=security.CLIENT_AUTH_MODES,
    )
    flag(
        "--tls-client-cert",
        "LMPS_TLS_CLIENT_CERT",
        "certificate presented when dialling peers; default --tls-cert",
    )
    flag("--tls-client-key", "LMPS_TLS_CLIENT_KEY", "key of --tls-client-cert; default --tls-key")
    flag(
        "--tls-server-name",
        "LMPS_TLS_SERVER_NAME",
        "name expected in peers' certificates instead of the dialled host/IP",
    )
    flag(
        "--auth-token",
        "LMPS_AUTH_TOKEN",
        "shared bearer token required on every RPC but health; prefer the env or a file",
    )
    flag(
        "--auth-token-file",
        "LMPS_AUTH_TOKEN_FILE",
        "file holding the token (a mounted Kubernetes Secret)",
    )
    d = security.Limits()
    flag(
        "--max-message-mb",
        "LMPS_MAX_MESSAGE_MB",
        "largest message sent or received, MiB",
        type=int,
        default=str(d.max_message_bytes // security.MIB),
    )
    flag(
        "--max-stream-messages",
        "LMPS_MAX_STREAM_MESSAGES",
        "most messages in one client stream; 0 = unlimited",
        type=int,
        default=str(d.max_stream_messages),
    )
    flag(
        "--max-streams-per-peer",
        "LMPS_MAX_STREAMS_PER_PEER",
        "most concurrent RPCs from one client host; 0 = unlimited",
        type=int,
        default=str(d.max_streams_per_peer),
    )
    g.add_argument(
        "--health-port",
        type=int,
        default=env_number("LMPS_HEALTH_PORT", -1),
        help="extra plaintext port serving only grpc.health.v1, for probes that cannot do "
        "TLS; -1 = off (LMPS_HEALTH_PORT)",
    )


def serve_options(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        grace_s=args.grace,
        health_port=getattr(args, "health_port", -1),
        security=security.load(),
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # `kill -USR1 PID` prints every thread's stack to the log: the first thing to look at
    # when a service seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def run_service(main: Callable[[], int], prog: str) -> int:
    """Run a service's `main`; a bad LMPS_* value or a taken port is one line on stderr and
    exit code 2, not a traceback (`python -m lmps.services.ROLE.main`, `lmps serve ROLE`)."""
    try:
        return main()
    except (EnvError, PortInUse) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2

"""Process-wide transport security and limits: TLS / mutual TLS, a bearer token, message and
stream limits. One `Security` value describes both sides of a process: how its server listens
(`lmps.rpc.bootstrap`) and how its channels dial (`lmps.rpc.channel`).

Every setting is an LMPS_* environment variable; a service's command-line flag of the same
name (`lmps.rpc.flags`) overrides it for the whole process, so the channels a service opens to its
peers (membership, fan-out, pulls and pushes) follow the flags too. See docs/security.md.

  LMPS_TLS_CERT, LMPS_TLS_KEY   this server's certificate chain and key (PEM): TLS on
  LMPS_TLS_CA                   CA bundle that verifies peers: servers as a client, and
                                clients' certificates as a server (mutual TLS)
  LMPS_TLS_CLIENT_AUTH          require | none (default): demand a client certificate
  LMPS_TLS_CLIENT_CERT, _KEY    certificate a client presents (default: LMPS_TLS_CERT/_KEY)
  LMPS_TLS_SERVER_NAME          name to expect in servers' certificates instead of the host
                                dialled (members dial each other by IP)
  LMPS_AUTH_TOKEN, _FILE        shared bearer token (or a file holding it, e.g. a Secret)
  LMPS_MAX_MESSAGE_MB           largest message either way (default 256)
  LMPS_MAX_STREAM_MESSAGES      most messages in one client stream (default 100000; 0 = any)
  LMPS_MAX_STREAMS_PER_PEER     most concurrent RPCs from one client host (default 32; 0 = any)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("lmps.rpc.security")

MIB = 1024 * 1024
CLIENT_AUTH_MODES = ("none", "require")

# Set by command-line flags (lmps.rpc.flags): a flag beats its environment variable, process-wide.
_overrides: dict[str, str] = {}


def set_setting(name: str, value: str) -> None:
    """Make `value` this process's setting `name` (an LMPS_* name), over the environment."""
    _overrides[name] = value


def clear_settings() -> None:
    """Forget flag overrides (tests)."""
    _overrides.clear()


def setting(name: str, default: str = "", environ: Mapping[str, str] | None = None) -> str:
    """A flag override, else the environment variable, else `default`."""
    if name in _overrides:
        return _overrides[name]
    return (os.environ if environ is None else environ).get(name, default)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{what}: cannot read {path}: {err.strerror}") from None


@dataclass(frozen=True)
class Tls:
    """Certificate files (PEM paths). Empty strings mean "not configured"."""

    cert: str = ""
    """This server's certificate chain; with `key`, the server listens with TLS."""
    key: str = ""
    """Private key of `cert`."""
    ca: str = ""
    """CA bundle that verifies servers (as a client) and client certificates (as a server)."""
    client_auth: str = "none"
    """"require": the server refuses a handshake without a certificate signed by `ca`."""
    client_cert: str = ""
    """Certificate this process presents when it dials; default `cert`."""
    client_key: str = ""
    """Private key of `client_cert`; default `key`."""
    server_name: str = ""
    """Name expected in servers' certificates instead of the dialled host (SAN override)."""

    def __post_init__(self) -> None:
        if self.client_auth not in CLIENT_AUTH_MODES:
            raise ValueError(
                f"TLS client auth must be one of {CLIENT_AUTH_MODES}, got {self.client_auth!r}"
            )
        if bool(self.cert) != bool(self.key):
            raise ValueError("TLS needs both a certificate and its key (LMPS_TLS_CERT/_KEY)")
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError(
                "a client certificate needs its key (LMPS_TLS_CLIENT_CERT/_KEY), and vice versa"
            )
        if self.client_auth == "require" and not self.ca:
            raise ValueError("LMPS_TLS_CLIENT_AUTH=require needs a CA (LMPS_TLS_CA)")

    @property
    def serving(self) -> bool:
        """Whether a server of this process listens with TLS."""
        return bool(self.cert)

    @property
    def dialing(self) -> bool:
        """Whether this process's channels use TLS: a CA or a certificate is configured."""
        return bool(self.ca or self.cert or self.client_cert)

    def server_credentials(self) -> grpc.ServerCredentials:
        if not self.serving:
            raise ValueError("no server certificate configured (LMPS_TLS_CERT/_KEY)")
        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        require = self.client_auth == "require"
        return grpc.ssl_server_credentials(
            [pair],
            root_certificates=_read(self.ca, "TLS CA") if require else None,
            require_client_auth=require,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert = self.client_cert or self.cert
        key = self.client_key or self.key
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA") if self.ca else None,
            private_key=_read(key, "TLS client key") if key else None,
            certificate_chain=_read(cert, "TLS client certificate") if cert else None,
        )


@dataclass(frozen=True)
class Limits:
    """What one client may ask of a server. 0 disables a count limit."""

    max_message_bytes: int = 256 * MIB
    """Largest message sent or received (gRPC's own limit; over it: RESOURCE_EXHAUSTED)."""
    max_stream_messages: int = 100_000
    """Most messages in one client stream (Push, Load, SubmitJob). A GPT-2 push at 1 MiB
    shards is ~500 messages; a corpus streams in parts of a few MiB."""
    max_streams_per_peer: int = 32
    """Most RPCs in flight from one client host at once. A worker holds ~2 per server (a
    pull and a push) and ~2 on the coordinator; a local cluster shares 127.0.0.1."""

    def __post_init__(self) -> None:
        if self.max_message_bytes < 4 * MIB:
            raise ValueError("max message size must be >= 4 MiB")
        if self.max_stream_messages < 0 or self.max_streams_per_peer < 0:
            raise ValueError("stream limits must be >= 0 (0 = unlimited)")


@dataclass(frozen=True)
class Security:
    """TLS, token and limits of one process, server and client side alike."""

    tls: Tls = field(default_factory=Tls)
    token: str = field(default="", repr=False)
    """Shared bearer token: servers require it on every RPC but health; channels send it."""
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if any(c.isspace() for c in self.token):
            raise ValueError("the auth token must not contain whitespace")


def _int(name: str, default: int, environ: Mapping[str, str] | None) -> int:
    raw = setting(name, "", environ) or str(default)
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _token(environ: Mapping[str, str] | None) -> str:
    token = setting("LMPS_AUTH_TOKEN", "", environ).strip()  # a Secret may end in "\n"
    path = setting("LMPS_AUTH_TOKEN_FILE", "", environ)
    if token and path:
        raise ValueError("set LMPS_AUTH_TOKEN or LMPS_AUTH_TOKEN_FILE, not both")
    if path:
        token = _read(path, "auth token file").decode().strip()
        if not token:
            raise ValueError(f"auth token file {path} is empty")
    return token


def load(environ: Mapping[str, str] | None = None) -> Security:
    """This process's settings: flag overrides, then `environ` (default os.environ)."""

    def s(name: str, default: str = "") -> str:
        return setting(name, default, environ)

    tls = Tls(
        cert=s("LMPS_TLS_CERT"),
        key=s("LMPS_TLS_KEY"),
        ca=s("LMPS_TLS_CA"),
        client_auth=s("LMPS_TLS_CLIENT_AUTH", "none").lower() or "none",
        client_cert=s("LMPS_TLS_CLIENT_CERT"),
        client_key=s("LMPS_TLS_CLIENT_KEY"),
        server_name=s("LMPS_TLS_SERVER_NAME"),
    )
    d = Limits()
    limits = Limits(
        max_message_bytes=_int("LMPS_MAX_MESSAGE_MB", d.max_message_bytes // MIB, environ) * MIB,
        max_stream_messages=_int("LMPS_MAX_STREAM_MESSAGES", d.max_stream_messages, environ),
        max_streams_per_peer=_int("LMPS_MAX_STREAMS_PER_PEER", d.max_streams_per_peer, environ),
    )
    return Security(tls=tls, token=_token(environ), limits=limits)


# -- client side: attach the token to every call -------------------------------------------


Metadata = tuple[tuple[str, str | bytes], ...]


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: Metadata) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._header: tuple[str, str | bytes] = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        kept = tuple(m for m in (details.metadata or ()) if m[0] != "authorization")
        return _ClientCallDetails(details, (*kept, self._header))

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._call(continuation, details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._call(continuation, details, request)

    def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        return self._call(continuation, details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        return self._call(continuation, details, request_iterator)

"""Client-side gRPC channels: one place for message limits, keepalive, TLS and the token.

Keepalive settings follow gRPC's keepalive guide (grpc/grpc, doc/keepalive.md): a client's
pings must be accepted by the server's ping policy, or the server answers with GOAWAY.
"""

from __future__ import annotations

import logging

import grpc

from lmps.rpc import security

log = logging.getLogger("lmps.rpc.channel")

# Parameter shards and data leases are far larger than gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = security.Limits().max_message_bytes

# Default deadline of a unary call, in seconds. Streaming calls set their own.
DEFAULT_TIMEOUT_S = 30.0

KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Server side: accept those pings. The default (one per 5 minutes without data) answers
    # a long-lived idle stream's keepalive with GOAWAY "too many pings".
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def message_options(max_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


# The default options (kept for callers that build their own channels or servers).
CHANNEL_OPTIONS: list[tuple[str, int]] = [*message_options(MAX_MESSAGE_BYTES), *KEEPALIVE_OPTIONS]

_warned_plaintext_token = False


def open_channel(address: str, *, config: security.Security | None = None) -> grpc.Channel:
    """A channel to `address` ("host:port") with lmps' limits.

    `config` defaults to this process's settings (`security.load()`: LMPS_* variables and
    service flags): TLS (mutual when a client certificate is configured) and the bearer token
    on every call when they are set, a plaintext channel otherwise.
    """
    global _warned_plaintext_token
    sec = security.load() if config is None else config
    options: list[tuple[str, int | str]] = [
        *message_options(sec.limits.max_message_bytes),
        *KEEPALIVE_OPTIONS,
    ]
    if sec.tls.dialing:
        if sec.tls.server_name:
            options.append(("grpc.ssl_target_name_override", sec.tls.server_name))
        channel = grpc.secure_channel(address, sec.tls.channel_credentials(), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
        if sec.token and not _warned_plaintext_token:
            _warned_plaintext_token = True
            log.warning("sending the auth token without TLS: set LMPS_TLS_CA to encrypt it")
    if sec.token:
        channel = grpc.intercept_channel(channel, security.TokenInterceptor(sec.token))
    return channel

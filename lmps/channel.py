"""Client-side gRPC channels: one place for message limits, keepalive and deadlines."""

from __future__ import annotations

import grpc

# Parameter shards and data leases are far larger than gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# Default deadline of a unary call, in seconds. Streaming calls set their own.
DEFAULT_TIMEOUT_S = 30.0

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def open_channel(address: str) -> grpc.Channel:
    """An insecure channel to `address` ("host:port") with lmps' limits."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)

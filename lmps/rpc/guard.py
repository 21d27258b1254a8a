"""The server's gate: bearer-token authentication and per-client limits, as one interceptor.

Checked before a handler runs, so a refused call touches nothing:
- the token (metadata `authorization: Bearer <token>`, constant-time compare) on every RPC
  but grpc.health.v1 (probes carry no token) -> UNAUTHENTICATED;
- RPCs in flight from one client host -> RESOURCE_EXHAUSTED beyond `max_streams_per_peer`;
- messages in one client stream -> RESOURCE_EXHAUSTED beyond `max_stream_messages` (the
  stream is cut before the servicer acts: pushes and loads are validated whole first).
Health is exempt from all three; reflection needs the token (grpcurl -H).
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import prometheus_client

from lmps.rpc.metrics import RpcMetrics
from lmps.rpc.security import Limits

EXEMPT_PREFIX = "/grpc.health.v1.Health/"


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string: "ipv4:10.0.0.7:5123" -> "10.0.0.7"."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") or rest
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return peer  # unix sockets and the like: the whole string


class PeerSlots:
    """Counts RPCs in flight per client host."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}

    def acquire(self, peer: str) -> Callable[[], None] | None:
        """A release function, or None when `peer` already has `limit` calls in flight."""
        with self._lock:
            n = self._in_flight.get(peer, 0)
            if self.limit and n >= self.limit:
                return None
            self._in_flight[peer] = n + 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                left = self._in_flight[peer] - 1
                if left:
                    self._in_flight[peer] = left
                else:
                    del self._in_flight[peer]

        return release

    def in_flight(self, peer: str) -> int:
        with self._lock:
            return self._in_flight.get(peer, 0)


def _authorized(metadata: Any, expected: bytes) -> bool:
    for key, value in metadata or ():
        if key == "authorization":
            got = value if isinstance(value, bytes) else str(value).encode()
            return hmac.compare_digest(got, expected)
    return False


def _rebuild(handler: Any, wrap: Callable[[Callable[..., Any], bool, bool], Any]) -> Any:
    """The same kind of handler, its behaviour wrapped: wrap(behavior, req_stream, resp_stream)."""
    ser = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False, False), **ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, True, False), **ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, False, True), **ser)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True, True), **ser)


def _refuse(code: grpc.StatusCode, message: str) -> Callable[..., Any]:
    def wrap(_behavior: Callable[..., Any], _req: bool, _resp: bool) -> Callable[..., Any]:
        def run(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, message)

        return run

    return wrap


class Guard(grpc.ServerInterceptor):
    """Token check and per-client limits for every RPC but health."""

    def __init__(
        self, *, token: str, limits: Limits, rejected: prometheus_client.Counter | None = None
    ) -> None:
        """`rejected`: lmps_rpc_rejected_total (`lmps.rpc.metrics.RpcMetrics`); None = a
        counter on a registry of its own, which nobody scrapes."""
        if rejected is None:
            rejected = RpcMetrics(prometheus_client.CollectorRegistry()).rejected
        self.rejected = rejected
        self._expected = f"Bearer {token}".encode() if token else b""
        self.limits = limits
        self.slots = PeerSlots(limits.max_streams_per_peer)

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIX):
            return handler
        if self._expected and not _authorized(details.invocation_metadata, self._expected):
            self.rejected.labels("unauthenticated").inc()
            return _rebuild(
                handler,
                _refuse(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token"),
            )
        if not (self.limits.max_streams_per_peer or self.limits.max_stream_messages):
            return handler
        return _rebuild(handler, self._limited)

    def _enter(self, context: grpc.ServicerContext) -> Callable[[], None]:
        peer = peer_host(context.peer())
        release = self.slots.acquire(peer)
        if release is None:
            self.rejected.labels("streams_per_peer").inc()
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many concurrent calls from {peer} (limit {self.slots.limit}, "
                "LMPS_MAX_STREAMS_PER_PEER)",
            )
            raise AssertionError("unreachable")  # abort raises
        context.add_callback(release)  # also on cancellation, whatever the handler does
        return release

    def _counted(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        limit = self.limits.max_stream_messages
        for n, msg in enumerate(requests, 1):
            if limit and n > limit:
                self.rejected.labels("stream_messages").inc()
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"stream longer than {limit} messages (LMPS_MAX_STREAM_MESSAGES)",
                )
            yield msg

    def _limited(
        self, behavior: Callable[..., Any], request_stream: bool, response_stream: bool
    ) -> Callable[..., Any]:
        def args(request: Any, context: grpc.ServicerContext) -> Any:
            return self._counted(request, context) if request_stream else request

        if response_stream:

            def run_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                release = self._enter(context)
                try:
                    yield from behavior(args(request, context), context)
                finally:
                    release()

            return run_stream

        def run(request: Any, context: grpc.ServicerContext) -> Any:
            release = self._enter(context)
            try:
                return behavior(args(request, context), context)
            finally:
                release()

        return run

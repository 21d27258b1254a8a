"""A bare grpcio byte stream: the floor under lmps's Pull and Push on the same channel.

No protobuf and no lmps code: a generic handler whose messages are `bytes` as they are (no
request or response serializer), with lmps's channel and server options (message limits,
keepalive). `Pull` streams the server's chunks down; `Push` streams the client's up and
answers the byte count.

Server: `python -m bench.wire_bare --port P --sizes S1,S2,...` (one message per size).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent import futures

import grpc

from lmps.rpc.channel import KEEPALIVE_OPTIONS, MAX_MESSAGE_BYTES, message_options, open_channel

SERVICE = "bench.Wire"
PULL = f"/{SERVICE}/Pull"
PUSH = f"/{SERVICE}/Push"


def chunks(sizes: Sequence[int]) -> list[bytes]:
    """Random bytes (nothing on the path compresses, but no page is shared either), one
    object per message, made once so the timed calls only move them."""
    data = os.urandom(sum(sizes))
    out, offset = [], 0
    for n in sizes:
        out.append(data[offset : offset + n])
        offset += n
    return out


class _Handlers:
    def __init__(self, payload: list[bytes]) -> None:
        self.payload = payload

    def pull(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self.payload

    def push(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return sum(len(m) for m in requests).to_bytes(8, "little")


def serve(port: int, sizes: Sequence[int]) -> None:
    handlers = _Handlers(chunks(sizes))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[*message_options(MAX_MESSAGE_BYTES), *KEEPALIVE_OPTIONS],
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Pull": grpc.unary_stream_rpc_method_handler(handlers.pull),
                    "Push": grpc.stream_unary_rpc_method_handler(handlers.push),
                },
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


class BareClient:
    """Pull and Push against a `serve` process; each call moves `sum(sizes)` bytes."""

    def __init__(self, address: str, sizes: Sequence[int], timeout_s: float = 60.0) -> None:
        self.channel = open_channel(address)
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        # No serializers: the messages are the bytes objects themselves.
        self._pull = self.channel.unary_stream(
            PULL, request_serializer=None, response_deserializer=None
        )
        self._push = self.channel.stream_unary(
            PUSH, request_serializer=None, response_deserializer=None
        )
        self.payload = chunks(sizes)
        self.nbytes = sum(sizes)

    def pull(self) -> None:
        got = sum(len(m) for m in self._pull(b"", timeout=600))
        if got != self.nbytes:
            raise RuntimeError(f"bare pull got {got} bytes, expected {self.nbytes}")

    def push(self) -> None:
        got = int.from_bytes(self._push(iter(self.payload), timeout=600), "little")
        if got != self.nbytes:
            raise RuntimeError(f"bare push delivered {got} bytes, expected {self.nbytes}")

    def close(self) -> None:
        self.channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wire_bare")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sizes", required=True, help="message sizes in bytes, comma-separated")
    args = parser.parse_args(argv)
    serve(args.port, [int(s) for s in args.sizes.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())

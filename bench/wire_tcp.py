"""A raw TCP socket: the floor under any byte stream on 127.0.0.1 (`sendall` / `recv_into`).

One connection; a request is 9 bytes (op + length). Pull ("P"): the server `sendall`s that
many bytes from a buffer made at start. Push ("U"): the client `sendall`s them, the server
`recv_into`s a buffer and answers one byte, so the client's time covers the delivery.

Server: `python -m bench.wire_tcp --port P --nbytes N`.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

HEADER = struct.Struct("<cQ")
PULL, PUSH = b"P", b"U"


def _recv_into(conn: socket.socket, view: memoryview) -> bool:
    """Fill `view` from `conn`; False if the peer closed first."""
    while view:
        n = conn.recv_into(view)
        if n == 0:
            return False
        view = view[n:]
    return True


def serve(port: int, nbytes: int) -> None:
    source = memoryview(bytearray(os.urandom(nbytes)))
    sink = memoryview(bytearray(nbytes))
    head = memoryview(bytearray(HEADER.size))
    with socket.create_server(("127.0.0.1", port)) as server:
        while True:
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                while _recv_into(conn, head):
                    op, n = HEADER.unpack(head)
                    if op == PULL:
                        conn.sendall(source[:n])
                    elif _recv_into(conn, sink[:n]):
                        conn.sendall(b"k")


class TcpClient:
    def __init__(self, port: int, nbytes: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.nbytes = nbytes
        self.inbox = memoryview(bytearray(nbytes))
        self.outbox = memoryview(bytearray(os.urandom(nbytes)))
        self.ack = memoryview(bytearray(1))

    def pull(self) -> None:
        self.sock.sendall(HEADER.pack(PULL, self.nbytes))
        if not _recv_into(self.sock, self.inbox):
            raise ConnectionError("tcp server closed during a pull")

    def push(self) -> None:
        self.sock.sendall(HEADER.pack(PUSH, self.nbytes))
        self.sock.sendall(self.outbox)
        if not _recv_into(self.sock, self.ack):
            raise ConnectionError("tcp server closed during a push")

    def close(self) -> None:
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wire_tcp")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--nbytes", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.port, args.nbytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

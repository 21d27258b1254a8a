"""`codec`: throughput of lmps.rpc.codec vs two baselines, fp32 tensors of 64 KiB .. 16 MiB.

Every method does the whole trip a tensor makes over gRPC: tensor -> bytes (encode and
serialize) and bytes -> a new tensor (parse and decode). Methods:

- `lmps`: `codec.encode(t).SerializeToString()`, then
  `codec.decode(tensor_pb2.Tensor.FromString(b))`: raw little-endian bytes + dtype + shape.
- `torch.save`: `torch.save` to a BytesIO and `torch.load` back (weights_only, the default).
- `repeated float`: a protobuf message with one packed `repeated float` field, defined at
  run time with `descriptor_pb2` (what DESIGN.md rules out). Encode is
  `msg.values.extend(t.tolist())` (the fastest of extend(list) / slice assignment /
  extend(array.array) tried here), decode is `np.array(msg.values, dtype=float32)`.
- `memcpy`: `t.numpy().tobytes()` and `torch.frombuffer(bytearray(b))`: the two copies any
  byte-based codec needs; the floor lmps.rpc.codec is measured against.

Methods are interleaved within each repeat so that a noisy moment hits all of them.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory
from rich.table import Table

from bench.common import (
    Context,
    environment,
    human_bytes,
    mb_per_s,
    median,
    time_per_call,
    write_result,
)
from lmps.rpc import codec
from lmps.v1 import tensor_pb2

NAME = "codec"

METHODS = ("lmps", "torch.save", "repeated float", "memcpy")
BASELINES = ("torch.save", "repeated float", "memcpy")

Encoder = Callable[[torch.Tensor], bytes]
Decoder = Callable[[bytes], torch.Tensor]


def _floats_message() -> type[message.Message]:
    """A proto3 message `Floats { repeated float values = 1; }` (packed by default)."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="lmps_bench/floats.proto", package="lmps_bench", syntax="proto3"
    )
    msg = fdp.message_type.add(name="Floats")
    msg.field.add(
        name="values",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("lmps_bench.Floats"))


def _methods() -> dict[str, tuple[Encoder, Decoder]]:
    floats = _floats_message()

    def lmps_enc(t: torch.Tensor) -> bytes:
        return codec.encode(t).SerializeToString()

    def lmps_dec(b: bytes) -> torch.Tensor:
        return codec.decode(tensor_pb2.Tensor.FromString(b))

    def save_enc(t: torch.Tensor) -> bytes:
        buf = io.BytesIO()
        torch.save(t, buf)
        return buf.getvalue()

    def save_dec(b: bytes) -> torch.Tensor:
        out: torch.Tensor = torch.load(io.BytesIO(b))
        return out

    def pb_enc(t: torch.Tensor) -> bytes:
        msg = floats()
        msg.values.extend(t.reshape(-1).tolist())  # type: ignore[attr-defined]
        return msg.SerializeToString()

    def pb_dec(b: bytes) -> torch.Tensor:
        values = floats.FromString(b).values  # type: ignore[attr-defined]
        return torch.from_numpy(np.array(values, dtype=np.float32))

    def copy_enc(t: torch.Tensor) -> bytes:
        return t.numpy().tobytes()

    def copy_dec(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.float32)

    return {
        "lmps": (lmps_enc, lmps_dec),
        "torch.save": (save_enc, save_dec),
        "repeated float": (pb_enc, pb_dec),
        "memcpy": (copy_enc, copy_dec),
    }


def _check(methods: dict[str, tuple[Encoder, Decoder]]) -> None:
    """Each method must really round-trip, or its speed means nothing."""
    t = torch.randn(1000)
    for name, (enc, dec) in methods.items():
        back = dec(enc(t)).reshape(-1)
        if not torch.equal(back, t):
            raise AssertionError(f"{name} does not round-trip")


def run(ctx: Context) -> dict[str, Any]:
    started = environment()
    torch.manual_seed(0)
    sizes = (
        [64 << 10, 1 << 20, 16 << 20] if ctx.quick else [(64 << 10) << (2 * k) for k in range(5)]
    )
    repeats = 3 if ctx.quick else 5
    min_s = 0.03 if ctx.quick else 0.08
    methods = _methods()
    _check(methods)

    rows: list[dict[str, Any]] = []
    for nbytes in sizes:
        t = torch.randn(nbytes // 4)
        blobs = {name: enc(t) for name, (enc, _) in methods.items()}
        enc_s: dict[str, list[float]] = {m: [] for m in METHODS}
        dec_s: dict[str, list[float]] = {m: [] for m in METHODS}
        for _ in range(repeats):
            for name, (enc, dec) in methods.items():
                blob = blobs[name]
                enc_s[name].append(time_per_call(partial(enc, t), min_s))
                dec_s[name].append(time_per_call(partial(dec, blob), min_s))
        row: dict[str, Any] = {"bytes": nbytes, "repeats": repeats}
        for m in METHODS:
            # Median of per-repeat round trips (encode + decode timed in the same repeat).
            trips = [e + d for e, d in zip(enc_s[m], dec_s[m], strict=True)]
            row[m] = {
                "encode_mb_s": mb_per_s(nbytes, median(enc_s[m])),
                "decode_mb_s": mb_per_s(nbytes, median(dec_s[m])),
                "round_trip_mb_s": mb_per_s(nbytes, median(trips)),
                "wire_bytes": len(blobs[m]),
                "round_trip_s": trips,
            }
        for b in BASELINES:
            row[f"lmps_vs_{b}"] = row["lmps"]["round_trip_mb_s"] / row[b]["round_trip_mb_s"]
        rows.append(row)
        ctx.console.log(f"codec {human_bytes(nbytes)} done")

    _print(ctx, rows)
    payload = {
        "environment": started,
        "params": {"sizes": sizes, "repeats": repeats, "min_sample_s": min_s},
        "unit": "MB/s = 10^6 tensor bytes per second; round trip = encode + decode",
        "rows": rows,
    }
    path = write_result(ctx, NAME, payload)
    ctx.console.print(f"wrote {path}")
    return payload


def _print(ctx: Context, rows: list[dict[str, Any]]) -> None:
    table = Table(title="codec: fp32 tensor -> bytes -> tensor, round-trip MB/s (median)")
    table.add_column("size", justify="right")
    for m in METHODS:
        table.add_column(m, justify="right")
    table.add_column("lmps / torch.save", justify="right")
    table.add_column("lmps / repeated float", justify="right")
    table.add_column("lmps / memcpy", justify="right")
    for r in rows:
        table.add_row(
            human_bytes(r["bytes"]),
            *(f"{r[m]['round_trip_mb_s']:,.0f}" for m in METHODS),
            f"{r['lmps_vs_torch.save']:.2f}x",
            f"{r['lmps_vs_repeated float']:.1f}x",
            f"{r['lmps_vs_memcpy']:.2f}x",
        )
    ctx.console.print(table)
    detail = Table(title="codec: encode / decode MB/s (median)")
    detail.add_column("size", justify="right")
    for m in METHODS:
        detail.add_column(f"{m} enc / dec", justify="right")
    for r in rows:
        detail.add_row(
            human_bytes(r["bytes"]),
            *(f"{r[m]['encode_mb_s']:,.0f} / {r[m]['decode_mb_s']:,.0f}" for m in METHODS),
        )
    ctx.console.print(detail)

"""Compressed pushes: what a worker sends instead of a dense fp32 shard, and error feedback.

Two lossy encodings of a 1-D fp32 shard (one table, `COMPRESSIONS`: name -> encoder):

- "int8": blockwise absmax quantization. The shard is cut in chunks of `chunk` elements; each
  chunk travels as int8 q = round(x / s) with one fp32 scale s = max|x| / 127, decoded as
  q * s, so every element is off by at most s / 2. About 1 + 4 / chunk bytes per element
  instead of 4. Why 1024 by default: the scales cost 4 / 1024 = 0.4 % on top of the int8
  payload (3.98x smaller than fp32), while one outlier only coarsens the 1023 values of its
  own chunk rather than a whole shard (a 1 MiB shard is 256 Ki elements); block-wise 8-bit
  optimizer states (Dettmers et al., "8-bit Optimizers via Block-wise Quantization",
  ICLR 2022) use blocks of 2048 for the same trade-off.
- "topk": sparsification (Aji & Heafield, "Sparse Communication for Distributed Gradient
  Descent", EMNLP 2017; SparseLoCo applies it chunk-wise to DiLoCo's pseudo-gradients). Only
  the k = ceil(ratio * numel) largest-|x| values are sent, in the wire dtype, with their int32
  indices: (itemsize + 4) * ratio bytes per element, 0.08 for fp32 at ratio 0.01.

Both are biased on their own. `ErrorFeedback` makes them unbiased over time (EF-SGD:
Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
ICML 2019; the residual of Seide et al.'s 1-bit SGD, Interspeech 2014): the worker keeps a
residual per shard, compresses x + residual, and keeps residual = (x + residual) - decoded.
So over T pushes, sum(decoded) = sum(x) - residual_T: nothing is lost, only delayed, and the
mean of what was sent differs from the mean of the true values by residual_T / T.

A third, lossless encoding is not a setting: `Rows` (`lmps.core.sparse_rows`), an embedding
shard's nonzero rows, which an uncompressed ("none") push uses whenever it is smaller.

Pure torch, device-agnostic (a CUDA gradient is compressed on the GPU and only the compact
payload is copied to the host by the codec); no grpc. `lmps.rpc.codec` frames an `Encoded`
as a `lmps.v1.Compressed` ShardTensor and reads it back, calling `validate` on what arrives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, get_args

import torch
from torch import Tensor

from lmps.core.sparse_rows import Rows

CompressionKind = Literal["none", "int8", "topk"]
"""Names of the push encodings (keys of `COMPRESSIONS`)."""
KINDS: tuple[str, ...] = get_args(CompressionKind)

DEFAULT_CHUNK = 1024  # int8: elements per scale (see the module docstring)
DEFAULT_RATIO = 0.01  # topk: fraction of each shard's elements sent
MAX_NUMEL = 2**31 - 1  # a compressed shard's indices are int32


@dataclass(frozen=True)
class Compression:
    """How a worker compresses its pushes (the setting `ServerPool` takes)."""

    kind: CompressionKind = "none"
    """"none" (dense, the wire dtype), "int8" or "topk"."""
    chunk: int = DEFAULT_CHUNK
    """int8: elements per fp32 scale, in [1, 2^31)."""
    ratio: float = DEFAULT_RATIO
    """topk: fraction of each shard's elements sent, in (0, 1]."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"compression must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int):
            raise ValueError(f"compression chunk must be an int, got {self.chunk!r}")
        if not 1 <= self.chunk <= MAX_NUMEL:
            raise ValueError(f"compression chunk must be in [1, 2^31), got {self.chunk}")
        if not (math.isfinite(self.ratio) and 0.0 < self.ratio <= 1.0):
            raise ValueError(f"top-k ratio must be in (0, 1], got {self.ratio!r}")

    @property
    def spec(self) -> str:
        """The text `compression_from_name` reads back: "none", "int8:1024", "topk:0.01"."""
        if self.kind == "int8":
            return f"int8:{self.chunk}"
        if self.kind == "topk":
            return f"topk:{self.ratio!r}"
        return "none"

    def k(self, numel: int) -> int:
        """topk: ceil(ratio * numel), at least 1 and at most numel. The ratio is taken as the
        decimal it was written as (0.07 * 100 is 7.000000000000001 in floats: k = 7, not 8)."""
        return min(numel, max(1, math.ceil(Fraction(repr(self.ratio)) * numel)))


NONE = Compression()


def compression_from_name(text: str) -> Compression:
    """Parse a `--push-compression` value: "none", "int8", "int8:CHUNK" (e.g. "int8:2048"),
    "topk" (ratio 0.01) or "topk:RATIO" (e.g. "topk:0.01"). ValueError saying what is wrong."""
    kind, sep, arg = text.strip().lower().partition(":")
    if kind not in KINDS:
        raise ValueError(
            f"unknown push compression {text!r}: use none, int8[:CHUNK] or topk[:RATIO]"
        )
    if sep and not arg:
        raise ValueError(f"push compression {text!r}: nothing after ':'")
    if kind == "none":
        if sep:
            raise ValueError(f"push compression 'none' takes no argument, got {text!r}")
        return NONE
    if kind == "int8":
        if not sep:
            return Compression("int8")
        try:
            chunk = int(arg)
        except ValueError:
            raise ValueError(f"int8 chunk must be an integer, got {arg!r} in {text!r}") from None
        return Compression("int8", chunk=chunk)
    if not sep:
        return Compression("topk")
    try:
        ratio = float(arg)
    except ValueError:
        raise ValueError(f"top-k ratio must be a number, got {arg!r} in {text!r}") from None
    return Compression("topk", ratio=ratio)


# -- what travels ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dense:
    """An uncompressed shard ("none"): its values in the wire dtype."""

    values: Tensor  # (numel,) float

    @property
    def numel(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def decode(self) -> Tensor:
        return self.values.to(torch.float32)

    def validate(self) -> None:
        if self.values.dim() != 1 or not self.values.is_floating_point():
            raise ValueError("dense values must be a 1-D float tensor")


@dataclass(frozen=True)
class Int8Chunks:
    """A shard quantized per chunk ("int8"): element i is q[i] * scales[i // chunk]."""

    numel: int
    chunk: int
    q: Tensor  # (numel,) int8 in [-127, 127]
    scales: Tensor  # (ceil(numel / chunk),) fp32, finite, >= 0

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 4 * self.scales.numel()

    def decode(self) -> Tensor:
        """(numel,) fp32, a new tensor."""
        out = self.q.to(torch.float32)
        whole = self.numel // self.chunk  # chunks of exactly `chunk` elements
        end = whole * self.chunk
        out[:end].view(whole, self.chunk).mul_(self.scales[:whole, None])  # (whole, chunk)
        if end < self.numel:
            out[end:].mul_(self.scales[whole])  # the shorter last chunk
        return out

    def validate(self) -> None:
        """ValueError naming the first inconsistency (for what arrives from the wire)."""
        _check_numel(self.numel)
        if not 1 <= self.chunk <= MAX_NUMEL:
            raise ValueError(f"int8 chunk must be in [1, 2^31), got {self.chunk}")
        if self.q.dtype != torch.int8 or self.q.dim() != 1:
            raise ValueError(f"int8 payload must be 1-D int8, got {self.q.dtype} {_shape(self.q)}")
        if self.q.numel() != self.numel:
            raise ValueError(f"int8 payload has {self.q.numel()} elements for numel {self.numel}")
        want = -(-self.numel // self.chunk)
        if self.scales.dtype != torch.float32 or self.scales.shape != (want,):
            raise ValueError(
                f"int8 needs {want} fp32 scales (numel {self.numel}, chunk {self.chunk}), "
                f"got {self.scales.numel()}"
            )
        # One pass: aminmax keeps NaN and ±Inf at its ends (as the store's gradient check).
        lo, hi = (float(v) for v in torch.aminmax(self.scales))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("int8 scale is NaN or infinite")
        if lo < 0:
            raise ValueError(f"int8 scale is negative ({lo:g})")
        # q = -128 is outside what an encoder makes (round(x / s) is in [-127, 127]); harmless,
        # so it is not worth a pass over the payload to refuse.


@dataclass(frozen=True)
class TopK:
    """A sparse shard ("topk"): values at `indices`, every other element 0."""

    numel: int
    indices: Tensor  # (k,) int32, strictly increasing, in [0, numel)
    values: Tensor  # (k,) float, the wire dtype

    @property
    def nbytes(self) -> int:
        return self.values.numel() * (self.values.element_size() + 4)

    def decode(self) -> Tensor:
        """(numel,) fp32, a new tensor."""
        out = torch.zeros(self.numel, dtype=torch.float32, device=self.values.device)
        out[self.indices.long()] = self.values.to(torch.float32)
        return out

    def validate(self) -> None:
        """ValueError naming the first inconsistency (for what arrives from the wire)."""
        _check_numel(self.numel)
        if not self.values.is_floating_point() or self.values.dim() != 1:
            raise ValueError(
                f"top-k values must be a 1-D float tensor, got {self.values.dtype} "
                f"{_shape(self.values)}"
            )
        k = self.values.numel()
        if k > self.numel:
            raise ValueError(f"top-k sends {k} values for numel {self.numel}")
        if self.indices.dtype != torch.int32 or self.indices.shape != (k,):
            raise ValueError(f"top-k needs {k} int32 indices, got {self.indices.numel()}")
        if not k:
            return
        lo, hi = (int(v) for v in torch.aminmax(self.indices))
        if lo < 0 or hi >= self.numel:
            raise ValueError(f"top-k index out of [0, {self.numel}): {lo if lo < 0 else hi}")
        if k > 1 and not bool((self.indices[1:] > self.indices[:-1]).all()):
            raise ValueError("top-k indices are not strictly increasing (unsorted or repeated)")


Encoded = Dense | Int8Chunks | TopK | Rows
"""What a push sends for one shard; `Rows` only for an uncompressed push (`sparse_rows`)."""
Encoder = Callable[[Tensor, Compression, torch.dtype], Encoded]


def _check_numel(numel: int) -> None:
    if not 1 <= numel <= MAX_NUMEL:
        raise ValueError(f"compressed numel must be in [1, 2^31), got {numel}")


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


# -- encoders: (x (numel,) fp32, setting, wire dtype) -> what to send ----------------------------


def _dense(x: Tensor, c: Compression, dtype: torch.dtype) -> Encoded:
    return Dense(x.to(dtype))


def _int8(x: Tensor, c: Compression, dtype: torch.dtype) -> Encoded:
    n, chunk = x.numel(), c.chunk
    m = -(-n // chunk)  # chunks, the last one padded with zeros (they change no max)
    blocks = torch.nn.functional.pad(x, (0, m * chunk - n)).view(m, chunk)  # (m, chunk)
    scales = blocks.abs().amax(dim=1) / 127  # (m,); NaN or Inf stay, and the server refuses
    # A chunk of zeros has scale 0: divide it by 1 (its q is 0 either way).
    q = (blocks / torch.where(scales > 0, scales, 1.0)[:, None]).round_().clamp_(-127, 127)
    return Int8Chunks(numel=n, chunk=chunk, q=q.view(-1)[:n].to(torch.int8), scales=scales)


def _topk(x: Tensor, c: Compression, dtype: torch.dtype) -> Encoded:
    # A NaN ranks first, so it is sent (and the server refuses the push, as it refuses a
    # dense NaN) rather than silently dropped.
    a = x.abs()
    a = torch.where(a.isnan(), math.inf, a)
    idx = largest(a, c.k(x.numel()))
    return TopK(numel=x.numel(), indices=idx.to(torch.int32), values=x[idx].to(dtype))


def largest(a: Tensor, k: int) -> Tensor:
    """Ascending int64 indices of the k largest entries of the 1-D `a`; among equal entries
    the lower index wins, so the choice is a function of the values alone (torch.topk leaves
    ties unspecified)."""
    if k >= a.numel():
        return torch.arange(a.numel(), device=a.device)
    kth = torch.topk(a, k, sorted=False).values.min()  # the k-th largest value
    above = (a > kth).nonzero().view(-1)
    ties = (a == kth).nonzero().view(-1)[: k - above.numel()]  # nonzero is ascending
    return torch.cat((above, ties)).sort().values


COMPRESSIONS: dict[str, Encoder] = {"none": _dense, "int8": _int8, "topk": _topk}
"""Name -> encoder of a 1-D fp32 tensor (the names of `CompressionKind`)."""


def encode(x: Tensor, compression: Compression, dtype: torch.dtype = torch.float32) -> Encoded:
    """The 1-D `x` as `compression` sends it; `dtype` is the wire dtype of dense and top-k
    values (int8's scales are always fp32)."""
    if x.dim() != 1:
        raise ValueError(f"compress a 1-D shard, got shape {list(x.shape)}")
    return COMPRESSIONS[compression.kind](x.detach().to(torch.float32), compression, dtype)


class ErrorFeedback:
    """Per-shard residuals of one worker's compressed pushes (EF-SGD).

    `step` is the error-feedback step without keeping it, so that a push that fails keeps the
    residuals it started from (its values never reached a server: they must not be counted
    as sent); `commit` keeps a completed push's residuals. `compress` is both at once.
    Residuals are fp32, on the device of the values, one shard's worth each (one fp32 copy of
    the gradients the worker pushes). `step` may run concurrently for different shards;
    `commit` once a push is done.
    """

    def __init__(self, compression: Compression, dtype: torch.dtype = torch.float32) -> None:
        self.compression = compression
        self.dtype = dtype
        self.residuals: dict[str, Tensor] = {}

    def step(self, shard_id: str, x: Tensor) -> tuple[Encoded, Tensor]:
        """(what to send for x + residual, the residual to keep once it has been sent)."""
        v = x.detach().to(torch.float32)  # (numel,); x itself is never written
        r = self.residuals.get(shard_id)
        if r is not None:
            if r.shape != v.shape:
                raise ValueError(
                    f"shard {shard_id!r} has {v.numel()} elements, its residual {r.numel()}"
                )
            v = v + r
        sent = encode(v, self.compression, self.dtype)
        return sent, v - sent.decode()

    def commit(self, residuals: Mapping[str, Tensor]) -> None:
        """Keep the residuals `step` returned, for the shards of a push that completed."""
        self.residuals.update(residuals)

    def compress(self, shard_id: str, x: Tensor) -> Encoded:
        """`step` and `commit` at once: the residual is updated as the value is sent."""
        sent, residual = self.step(shard_id, x)
        self.residuals[shard_id] = residual
        return sent

    def reset(self) -> None:
        """Forget every residual (a new job, a new shard map)."""
        self.residuals.clear()

"""The one place where tensors become wire messages and back.

A `lmps.v1.Tensor` carries raw little-endian bytes in C order plus dtype and shape. Encoding
is one copy (`tobytes`); decoding is one copy into a fresh, writable, contiguous tensor.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import cast

import torch

from lmps.v1 import tensor_pb2

# proto enum value <-> torch dtype. Keep both directions in one table.
_TABLE: tuple[tuple[int, torch.dtype], ...] = (
    (tensor_pb2.FLOAT32, torch.float32),
    (tensor_pb2.FLOAT16, torch.float16),
    (tensor_pb2.BFLOAT16, torch.bfloat16),
    (tensor_pb2.FLOAT64, torch.float64),
    (tensor_pb2.INT64, torch.int64),
    (tensor_pb2.INT32, torch.int32),
    (tensor_pb2.INT16, torch.int16),
    (tensor_pb2.INT8, torch.int8),
    (tensor_pb2.UINT8, torch.uint8),
    (tensor_pb2.BOOL, torch.bool),
)
_TO_TORCH: dict[int, torch.dtype] = dict(_TABLE)
_TO_PROTO: dict[torch.dtype, tensor_pb2.DType] = {t: cast(tensor_pb2.DType, p) for p, t in _TABLE}
_NAMES: dict[str, torch.dtype] = {str(t).removeprefix("torch."): t for _, t in _TABLE}

# The wire is little-endian; every platform we ship on is too. Fail loudly rather than
# silently byte-swapping parameters on an exotic host.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("lmps.codec needs a little-endian host")


class CodecError(ValueError):
    """A wire tensor is malformed (unknown dtype, byte length not matching its shape...)."""


def to_torch_dtype(dtype: int) -> torch.dtype:
    """Proto `DType` value -> torch dtype. Raises CodecError for UNSPECIFIED or unknown."""
    try:
        return _TO_TORCH[dtype]
    except KeyError:
        raise CodecError(f"unsupported wire dtype {dtype}") from None


def to_proto_dtype(dtype: torch.dtype) -> tensor_pb2.DType:
    """torch dtype -> proto `DType` value."""
    try:
        return _TO_PROTO[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} cannot travel on the wire") from None


def dtype_from_name(name: str) -> torch.dtype:
    """'float32' / 'bfloat16' / ... -> torch dtype (for flags and configs)."""
    try:
        return _NAMES[name]
    except KeyError:
        raise CodecError(f"unknown dtype {name!r}; choose from {sorted(_NAMES)}") from None


def wire_dtype(dtype: int, default: torch.dtype = torch.float32) -> torch.dtype:
    """A request's optional dtype field: UNSPECIFIED means `default`."""
    return default if dtype == tensor_pb2.DTYPE_UNSPECIFIED else to_torch_dtype(dtype)


def encode(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> tensor_pb2.Tensor:
    """Tensor (any device) -> wire message, optionally cast to `dtype` first."""
    t = tensor.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    t = t.cpu().contiguous()
    shape = list(t.shape)
    # Byte view: works for every dtype including bfloat16, which numpy lacks.
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return tensor_pb2.Tensor(dtype=to_proto_dtype(t.dtype), shape=shape, data=data)


def expected_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel * dtype.itemsize


def decode(msg: tensor_pb2.Tensor) -> torch.Tensor:
    """Wire message -> a new CPU tensor. Raises CodecError when the message is inconsistent."""
    dtype = to_torch_dtype(msg.dtype)
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"negative dimension in shape {list(shape)}")
    want = expected_nbytes(dtype, shape)
    if len(msg.data) != want:
        raise CodecError(
            f"tensor of shape {list(shape)} and dtype {str(dtype).removeprefix('torch.')} "
            f"needs {want} bytes, got {len(msg.data)}"
        )
    if want == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray: frombuffer needs a writable buffer to hand out a writable tensor.
    flat = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)

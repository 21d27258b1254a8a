"""The one codec: where plain types become `lmps.v1` messages and back.

Tensors: a `lmps.v1.Tensor` carries raw little-endian bytes in C order plus dtype and shape
(never `repeated float`). Encoding is one copy (`tobytes`); decoding is one copy into a
fresh, writable, contiguous tensor. Configs and shard placements: field-for-field
conversions of the core's frozen dataclasses, so pure modules (model, optim, partition)
never see a protobuf; enum values map by name from the core's tables (optimizer kinds,
schedules, consistency modes), never through a second hand-written table.

As in ps-lite (github.com/dmlc/ps-lite), where only the van touches the wire format and
values travel as flat arrays (`SArray`), this is the one module that converts; BytePS
(Jiang et al., OSDI 2020) likewise moves tensors as raw contiguous byte buffers.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch

from lmps.core.compress import (
    DEFAULT_CHUNK,
    DEFAULT_RATIO,
    Compression,
    CompressionKind,
    Dense,
    Encoded,
    Int8Chunks,
    TopK,
)
from lmps.core.model import GPTConfig
from lmps.core.optim import (
    DEFAULTS,
    OPTIMIZERS,
    SCHEDULES,
    OptimizerKind,
    OptimizerRequest,
    OptimizerSettings,
    ScheduleName,
)
from lmps.core.partition import DEFAULT_SHARD_BYTES, Shard
from lmps.core.settings import (
    CONSISTENCIES,
    DEFAULT_BATCHES_PER_LEASE,
    DEFAULT_KEEP_CHECKPOINTS,
    DEFAULT_WAIT_FOR_MEMBERS_S,
    Consistency,
    JobSettings,
    LocalSteps,
)
from lmps.core.sparse_rows import RowGrid, Rows
from lmps.core.tasks import TASK_NAMES, TaskName
from lmps.v1 import job_pb2, parameter_pb2, tensor_pb2

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
    raise ImportError("lmps.rpc.codec needs a little-endian host")


# torch warns on every `frombuffer` of read-only bytes; `view_shard_tensor`'s views are
# only ever read (a filter once here: `catch_warnings` per message costs more than the parse).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


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


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) before its payload: tag and length."""
    return bytes((tag,)) + _varint(len(payload)) if payload else b""


Buffer = bytes | memoryview


def _tensor_fields(tensor: torch.Tensor, dtype: torch.dtype | None) -> tuple[bytes, Buffer]:
    """A `lmps.v1.Tensor` as (its bytes up to its data's, the data): the data is a view of
    the CPU tensor's memory, copied once when the caller joins the parts."""
    t = tensor.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    t = t.cpu().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
    shape = b"".join(_varint(d) for d in t.shape)
    # Tensor: 1 dtype (varint), 2 shape (packed varints), 3 data (bytes).
    head = b"\x08" + _varint(to_proto_dtype(t.dtype)) + _field(0x12, shape) + shape
    if len(data):
        head += b"\x1a" + _varint(len(data))
    return head, data


def _shard_frame(
    shard_id: str, version: int, head: bytes, data: Buffer, tail: bytes, wrap: int
) -> bytes:
    """ShardTensor: 1 shard_id (string), 2 version (varint), 3 tensor (`head` + `data`), then
    `tail` (field 4, compression, already framed); inside field `wrap` of a message when set."""
    size = len(head) + len(data)
    sid = shard_id.encode()
    outer = _field(0x0A, sid) + sid + (b"\x10" + _varint(version) if version else b"")
    outer += b"\x1a" + _varint(size)
    if wrap:
        outer = bytes((wrap << 3 | 2,)) + _varint(len(outer) + size + len(tail)) + outer
    return b"".join((outer, head, data, tail))


def shard_tensor_bytes(
    shard_id: str,
    version: int,
    tensor: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    wrap: int = 0,
) -> bytes:
    """A serialized `lmps.v1.ShardTensor`, byte for byte what `ShardTensor(shard_id=...,
    version=..., tensor=encode(tensor, dtype)).SerializeToString()` gives, in one copy of
    the tensor's bytes instead of three or more (`tobytes`, the message's own copy, one per
    enclosing message, serialization). `wrap`: the field number of an enclosing message the
    ShardTensor is the only field of (2: a `PushRequest.grad`).

    For messages sent pre-serialized (raw serializers: `bootstrap.raw_messages` on the
    server, raw multicallables in the worker's `ServerPool`): a parameter server encodes each
    shard once per version for all the pulls of that version. Wire format: protobuf encoding
    (protobuf.dev/programming-guides/encoding), fields in number order, proto3 defaults (0,
    empty) left out as protobuf does.
    """
    head, data = _tensor_fields(tensor, dtype)
    return _shard_frame(shard_id, version, head, data, b"", wrap)


def _compressed_tail(
    kind: int, numel: int, chunk: int, scales: bytes, indices: bytes, grid: RowGrid | None = None
) -> bytes:
    """ShardTensor field 4, a `Compressed`: 1 kind, 2 numel, 3 chunk (varints), 4 scales,
    5 indices (bytes), 6 row_width, 7 first_column (varints, ROWS); zeros and empty bytes
    left out, as protobuf does."""
    body = b"\x08" + _varint(kind) + (b"\x10" + _varint(numel) if numel else b"")
    body += (b"\x18" + _varint(chunk)) if chunk else b""
    body += _field(0x22, scales) + scales + _field(0x2A, indices) + indices
    if grid is not None:
        body += b"\x30" + _varint(grid.width)
        body += (b"\x38" + _varint(grid.first_column)) if grid.first_column else b""
    return b"\x22" + _varint(len(body)) + body


def _le_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def compressed_shard_bytes(shard_id: str, version: int, sent: Encoded, *, wrap: int = 0) -> bytes:
    """A serialized `lmps.v1.ShardTensor` carrying a compressed shard (`lmps.core.compress`):
    byte for byte what protobuf serializes for it, the payload copied once as in
    `shard_tensor_bytes`. A `Dense` one is a plain ShardTensor; `Rows` (lossless sparse rows,
    `lmps.core.sparse_rows`) is kind ROWS. Only pushes may carry these."""
    if isinstance(sent, Dense):
        return shard_tensor_bytes(shard_id, version, sent.values, wrap=wrap)
    if isinstance(sent, Rows):
        head, data = _tensor_fields(sent.values, None)
        indices = _le_bytes(sent.indices)
        tail = _compressed_tail(tensor_pb2.Compressed.ROWS, sent.numel, 0, b"", indices, sent.grid)
    elif isinstance(sent, Int8Chunks):
        head, data = _tensor_fields(sent.q, None)
        tail = _compressed_tail(
            tensor_pb2.Compressed.INT8, sent.numel, sent.chunk, _le_bytes(sent.scales), b""
        )
    else:
        head, data = _tensor_fields(sent.values, None)
        tail = _compressed_tail(
            tensor_pb2.Compressed.TOPK, sent.numel, 0, b"", _le_bytes(sent.indices)
        )
    return _shard_frame(shard_id, version, head, data, tail, wrap)


def _read_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise CodecError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: Buffer, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field in buf[pos:end]: a
    varint's value (end = -1), or a length-delimited field's byte range. Skips 32/64-bit
    fields; raises CodecError on anything malformed."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, pos = _read_varint(buf, pos, end)
            yield number, kind, value, -1
        elif kind == 2:
            n, pos = _read_varint(buf, pos, end)
            if pos + n > end:
                raise CodecError("length-delimited field runs past the message")
            yield number, kind, pos, pos + n
            pos += n
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            raise CodecError(f"unsupported wire type {kind}")
    if pos != end:
        raise CodecError("field runs past the message")


def _parse_shard_tensor(
    blob: Buffer,
) -> tuple[str, int, torch.Tensor, tuple[int, int] | None]:
    """(shard_id, version, tensor as a read-only view of `blob`, the byte range of its
    `compression` field or None when it has none). CodecError when malformed."""
    shard_id, version, tensor = "", 0, (0, 0)
    compression: tuple[int, int] | None = None
    dtype_value, shape, data = 0, [], (0, 0)
    for number, kind, a, b in _fields(blob, 0, len(blob)):
        if number == 1 and kind == 2:
            try:
                shard_id = bytes(blob[a:b]).decode()
            except UnicodeDecodeError:
                raise CodecError("shard_id is not UTF-8") from None
        elif number == 2 and kind == 0:
            version = a
        elif number == 3 and kind == 2:
            tensor = (a, b)
        elif number == 4 and kind == 2:
            compression = (a, b)
    for number, kind, a, b in _fields(blob, *tensor):
        if number == 1 and kind == 0:
            dtype_value = a
        elif number == 2 and kind == 0:
            shape.append(a)
        elif number == 2 and kind == 2:
            pos = a
            while pos < b:
                d, pos = _read_varint(blob, pos, b)
                shape.append(d)
        elif number == 3 and kind == 2:
            data = (a, b)
    dtype = to_torch_dtype(dtype_value)
    if any(d >= 1 << 63 for d in shape):  # int64 on the wire: negative as two's complement
        raise CodecError("negative dimension in shape")
    want = expected_nbytes(dtype, shape)
    if data[1] - data[0] != want:
        raise CodecError(
            f"tensor of shape {shape} and dtype {str(dtype).removeprefix('torch.')} "
            f"needs {want} bytes, got {data[1] - data[0]}"
        )
    if not want:
        return shard_id, version, torch.empty(shape, dtype=dtype), compression
    flat = torch.frombuffer(blob, dtype=dtype, count=want // dtype.itemsize, offset=data[0])
    return shard_id, version, flat if len(shape) == 1 else flat.view(shape), compression


def view_shard_tensor(blob: Buffer) -> tuple[str, int, torch.Tensor]:
    """A serialized `lmps.v1.ShardTensor` -> (shard_id, version, tensor), the tensor a view
    of `blob`'s bytes (no copy: READ-ONLY, valid while `blob` lives; copy it into its
    destination). The inverse of `shard_tensor_bytes`, for a worker that loads pulled shards
    straight into its parameters; any valid encoding of the message parses (fields in any
    order, packed or unpacked shape, unknown fields skipped). CodecError when malformed, or
    when compressed (only a push may be: `read_push_request`)."""
    shard_id, version, tensor, compression = _parse_shard_tensor(blob)
    if compression is not None:
        raise CodecError(f"shard {shard_id!r} is compressed; only pushes may be")
    return shard_id, version, tensor


def _array(blob: Buffer, a: int, b: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Little-endian `dtype` values in blob[a:b] (a read-only view)."""
    if (b - a) % dtype.itemsize:
        raise CodecError(f"{what}: {b - a} bytes is not a whole number of {dtype}")
    if a == b:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(blob, dtype=dtype, count=(b - a) // dtype.itemsize, offset=a)


def read_compressed(
    blob: Buffer, where: tuple[int, int], payload: torch.Tensor, shard_id: str = ""
) -> Encoded:
    """The `Compressed` message in blob[where] describing `payload` (the ShardTensor's
    tensor) -> a validated `Int8Chunks` / `TopK` / `Rows` (views of `blob`; `decode()` makes
    the dense fp32 shard). CodecError naming the problem (see `lmps.v1.Compressed`)."""
    kind = numel = chunk = width = column = 0
    scales, indices = (0, 0), (0, 0)
    for number, wire, a, b in _fields(blob, *where):
        if wire == 0 and number in (1, 2, 3, 6, 7):
            if number == 1:
                kind = a
            elif number == 2:
                numel = a
            elif number == 3:
                chunk = a
            elif number == 6:
                width = a
            else:
                column = a
        elif wire == 2 and number == 4:
            scales = (a, b)
        elif wire == 2 and number == 5:
            indices = (a, b)
    what = f"compressed shard {shard_id!r}"
    if kind != tensor_pb2.Compressed.ROWS and (width or column):
        raise CodecError(f"{what}: only ROWS carries row_width and first_column")
    sent: Encoded
    if kind == tensor_pb2.Compressed.ROWS:
        if scales[1] > scales[0] or chunk:
            raise CodecError(f"{what}: rows carry no scales or chunk")
        sent = Rows(
            numel=numel,
            grid=RowGrid(width, column),
            indices=_array(blob, *indices, torch.int32, f"{what} indices"),
            values=payload,
        )
    elif kind == tensor_pb2.Compressed.INT8:
        if indices[1] > indices[0]:
            raise CodecError(f"{what}: int8 carries no indices")
        sent = Int8Chunks(
            numel=numel,
            chunk=chunk,
            q=payload,
            scales=_array(blob, *scales, torch.float32, f"{what} scales"),
        )
    elif kind == tensor_pb2.Compressed.TOPK:
        if scales[1] > scales[0] or chunk:
            raise CodecError(f"{what}: top-k carries no scales or chunk")
        sent = TopK(
            numel=numel,
            indices=_array(blob, *indices, torch.int32, f"{what} indices"),
            values=payload,
        )
    else:
        raise CodecError(f"{what}: unknown compression kind {kind}")
    try:
        sent.validate()
    except ValueError as err:
        raise CodecError(f"{what}: {err}") from None
    return sent


def read_push_request(
    blob: bytes,
) -> parameter_pb2.PushHeader | tuple[str, int, torch.Tensor | Encoded]:
    """A serialized `lmps.v1.PushRequest` -> its header, or its gradient: a tensor as
    `view_shard_tensor` gives it (a read-only view of `blob`: no copy on the server's push
    path), or for a compressed one its validated `Int8Chunks` / `TopK` / `Rows`
    (`read_compressed`), which the store decodes once it has checked its numel (and a
    `Rows`' grid). CodecError when malformed or when neither field is set."""
    view = memoryview(blob)
    kind = None
    for number, wire, a, b in _fields(view, 0, len(view)):
        if wire == 2 and number in (1, 2):
            kind = (number, a, b)  # a oneof: the last one on the wire wins, as in protobuf
    if kind is None:
        raise CodecError("a PushRequest with neither header nor grad")
    number, a, b = kind
    if number == 1:
        try:
            return parameter_pb2.PushHeader.FromString(bytes(view[a:b]))
        except Exception as err:  # protobuf's DecodeError
            raise CodecError(f"malformed PushHeader: {err}") from None
    grad = view[a:b]
    shard_id, version, tensor, compression = _parse_shard_tensor(grad)
    if compression is None:
        return shard_id, version, tensor
    return shard_id, version, read_compressed(grad, compression, tensor, shard_id)


def expected_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel * dtype.itemsize


def decode(msg: tensor_pb2.Tensor) -> torch.Tensor:
    """Wire message -> a new CPU tensor. Raises CodecError when the message is inconsistent.

    One copy: the message's bytes straight into a fresh tensor of torch's allocator (the
    field is read once: each read of a protobuf bytes field is a copy of its own)."""
    dtype = to_torch_dtype(msg.dtype)
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"negative dimension in shape {list(shape)}")
    want = expected_nbytes(dtype, shape)
    data = msg.data
    if len(data) != want:
        raise CodecError(
            f"tensor of shape {list(shape)} and dtype {str(dtype).removeprefix('torch.')} "
            f"needs {want} bytes, got {len(data)}"
        )
    out = torch.empty(shape, dtype=dtype)
    if want:
        # numpy copies from the read-only bytes into the tensor's own (writable) memory.
        out.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    return out


# -- configs and shard placements ---------------------------------------------------

# Optimizer kinds and schedules map to proto enum values by name ("sgd" <-> SGD), straight
# from the core's registries: adding a rule there and an enum value in job.proto is all.
_KIND_OF: dict[int, OptimizerKind] = {
    job_pb2.OptimizerKind.Value(kind.upper()): kind for kind in OPTIMIZERS
}
_SCHEDULE_OF: dict[int, ScheduleName] = {
    job_pb2.LrSchedule.Value(name.upper()): name for name in SCHEDULES
}


def shard_to_proto(s: Shard) -> parameter_pb2.ShardSpec:
    return parameter_pb2.ShardSpec(
        shard_id=s.shard_id,
        param=s.param,
        param_shape=list(s.param_shape),
        start=s.start,
        numel=s.numel,
        server_id=s.server_id,
        weight_decay=s.weight_decay,
        backup_server_id=s.backup_server_id,
        fragment=s.fragment,
    )


def shard_from_proto(m: parameter_pb2.ShardSpec) -> Shard:
    return Shard(
        shard_id=m.shard_id,
        param=m.param,
        param_shape=tuple(int(d) for d in m.param_shape),
        start=int(m.start),
        numel=int(m.numel),
        server_id=m.server_id,
        weight_decay=m.weight_decay,
        backup_server_id=m.backup_server_id,
        fragment=int(m.fragment),
    )


def model_to_proto(c: GPTConfig) -> job_pb2.ModelConfig:
    return job_pb2.ModelConfig(
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        block_size=c.block_size,
        vocab_size=c.vocab_size,
        dropout=c.dropout,
        bias=c.bias,
        tie_embeddings=c.tie_embeddings,
        activation=cast(job_pb2.Activation, job_pb2.Activation.Value(c.activation.upper())),
        num_labels=c.num_labels,
        pooling=cast(job_pb2.Pooling, job_pb2.Pooling.Value(c.pooling.upper())),
    )


def model_from_proto(m: job_pb2.ModelConfig) -> GPTConfig:
    """Raises ValueError (from GPTConfig's validation) on a bad config. An unset activation
    is "gelu" (specs from before the field); a value this build does not know is refused."""
    from lmps.core.model import Activation, Pooling

    if m.activation == job_pb2.ACTIVATION_UNSPECIFIED:
        activation = "gelu"
    elif m.activation in job_pb2.Activation.values():
        activation = job_pb2.Activation.Name(m.activation).lower()
    else:
        activation = f"<unknown {m.activation}>"  # GPTConfig names the choices
    if m.pooling == job_pb2.POOLING_UNSPECIFIED:
        pooling = "last"
    elif m.pooling in job_pb2.Pooling.values():
        pooling = job_pb2.Pooling.Name(m.pooling).lower()
    else:
        pooling = f"<unknown {m.pooling}>"
    return GPTConfig(
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        block_size=m.block_size,
        vocab_size=m.vocab_size,
        dropout=float(m.dropout),
        bias=m.bias,
        tie_embeddings=m.tie_embeddings,
        activation=cast(Activation, activation),
        num_labels=int(m.num_labels),
        pooling=cast(Pooling, pooling),
    )


def _optimizer_fields(m: job_pb2.OptimizerConfig) -> dict[str, Any]:
    """The config's settings by name, the wire's "0 means default" resolved."""
    if m.kind not in _KIND_OF:
        raise ValueError(f"optimizer kind must be {' or '.join(k.upper() for k in OPTIMIZERS)}")
    return {
        "kind": _KIND_OF[m.kind],
        "lr": m.lr,
        "momentum": m.momentum,
        "nesterov": m.nesterov,
        "weight_decay": m.weight_decay,
        "beta1": m.beta1 or DEFAULTS["beta1"],
        "beta2": m.beta2 or DEFAULTS["beta2"],
        "eps": m.eps or DEFAULTS["eps"],
        # LR_SCHEDULE_UNSPECIFIED means CONSTANT; so does a value this build does not know.
        "schedule": _SCHEDULE_OF.get(m.schedule, "constant"),
        "warmup_steps": int(m.warmup_steps),
        "total_steps": int(m.total_steps),
        "min_lr": m.min_lr,
    }


def optimizer_from_proto(m: job_pb2.OptimizerConfig) -> OptimizerSettings:
    """A resolved config, as a server must get it. Raises ValueError on a bad config
    (unknown kind, lr <= 0, a cosine schedule with total_steps still 0, ...)."""
    return OptimizerSettings(**_optimizer_fields(m))


def optimizer_request_from_proto(m: job_pb2.OptimizerConfig) -> OptimizerRequest:
    """A config as submitted: total_steps may still be 0 (open; the coordinator resolves it).
    Raises ValueError on anything else `optimizer_from_proto` refuses."""
    return OptimizerRequest(**_optimizer_fields(m))


def optimizer_to_proto(s: OptimizerRequest) -> job_pb2.OptimizerConfig:
    """Every field explicit; an open request keeps total_steps 0 for the coordinator."""
    return job_pb2.OptimizerConfig(
        kind=cast(job_pb2.OptimizerKind, job_pb2.OptimizerKind.Value(s.kind.upper())),
        lr=s.lr,
        momentum=s.momentum,
        nesterov=s.nesterov,
        weight_decay=s.weight_decay,
        beta1=s.beta1,
        beta2=s.beta2,
        eps=s.eps,
        schedule=cast(job_pb2.LrSchedule, job_pb2.LrSchedule.Value(s.schedule.upper())),
        warmup_steps=s.warmup_steps,
        total_steps=s.total_steps,
        min_lr=s.min_lr,
    )


def consistency_from_proto(value: int) -> Consistency:
    """`lmps.v1.Consistency` -> its mode name in `lmps.core.settings.CONSISTENCIES`, by the
    enum's name (SYNC -> "sync"; UNSPECIFIED means SYNC), so a new mode needs no edit here.
    Raises ValueError for a value this build does not know."""
    if value == job_pb2.CONSISTENCY_UNSPECIFIED:
        return "sync"
    name = job_pb2.Consistency.Name(value).lower() if value in job_pb2.Consistency.values() else ""
    if name not in CONSISTENCIES:
        known = ", ".join(m.upper() for m in CONSISTENCIES)
        raise ValueError(f"unknown consistency {value}; this build knows {known}")
    return cast(Consistency, name)


def consistency_to_proto(mode: Consistency) -> job_pb2.Consistency:
    return cast(job_pb2.Consistency, job_pb2.Consistency.Value(mode.upper()))


def _resolved_optimizer(m: job_pb2.OptimizerConfig, total_steps: int) -> OptimizerSettings:
    """`m` with an open (0) total_steps filled in by `total_steps`."""
    resolved = job_pb2.OptimizerConfig()
    resolved.CopyFrom(m)
    resolved.total_steps = resolved.total_steps or total_steps
    return optimizer_from_proto(resolved)


def local_steps_from_proto(spec: job_pb2.JobSpec, outer_total_steps: int) -> LocalSteps | None:
    """The spec's local steps, None when unset; the inner optimizer's open total_steps
    becomes `outer_total_steps` x H (with fragments too: an outer step is a round of F
    windows of H / F inner steps), and fragments 0 is 1 (off). Raises ValueError naming the
    field."""
    if not spec.HasField("local_steps"):
        return None
    m = spec.local_steps
    if not m.HasField("inner_optimizer"):
        raise ValueError("local_steps.inner_optimizer is required when local_steps is set")
    steps = int(m.steps)
    try:
        inner = _resolved_optimizer(m.inner_optimizer, outer_total_steps * max(1, steps))
    except ValueError as err:
        raise ValueError(f"local_steps.inner_optimizer: {err}") from None
    return LocalSteps(
        steps=steps, inner=inner, fragments=int(m.fragments) or 1, overlap=bool(m.overlap)
    )


def local_steps_to_proto(s: LocalSteps) -> job_pb2.LocalSteps:
    return job_pb2.LocalSteps(
        steps=s.steps,
        inner_optimizer=optimizer_to_proto(s.inner),
        fragments=s.fragments,
        overlap=s.overlap,
    )


_COMPRESSION_KINDS = {
    tensor_pb2.Compressed.KIND_UNSPECIFIED: "none",
    tensor_pb2.Compressed.INT8: "int8",
    tensor_pb2.Compressed.TOPK: "topk",
}


def compression_from_proto(m: job_pb2.PushCompression) -> Compression:
    """`JobSpec.push_compression` -> `Compression` (0 chunk / ratio: the defaults). Raises
    ValueError naming the field."""
    kind = _COMPRESSION_KINDS.get(m.kind)
    if m.kind == tensor_pb2.Compressed.ROWS:
        raise ValueError("push_compression: ROWS is not a setting (uncompressed pushes use it)")
    if kind is None:
        raise ValueError(f"push_compression: unknown kind {m.kind}")
    try:
        return Compression(
            kind=cast(CompressionKind, kind),
            chunk=int(m.chunk) or DEFAULT_CHUNK,
            ratio=float(m.ratio) or DEFAULT_RATIO,
        )
    except ValueError as err:
        raise ValueError(f"push_compression: {err}") from None


def compression_to_proto(c: Compression) -> job_pb2.PushCompression:
    kind = next(k for k, name in _COMPRESSION_KINDS.items() if name == c.kind)
    return job_pb2.PushCompression(kind=kind, chunk=c.chunk, ratio=c.ratio)


def job_settings_from_proto(spec: job_pb2.JobSpec, *, total_steps: int) -> JobSettings:
    """The one place a `JobSpec` is read: every "0 means default" resolved here.

    `total_steps` is used when the spec's optimizer leaves it at 0 (with local steps, the
    inner optimizer's open total_steps is the outer one x H, and batches_per_lease 0 is H,
    or F x H with F fragments).
    Raises ValueError (with the field named) on anything invalid.
    """
    model = model_from_proto(spec.model)
    try:
        optim = _resolved_optimizer(spec.optimizer, total_steps)
    except ValueError as err:
        raise ValueError(f"optimizer: {err}") from None
    local = local_steps_from_proto(spec, optim.total_steps)
    # Local steps: one round a lease; with F fragments F rounds, so that the lease's F - 1
    # flushes (1/F of the model each) add (F - 1) / F^2 to its bytes pushed, not (F - 1) / F.
    default_per_lease = (
        local.fragments * local.steps if local is not None else DEFAULT_BATCHES_PER_LEASE
    )
    return JobSettings(
        name=spec.name,
        model=model,
        optimizer=optim,
        batch_size=int(spec.batch_size),
        seed=int(spec.seed),
        epochs=int(spec.epochs),
        batches_per_lease=int(spec.batches_per_lease) or default_per_lease,
        num_servers=int(spec.num_servers),
        num_workers=int(spec.num_workers),
        consistency=consistency_from_proto(spec.consistency),
        max_staleness=int(spec.max_staleness),
        shard_bytes=int(spec.shard_bytes) or DEFAULT_SHARD_BYTES,
        wire_dtype=wire_dtype(spec.wire_dtype),
        tokenizer_json=spec.tokenizer_json,
        wait_for_members_s=float(spec.wait_for_members_s) or DEFAULT_WAIT_FOR_MEMBERS_S,
        checkpoint_every=int(spec.checkpoint_every),
        keep_checkpoints=int(spec.keep_checkpoints) or DEFAULT_KEEP_CHECKPOINTS,
        replication=int(spec.replication) or 1,
        local_steps=local,
        push_compression=compression_from_proto(spec.push_compression),
        task=task_from_proto(spec.task),
        labels=tuple(spec.labels),
        freeze_backbone=spec.freeze_backbone,
        micro_batches=int(spec.micro_batches) or 1,
        autocast=autocast_from_proto(spec.autocast),
        max_grad_norm=float(spec.max_grad_norm),
    )


def task_from_proto(value: int) -> TaskName:
    """`lmps.v1.Task` -> its name in `lmps.core.tasks.TASK_NAMES` (UNSPECIFIED: "lm").
    ValueError for a value this build does not know."""
    if value == job_pb2.TASK_UNSPECIFIED:
        return "lm"
    name = job_pb2.Task.Name(value).lower() if value in job_pb2.Task.values() else ""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {value}; this build knows {', '.join(TASK_NAMES)}")
    return cast(TaskName, name)


def task_to_proto(name: TaskName) -> job_pb2.Task:
    return cast(job_pb2.Task, job_pb2.Task.Value(name.upper()))


def autocast_from_proto(value: int) -> torch.dtype:
    """`JobSpec.autocast`: UNSPECIFIED is float32 (off); ValueError for any dtype but
    float32 and bfloat16."""
    if value in (tensor_pb2.DTYPE_UNSPECIFIED, tensor_pb2.FLOAT32):
        return torch.float32
    if value == tensor_pb2.BFLOAT16:
        return torch.bfloat16
    raise ValueError("autocast must be FLOAT32 (off) or BFLOAT16")


def job_settings_to_proto(s: JobSettings) -> job_pb2.JobSpec:
    """Every field explicit: `job_settings_from_proto(job_settings_to_proto(s)) == s`."""
    return job_pb2.JobSpec(
        name=s.name,
        model=model_to_proto(s.model),
        optimizer=optimizer_to_proto(s.optimizer),
        batch_size=s.batch_size,
        batches_per_lease=s.batches_per_lease,
        seed=s.seed,
        epochs=s.epochs,
        num_servers=s.num_servers,
        num_workers=s.num_workers,
        consistency=consistency_to_proto(s.consistency),
        max_staleness=s.max_staleness,
        shard_bytes=s.shard_bytes,
        wire_dtype=to_proto_dtype(s.wire_dtype),
        tokenizer_json=s.tokenizer_json,
        wait_for_members_s=s.wait_for_members_s,
        checkpoint_every=s.checkpoint_every,
        keep_checkpoints=s.keep_checkpoints,
        replication=s.replication,
        local_steps=None if s.local_steps is None else local_steps_to_proto(s.local_steps),
        push_compression=compression_to_proto(s.push_compression),
        task=task_to_proto(s.task),
        labels=list(s.labels),
        freeze_backbone=s.freeze_backbone,
        micro_batches=s.micro_batches,
        autocast=to_proto_dtype(s.autocast),
        max_grad_norm=s.max_grad_norm,
    )

"""lmps.rpc.codec: tensors <-> `lmps.v1.Tensor` (raw little-endian bytes, dtype, shape)."""

from __future__ import annotations

import struct
import warnings

import pytest
import torch

from lmps.core.compress import Compression, encode
from lmps.rpc import codec
from lmps.rpc.codec import CodecError
from lmps.v1 import tensor_pb2

# Every row of the codec's table: proto enum value, torch dtype.
DTYPES = [
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
]
SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 5)]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Values that exercise the dtype: signs, fractions, extremes where it has them."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)


def test_table_covers_every_wire_dtype() -> None:
    wire = {v for v in tensor_pb2.DType.values() if v != tensor_pb2.DTYPE_UNSPECIFIED}
    assert {p for p, _ in DTYPES} == wire
    for proto, dtype in DTYPES:
        assert codec.to_torch_dtype(proto) == dtype
        assert codec.to_proto_dtype(dtype) == proto
        assert codec.dtype_from_name(str(dtype).removeprefix("torch.")) == dtype


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("proto", "dtype"), DTYPES, ids=[str(d) for _, d in DTYPES])
def test_round_trip(proto: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = sample(dtype, shape)
    msg = codec.encode(t)
    assert msg.dtype == proto
    assert list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * t.element_size()
    back = codec.decode(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype
    assert back.shape == t.shape
    assert torch.equal(back, t)


def test_float_bytes_are_little_endian_c_order() -> None:
    t = torch.tensor([[1.5, -2.0], [3.25, 0.0]], dtype=torch.float32)
    assert codec.encode(t).data == struct.pack("<4f", 1.5, -2.0, 3.25, 0.0)
    assert codec.encode(t.T).data == struct.pack("<4f", 1.5, 3.25, -2.0, 0.0)


def test_bfloat16_bit_patterns_survive() -> None:
    # bf16 has no numpy dtype: the codec must move raw bits. NaN payloads and -0.0 included.
    raw = [0x3F80, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001]  # 1, -0, inf, -inf, NaN, tiny
    bits = torch.tensor([b - (1 << 16) if b >= 1 << 15 else b for b in raw], dtype=torch.int16)
    t = bits.view(torch.bfloat16)
    back = codec.decode(codec.encode(t))
    assert torch.equal(back.view(torch.int16), bits)


def test_non_contiguous_input_is_encoded_in_logical_order() -> None:
    base = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    views = [
        base.transpose(0, 2),
        base.permute(1, 2, 0),
        base[:, ::2, 1:4],
        base.expand(2, 2, 3, 5),
    ]
    for view in views:
        assert not view.is_contiguous()
        back = codec.decode(codec.encode(view))
        assert back.shape == view.shape
        assert torch.equal(back, view)
        assert back.is_contiguous()


def test_cast_on_encode() -> None:
    t = torch.tensor([1.0, 1.00390625, -3.14159, 1e-3, 65504.0, 3e38])
    msg = codec.encode(t, torch.bfloat16)
    assert msg.dtype == tensor_pb2.BFLOAT16
    assert len(msg.data) == 2 * t.numel()
    back = codec.decode(msg)
    assert back.dtype == torch.bfloat16
    assert torch.equal(back, t.to(torch.bfloat16))
    assert not torch.equal(back.float(), t)  # the cast really rounded
    # Casting to the dtype it already has is the identity.
    assert codec.encode(t, torch.float32) == codec.encode(t)
    assert codec.decode(codec.encode(t, torch.float16)).dtype == torch.float16


def test_encode_does_not_touch_grad_or_source() -> None:
    p = torch.randn(4, requires_grad=True)
    before = p.detach().clone()
    msg = codec.encode(p * 2, torch.bfloat16)
    assert torch.equal(p.detach(), before)
    assert torch.equal(codec.decode(msg), (before * 2).to(torch.bfloat16))


def test_decoded_tensor_is_writable_and_owns_its_memory() -> None:
    t = torch.arange(6, dtype=torch.float32)
    msg = codec.encode(t)
    data = msg.data
    with warnings.catch_warnings():
        # torch warns when it wraps a read-only buffer (e.g. the message's bytes) in a tensor.
        warnings.simplefilter("error")
        back = codec.decode(msg)
    back.add_(1)
    assert torch.equal(back, t + 1)
    assert msg.data == data == codec.encode(t).data  # the message bytes did not move
    assert torch.equal(codec.decode(msg), t)  # a second decode sees the original bytes
    # Two decodes of one message never share memory.
    a, b = codec.decode(msg), codec.decode(msg)
    a.zero_()
    assert torch.equal(b, t)


def test_scalar_and_empty_tensors_decode_to_their_shape() -> None:
    scalar = codec.decode(tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, data=struct.pack("<f", 2.5)))
    assert scalar.shape == ()
    assert scalar.item() == 2.5
    empty = codec.decode(tensor_pb2.Tensor(dtype=tensor_pb2.INT64, shape=[4, 0]))
    assert empty.shape == (4, 0)
    assert empty.dtype == torch.int64
    empty.resize_(3)  # writable and resizable like any fresh tensor


@pytest.mark.parametrize(
    ("msg", "needle"),
    [
        (tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[3], data=b"\0" * 11), "needs 12 bytes"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[3], data=b"\0" * 13), "got 13"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.BFLOAT16, shape=[2, 2], data=b"\0" * 4), "needs 8"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, data=b""), "needs 4 bytes"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.INT8, shape=[0], data=b"\0"), "needs 0 bytes"),
        (tensor_pb2.Tensor(shape=[1], data=b"\0" * 4), "unsupported wire dtype 0"),
        (tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0"), "wire dtype 99"),  # type: ignore[arg-type]
        (tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[-1], data=b""), "negative"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[-2, -3], data=b"\0" * 24), "negative"),
    ],
    ids=[
        "short",
        "long",
        "bf16-short",
        "scalar-empty",
        "empty-with-bytes",
        "unspecified-dtype",
        "unknown-dtype",
        "negative-dim",
        "two-negative-dims",
    ],
)
def test_malformed_message_raises_codec_error(msg: tensor_pb2.Tensor, needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        codec.decode(msg)


def test_codec_error_is_a_value_error() -> None:
    # Callers that catch ValueError (config validation paths) also catch codec errors.
    assert issubclass(CodecError, ValueError)


def test_unsupported_torch_dtype_cannot_be_encoded() -> None:
    with pytest.raises(CodecError, match="cannot travel"):
        codec.encode(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(CodecError, match="unknown dtype 'float8'"):
        codec.dtype_from_name("float8")


def test_wire_dtype_defaults_only_when_unspecified() -> None:
    assert codec.wire_dtype(tensor_pb2.DTYPE_UNSPECIFIED) == torch.float32
    assert codec.wire_dtype(tensor_pb2.DTYPE_UNSPECIFIED, torch.bfloat16) == torch.bfloat16
    assert codec.wire_dtype(tensor_pb2.FLOAT16) == torch.float16
    with pytest.raises(CodecError):
        codec.wire_dtype(42)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("wire", [None, torch.bfloat16])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 129)])
@pytest.mark.parametrize(("shard_id", "version"), [("", 0), ("tok.wte:3", 1), ("x" * 300, 2**40)])
def test_shard_tensor_bytes_is_what_protobuf_serializes(
    dtype: torch.dtype,
    wire: torch.dtype | None,
    shape: tuple[int, ...],
    shard_id: str,
    version: int,
) -> None:
    t = (torch.randn(shape) * 100).to(dtype)
    if wire is not None and not dtype.is_floating_point:
        wire = None
    got = codec.shard_tensor_bytes(shard_id, version, t, wire)
    msg = tensor_pb2.ShardTensor(shard_id=shard_id, version=version, tensor=codec.encode(t, wire))
    assert got == msg.SerializeToString()
    back = tensor_pb2.ShardTensor.FromString(got)
    assert (back.shard_id, back.version) == (shard_id, version)
    assert torch.equal(codec.decode(back.tensor), t if wire is None else t.to(wire))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 129)])
def test_view_shard_tensor_reads_what_protobuf_writes(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    t = (torch.randn(shape) * 100).to(dtype)
    msg = tensor_pb2.ShardTensor(shard_id="h.0.attn:2", version=9, tensor=codec.encode(t))
    blob = msg.SerializeToString()
    sid, version, got = codec.view_shard_tensor(blob)
    assert (sid, version) == ("h.0.attn:2", 9)
    assert got.dtype == dtype and torch.equal(got, t)
    assert codec.view_shard_tensor(codec.shard_tensor_bytes(sid, version, t))[2].equal(t)


def test_view_shard_tensor_takes_any_valid_encoding() -> None:
    """Fields out of order, an unpacked shape and an unknown field still parse."""
    t = torch.arange(6, dtype=torch.float32)
    data = t.numpy().tobytes()
    inner = b"\x1a" + bytes([len(data)]) + data + b"\x10\x02\x10\x03" + b"\x08\x01"
    blob = b"\x10\x05" + b"\x1a" + bytes([len(inner)]) + inner + b"\x0a\x01s" + b"\x78\x01"
    assert tensor_pb2.ShardTensor.FromString(blob).tensor.shape == [2, 3]
    sid, version, got = codec.view_shard_tensor(blob)
    assert (sid, version) == ("s", 5) and torch.equal(got, t.view(2, 3))


@pytest.mark.parametrize(
    ("blob", "needle"),
    [
        (b"\x1a\x05\x08\x01", "runs past"),
        (b"\x1a\x02\x08\x63", "unsupported wire dtype"),
        (b"\x1a\x06\x08\x01\x12\x01\x02", "runs past"),
        (b"\x1a\x07\x08\x01\x12\x01\x02\x1a\x00", "needs 8 bytes, got 0"),
        (b"\x1a\x0e\x08\x01\x12\x0a" + b"\xff" * 9 + b"\x01", "negative dimension"),
        (b"\x0f", "wire type 7"),
        (b"\x10\xff", "varint"),
    ],
)
def test_view_shard_tensor_refuses_malformed_messages(blob: bytes, needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        codec.view_shard_tensor(blob)


def test_shard_tensor_bytes_wraps_a_push_request() -> None:
    from lmps.v1 import parameter_pb2

    t = torch.randn(300)
    blob = codec.shard_tensor_bytes("b:0", 4, t, torch.bfloat16, wrap=2)
    want = parameter_pb2.PushRequest(
        grad=tensor_pb2.ShardTensor(
            shard_id="b:0", version=4, tensor=codec.encode(t, torch.bfloat16)
        )
    )
    assert blob == want.SerializeToString()


# -- compressed pushes (lmps.v1.Compressed) ---------------------------------------------------

Compressed = tensor_pb2.Compressed


def _compressed_kinds() -> list[tuple[str, Compression, torch.dtype]]:
    return [
        ("int8", Compression("int8", chunk=7), torch.float32),
        ("int8-one-chunk", Compression("int8"), torch.float32),
        ("topk", Compression("topk", ratio=0.1), torch.float32),
        ("topk-bf16", Compression("topk", ratio=0.1), torch.bfloat16),
        ("topk-all", Compression("topk", ratio=1.0), torch.float16),
    ]


@pytest.mark.parametrize(("name", "c", "wire"), _compressed_kinds(), ids=lambda v: str(v))
@pytest.mark.parametrize("wrap", [0, 2])
def test_compressed_shard_bytes_round_trip(
    name: str, c: Compression, wire: torch.dtype, wrap: int
) -> None:
    from lmps.v1 import parameter_pb2

    x = torch.randn(50, generator=torch.Generator().manual_seed(3)) * 10
    sent = encode(x, c, wire)
    blob = codec.compressed_shard_bytes("wte.weight#2", 6, sent, wrap=wrap)
    # Byte for byte what protobuf makes of the same message.
    if wrap:
        request = parameter_pb2.PushRequest.FromString(blob)
        assert request.SerializeToString() == blob
        shard = request.grad
    else:
        shard = tensor_pb2.ShardTensor.FromString(blob)
        assert shard.SerializeToString() == blob
    assert (shard.shard_id, shard.version, shard.compression.numel) == ("wte.weight#2", 6, 50)
    kind = Compressed.INT8 if c.kind == "int8" else Compressed.TOPK
    assert shard.compression.kind == kind
    # And back, as the server reads a push: the same encoding, the same decoded values.
    got = codec.read_push_request(
        blob if wrap else codec.compressed_shard_bytes("s", 6, sent, wrap=2)
    )
    assert not isinstance(got, parameter_pb2.PushHeader)
    _, version, back = got
    assert version == 6 and type(back) is type(sent)
    assert not isinstance(back, torch.Tensor)
    assert torch.equal(back.decode(), sent.decode())


def test_a_plain_push_still_reads_as_a_view_and_dense_is_a_plain_shard() -> None:
    t = torch.randn(9)
    got = codec.read_push_request(codec.shard_tensor_bytes("a#0", 1, t, wrap=2))
    assert isinstance(got, tuple) and isinstance(got[2], torch.Tensor) and torch.equal(got[2], t)
    dense = encode(t, Compression(), torch.bfloat16)
    assert codec.compressed_shard_bytes("a#0", 1, dense) == codec.shard_tensor_bytes(
        "a#0", 1, t, torch.bfloat16
    )


def test_only_pushes_may_be_compressed() -> None:
    sent = encode(torch.randn(20), Compression("int8", chunk=8))
    with pytest.raises(CodecError, match="compressed; only pushes may be"):
        codec.view_shard_tensor(codec.compressed_shard_bytes("a#0", 1, sent))


def _int8_message() -> tensor_pb2.ShardTensor:
    """Valid: numel 10 in chunks of 4 (3 scales)."""
    q = torch.tensor([1, -2, 3, 127, 0, 0, 0, 0, -127, 5], dtype=torch.int8)
    return tensor_pb2.ShardTensor(
        shard_id="w#0",
        version=1,
        tensor=codec.encode(q),
        compression=Compressed(
            kind=Compressed.INT8,
            numel=10,
            chunk=4,
            scales=struct.pack("<3f", 0.5, 0.0, 2.0),
        ),
    )


def _topk_message() -> tensor_pb2.ShardTensor:
    """Valid: 3 of numel 10."""
    return tensor_pb2.ShardTensor(
        shard_id="w#0",
        version=1,
        tensor=codec.encode(torch.tensor([1.5, -2.0, 4.0])),
        compression=Compressed(kind=Compressed.TOPK, numel=10, indices=struct.pack("<3i", 1, 4, 9)),
    )


def _set(base: str, **fields: object) -> tensor_pb2.ShardTensor:
    return set_fields(_int8_message() if base == "int8" else _topk_message(), **fields)


def set_fields(msg: tensor_pb2.ShardTensor, **fields: object) -> tensor_pb2.ShardTensor:
    """`msg` with `tensor` replaced and the other fields set on its `compression`."""
    for name, value in fields.items():
        if name == "tensor":
            msg.tensor.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(msg.compression, name, value)
    return msg


MALFORMED: dict[str, tuple[tensor_pb2.ShardTensor, str]] = {
    "kind-unspecified": (_set("int8", kind=0), "unknown compression kind 0"),
    "kind-unknown": (_set("topk", kind=9), "unknown compression kind 9"),
    "numel-zero": (_set("topk", numel=0), r"numel must be in \[1, 2\^31\)"),
    "numel-huge": (_set("topk", numel=2**31), r"numel must be in \[1, 2\^31\)"),
    # int8
    "int8-payload-short": (_set("int8", numel=11), "payload has 10 elements for numel 11"),
    "int8-payload-float": (
        _set("int8", tensor=codec.encode(torch.zeros(10))),
        "int8 payload must be 1-D int8",
    ),
    "int8-payload-2d": (
        _set("int8", tensor=codec.encode(torch.zeros(2, 5, dtype=torch.int8))),
        "int8 payload must be 1-D int8",
    ),
    "int8-chunk-zero": (_set("int8", chunk=0), r"chunk must be in \[1, 2\^31\)"),
    "int8-too-few-scales": (
        _set("int8", scales=struct.pack("<2f", 1.0, 1.0)),
        "needs 3 fp32 scales",
    ),
    "int8-scales-ragged": (_set("int8", scales=b"\0" * 13), "not a whole number"),
    "int8-scale-nan": (
        _set("int8", scales=struct.pack("<3f", 1.0, float("nan"), 1.0)),
        "NaN or infinite",
    ),
    "int8-scale-inf": (
        _set("int8", scales=struct.pack("<3f", 1.0, 1.0, float("inf"))),
        "NaN or infinite",
    ),
    "int8-scale-negative": (
        _set("int8", scales=struct.pack("<3f", 1.0, -0.5, 1.0)),
        "scale is negative",
    ),
    "int8-with-indices": (_set("int8", indices=struct.pack("<i", 0)), "carries no indices"),
    # top-k
    "topk-index-past-numel": (
        _set("topk", indices=struct.pack("<3i", 1, 4, 10)),
        r"index out of \[0, 10\): 10",
    ),
    "topk-index-negative": (
        _set("topk", indices=struct.pack("<3i", -1, 4, 9)),
        r"index out of \[0, 10\): -1",
    ),
    "topk-duplicate-index": (
        _set("topk", indices=struct.pack("<3i", 1, 4, 4)),
        "not strictly increasing",
    ),
    "topk-unsorted": (_set("topk", indices=struct.pack("<3i", 4, 1, 9)), "not strictly increasing"),
    "topk-too-many-indices": (
        _set("topk", indices=struct.pack("<4i", 1, 2, 3, 4)),
        "needs 3 int32 indices, got 4",
    ),
    "topk-indices-ragged": (_set("topk", indices=b"\0" * 11), "not a whole number"),
    "topk-more-values-than-numel": (_set("topk", numel=2), "sends 3 values for numel 2"),
    "topk-int-values": (
        _set("topk", tensor=codec.encode(torch.tensor([1, 2, 3], dtype=torch.int32))),
        "must be a 1-D float tensor",
    ),
    "topk-with-scales": (_set("topk", scales=struct.pack("<f", 1.0)), "carries no scales"),
    "topk-with-chunk": (_set("topk", chunk=4), "carries no scales or chunk"),
}


def test_the_valid_bases_are_valid() -> None:
    from lmps.v1 import parameter_pb2

    for msg, want in (
        (_int8_message(), [0.5, -1.0, 1.5, 63.5, 0, 0, 0, 0, -254.0, 10.0]),
        (_topk_message(), [0, 1.5, 0, 0, -2.0, 0, 0, 0, 0, 4.0]),
    ):
        blob = parameter_pb2.PushRequest(grad=msg).SerializeToString()
        got = codec.read_push_request(blob)
        assert isinstance(got, tuple) and not isinstance(got[2], torch.Tensor)
        assert got[2].decode().tolist() == want


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_compressed_pushes_are_refused(case: str) -> None:
    from lmps.v1 import parameter_pb2

    msg, needle = MALFORMED[case]
    blob = parameter_pb2.PushRequest(grad=msg).SerializeToString()
    with pytest.raises(CodecError, match=needle) as info:
        codec.read_push_request(blob)
    assert "'w#0'" in str(info.value)  # names the shard

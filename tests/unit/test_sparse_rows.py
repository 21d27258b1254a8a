"""Sparse embedding rows (lmps/core/sparse_rows.py): a lossless push encoding.

Unit: which rows are sent, partial first and last rows of shards that are not row-aligned,
the size rule (rows only when smaller), the wire framing and what a server refuses.
In-process: short classification runs through a real `ParameterStore` (the codec included,
no gRPC) end bit-identical with rows and with dense pushes, for SGD with momentum and AdamW.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from lmps.core import tasks
from lmps.core.compress import Encoded
from lmps.core.errors import InvalidArgument
from lmps.core.model import GPT, GPTConfig, init_model
from lmps.core.optim import OptimizerSettings
from lmps.core.partition import ParamInfo, Shard, plan_shards, shard_view
from lmps.core.sparse_rows import (
    FRAMING_BYTES,
    ROW_SPARSE_PARAMS,
    RowGrid,
    Rows,
    encode_push,
    grid_of,
    push_grids,
)
from lmps.rpc import codec
from lmps.rpc.codec import CodecError
from lmps.services.parameter_server.store import ParameterStore
from lmps.services.worker.replica import Replica
from lmps.v1 import job_pb2, parameter_pb2, tensor_pb2
from tests.unit.test_codec import set_fields

Compressed = tensor_pb2.Compressed
WIRE = [torch.float32, torch.bfloat16, torch.float16]


def sparse(numel: int, grid: RowGrid, rows: list[int], seed: int = 0) -> torch.Tensor:
    """A (numel,) shard on `grid` whose listed rows are random, every other element 0."""
    gen = torch.Generator().manual_seed(seed)
    padded = torch.zeros(grid.rows(numel), grid.width)
    padded[rows] = torch.randn(len(rows), grid.width, generator=gen)
    return padded.view(-1)[grid.first_column : grid.first_column + numel].clone()


def bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns: equal bits is equal values with -0.0 told from 0.0."""
    return t.to(torch.float32).view(torch.int32)


# (numel, grid): aligned; a partial first row; a partial last row; both; inside one row.
GRIDS = {
    "aligned": (640, RowGrid(64, 0)),
    "first-partial": (600, RowGrid(64, 23)),
    "last-partial": (600, RowGrid(64, 0)),
    "both-partial": (550, RowGrid(64, 40)),
    "inside-one-row": (50, RowGrid(64, 7)),
}


@pytest.mark.parametrize("dtype", WIRE, ids=str)
@pytest.mark.parametrize("case", list(GRIDS))
def test_rows_decode_to_the_dense_push_bit_for_bit(case: str, dtype: torch.dtype) -> None:
    """Whichever way a shard goes, the server decodes the dense push's values bit for bit;
    a shard of many rows with few touched (either end's partial row among them) goes as
    rows, and a shard inside one row only when it is all zeros."""
    numel, grid = GRIDS[case]
    n = grid.rows(numel)
    for touched in ([], [0], [n - 1], [0, n - 1], list(range(0, n, 4))):
        touched = sorted(set(touched))
        x = sparse(numel, grid, touched, seed=len(touched))
        sent = encode_push(x, grid, dtype)
        if isinstance(sent, Rows):
            sent.validate()
            assert sent.indices.tolist() == touched
            assert sent.values.dtype == dtype
            assert sent.values.numel() == grid.elements(numel, sent.indices)
            decoded = sent.decode()
        else:
            assert sent.dtype == dtype
            decoded = sent.to(torch.float32)
        assert torch.equal(bits(decoded), bits(x.to(dtype))), (case, touched)
        if not touched or (n > 1 and len(touched) <= 3):  # rows pay unless all are touched
            assert isinstance(sent, Rows), (case, touched)
        if n == 1 and touched:  # one row: never smaller
            assert isinstance(sent, torch.Tensor)


def test_partial_rows_carry_only_their_elements_in_the_shard() -> None:
    # Width 4 from column 3: row 0 is element 0 alone, row 1 elements 1..4, ..., row 6 is 21.
    grid = RowGrid(4, 3)
    x = torch.zeros(22)
    x[0], x[21] = 1.0, 2.0
    sent = encode_push(x, grid, torch.float32)
    assert isinstance(sent, Rows)
    assert sent.indices.tolist() == [0, 6]
    assert sent.values.tolist() == [1.0, 2.0]
    assert torch.equal(sent.decode(), x)


def test_negative_zero_and_nan_count_as_nonzero() -> None:
    """Rows are found by bit pattern: -0.0 is sent (the decoded shard keeps its sign) and so
    is a NaN (the server then refuses the push, as it refuses a dense NaN)."""
    grid = RowGrid(5, 0)
    x = torch.zeros(50)
    x[7] = -0.0
    x[31] = float("nan")
    sent = encode_push(x, grid, torch.float32)
    assert isinstance(sent, Rows) and sent.indices.tolist() == [1, 6]
    assert torch.equal(bits(sent.decode()), bits(x))


def test_an_all_zero_shard_is_no_rows() -> None:
    sent = encode_push(torch.zeros(1000), RowGrid(10, 4), torch.bfloat16)
    assert isinstance(sent, Rows) and sent.indices.numel() == sent.values.numel() == 0
    assert sent.nbytes == 0
    assert torch.equal(sent.decode(), torch.zeros(1000))
    blob = codec.compressed_shard_bytes("wte#0", 1, sent, wrap=2)
    assert len(blob) < 40  # header fields only
    got = codec.read_push_request(blob)
    assert isinstance(got, tuple) and isinstance(got[2], Rows)
    assert torch.equal(got[2].decode(), torch.zeros(1000))


@pytest.mark.parametrize("dtype", WIRE, ids=str)
def test_a_dense_shard_goes_dense(dtype: torch.dtype) -> None:
    x = torch.randn(64)
    sent = encode_push(x, RowGrid(8, 0), dtype)
    assert isinstance(sent, torch.Tensor) and sent.dtype == dtype
    assert torch.equal(sent, x.to(dtype))
    # Every row but one touched: rows would be 7 rows + 7 indices + framing > 8 rows.
    x[8:16] = 0
    assert isinstance(encode_push(x, RowGrid(8, 0), dtype), torch.Tensor)


@pytest.mark.parametrize("dtype", WIRE, ids=str)
def test_rows_are_sent_exactly_when_the_message_is_smaller(dtype: torch.dtype) -> None:
    """The rule: rows iff values + indices + FRAMING_BYTES < the dense values; then the rows
    message is smaller than the dense message, over every count of touched rows."""
    numel, grid = 203, RowGrid(10, 7)  # 21 rows, the first and last partial
    n, itemsize = grid.rows(numel), dtype.itemsize
    chose = []
    for k in range(n + 1):
        x = sparse(numel, grid, list(range(k)), seed=k)
        sent = encode_push(x, grid, dtype)
        idx = torch.arange(k)
        rows_bytes = grid.elements(numel, idx) * itemsize + 4 * k + FRAMING_BYTES
        assert isinstance(sent, Rows) == (rows_bytes < numel * itemsize), k
        dense = codec.shard_tensor_bytes("wte#3", 9, x, dtype, wrap=2)
        if isinstance(sent, Rows):
            assert len(codec.compressed_shard_bytes("wte#3", 9, sent, wrap=2)) < len(dense)
            chose.append(k)
    assert chose == list(range(len(chose))) and 0 < len(chose) < n  # few rows, never all


@pytest.mark.parametrize("dtype", WIRE, ids=str)
@pytest.mark.parametrize("wrap", [0, 2])
def test_rows_framing_is_what_protobuf_serializes(dtype: torch.dtype, wrap: int) -> None:
    numel, grid = GRIDS["both-partial"]
    sent = encode_push(sparse(numel, grid, [0, 3]), grid, dtype)
    assert isinstance(sent, Rows)
    assert sent.values.numel() == 24 + 64  # the partial first row, then row 3
    blob = codec.compressed_shard_bytes("transformer.wte.weight#1", 4, sent, wrap=wrap)
    if wrap:
        request = parameter_pb2.PushRequest.FromString(blob)
        assert request.SerializeToString() == blob
        shard = request.grad
    else:
        shard = tensor_pb2.ShardTensor.FromString(blob)
        assert shard.SerializeToString() == blob
    c = shard.compression
    assert (c.kind, c.numel, c.row_width, c.first_column) == (Compressed.ROWS, numel, 64, 40)
    assert (c.chunk, c.scales) == (0, b"")
    assert list(struct.unpack("<2i", c.indices)) == [0, 3]
    got = codec.read_push_request(
        blob if wrap else codec.compressed_shard_bytes("s", 4, sent, wrap=2)
    )
    assert isinstance(got, tuple) and isinstance(got[2], Rows)
    assert got[2].grid == grid and torch.equal(got[2].decode(), sent.decode())


def test_which_shards_a_worker_pushes_as_rows() -> None:
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=50)
    shards = model_shards(replace(config, tie_embeddings=False), 400)
    grids = push_grids(shards)
    assert {s.param for s in shards if s.shard_id in grids} == ROW_SPARSE_PARAMS
    for s in shards:
        if s.shard_id in grids:
            assert grids[s.shard_id] == RowGrid(8, s.start % 8)
    assert any(g.first_column for g in grids.values())  # the cut falls mid-row somewhere
    bias = next(s for s in shards if len(s.param_shape) == 1)
    assert grid_of(bias) is None


# -- malformed rows: the codec's checks, then the store's ---------------------------------


def _rows_message() -> tensor_pb2.ShardTensor:
    """Valid: numel 10 on width 4 from column 2 (rows [0, 2) [2, 6) [6, 10)); rows 0 and 2."""
    return tensor_pb2.ShardTensor(
        shard_id="w#0",
        version=1,
        tensor=codec.encode(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
        compression=Compressed(
            kind=Compressed.ROWS,
            numel=10,
            row_width=4,
            first_column=2,
            indices=struct.pack("<2i", 0, 2),
        ),
    )


def _set(**fields: object) -> tensor_pb2.ShardTensor:
    return set_fields(_rows_message(), **fields)


MALFORMED: dict[str, tuple[tensor_pb2.ShardTensor, str]] = {
    "numel-zero": (_set(numel=0), r"numel must be in \[1, 2\^31\)"),
    "width-zero": (_set(row_width=0), r"row width must be in \[1, 2\^31\)"),
    "width-huge": (_set(row_width=2**31), r"row width must be in \[1, 2\^31\)"),
    "column-past-width": (_set(first_column=4), r"first column must be in \[0, 4\)"),
    "index-past-rows": (_set(indices=struct.pack("<2i", 0, 3)), r"out of \[0, 3\): 3"),
    "index-negative": (_set(indices=struct.pack("<2i", -1, 2)), r"out of \[0, 3\): -1"),
    "duplicate-index": (_set(indices=struct.pack("<2i", 2, 2)), "not strictly increasing"),
    "unsorted": (_set(indices=struct.pack("<2i", 2, 0)), "not strictly increasing"),
    "indices-ragged": (_set(indices=b"\0" * 7), "not a whole number"),
    "too-few-values": (
        _set(tensor=codec.encode(torch.ones(5))),
        "2 rows hold 6 values in this shard, got 5",
    ),
    "too-many-values": (
        _set(indices=struct.pack("<i", 1)),
        "1 rows hold 4 values in this shard, got 6",
    ),
    "int-values": (
        _set(tensor=codec.encode(torch.ones(6, dtype=torch.int32))),
        "must be a 1-D float tensor",
    ),
    "2d-values": (_set(tensor=codec.encode(torch.ones(2, 3))), "must be a 1-D float tensor"),
    "with-scales": (_set(scales=struct.pack("<f", 1.0)), "carry no scales or chunk"),
    "with-chunk": (_set(chunk=4), "carry no scales or chunk"),
    "topk-with-row-width": (
        _set(kind=Compressed.TOPK, indices=struct.pack("<6i", *range(6))),
        "only ROWS carries row_width",
    ),
}


def test_the_valid_rows_base_is_valid() -> None:
    blob = parameter_pb2.PushRequest(grad=_rows_message()).SerializeToString()
    got = codec.read_push_request(blob)
    assert isinstance(got, tuple) and isinstance(got[2], Rows)
    assert got[2].decode().tolist() == [1, 2, 0, 0, 0, 0, 3, 4, 5, 6]


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_rows_are_refused(case: str) -> None:
    msg, needle = MALFORMED[case]
    blob = parameter_pb2.PushRequest(grad=msg).SerializeToString()
    with pytest.raises(CodecError, match=needle) as info:
        codec.read_push_request(blob)
    assert "'w#0'" in str(info.value)  # names the shard


JOB = "job-rows"
STORE_SHARDS: list[Shard] = plan_shards(
    [ParamInfo("w", (6, 5), True), ParamInfo("b", (5,), False)], ["ps-0"], shard_bytes=48
)  # w: 3 shards of 10 elements (columns 0, 0, 0 of width 5); b: one


def _no_rows(numel: int, grid: RowGrid) -> Callable[[], Rows]:
    """A valid `Rows` of a shard of zeros on `grid` (the codec would take it)."""
    return lambda: Rows(numel, grid, torch.zeros(0, dtype=torch.int32), torch.zeros(0))


@pytest.mark.parametrize(
    ("sid", "make", "needle"),
    [
        ("w#1", _no_rows(10, RowGrid(10, 0)), "width 10 from column 0"),
        ("w#1", _no_rows(10, RowGrid(5, 2)), "width 5 from column 2"),
        ("w#1", _no_rows(11, RowGrid(5, 0)), "needs numel 10"),
        ("b#0", _no_rows(5, RowGrid(5, 0)), "has no rows"),
    ],
    ids=["wrong-width", "wrong-column", "wrong-numel", "vector"],
)
def test_rows_off_the_shards_grid_are_invalid_and_change_nothing(
    sid: str, make: Callable[[], Rows], needle: str
) -> None:
    assert {s.shard_id: (s.start, s.numel) for s in STORE_SHARDS}["w#1"] == (10, 10)
    store = ParameterStore("ps-0")
    gen = torch.Generator().manual_seed(0)
    store.load(
        JOB,
        OptimizerSettings(kind="sgd", lr=1.0),
        STORE_SHARDS,
        [(s.shard_id, torch.randn(s.numel, generator=gen)) for s in STORE_SHARDS],
        ("w0", "w1"),
    )
    store.push(JOB, "w1", 0, 1.0, [(s.shard_id, torch.ones(s.numel)) for s in STORE_SHARDS])
    before = dict(store.pull(JOB, 0, [], timeout_s=0)[1])
    grads: list[tuple[str, torch.Tensor | Encoded]] = [
        (s.shard_id, torch.ones(s.numel)) for s in STORE_SHARDS
    ]
    grads = [(s, make() if s == sid else g) for s, g in grads]
    with pytest.raises(InvalidArgument, match=needle) as info:
        store.push(JOB, "w0", 0, 1.0, grads)
    assert repr(sid) in str(info.value)
    assert store.describe(JOB)[1] == 0 and store.describe(JOB)[4] == ["w1"]
    after = dict(store.pull(JOB, 0, [], timeout_s=0)[1])
    assert all(torch.equal(after[k], before[k]) for k in before)


# -- in-process training: rows vs dense through a real ParameterStore ----------------------

CONFIG = GPTConfig(
    n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=256, num_labels=3, dropout=0.0
)
BATCH, STEPS = 4, 4
OPTIMIZERS = {
    "sgd-momentum": OptimizerSettings(kind="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
    "adamw": OptimizerSettings(kind="adamw", lr=1e-2, weight_decay=0.1, beta2=0.95),
}


def model_shards(config: GPTConfig, shard_bytes: int) -> list[Shard]:
    with torch.device("meta"):
        params = GPT(config).named_parameters()
        decays = tasks.decay_rule(False)
        infos = [ParamInfo(n, tuple(p.shape), decays(n, p)) for n, p in params]
    return plan_shards(infos, ["ps-0"], shard_bytes=shard_bytes)


def classify_batch(config: GPTConfig, seed: int) -> torch.Tensor:
    """(BATCH, block_size + 1) rows [label, n, ids..., 0...], examples of up to 8 tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.zeros(BATCH, config.block_size + 1, dtype=torch.int32)
    rows[:, 0] = torch.randint(0, config.num_labels, (BATCH,), generator=gen)
    rows[:, 1] = torch.randint(1, 9, (BATCH,), generator=gen)
    for b in range(BATCH):
        n = int(rows[b, 1])
        rows[b, 2 : 2 + n] = torch.randint(0, config.vocab_size, (n,), generator=gen)
    return rows


def train(
    config: GPTConfig, settings: OptimizerSettings, dtype: torch.dtype, rows: bool
) -> tuple[dict[str, torch.Tensor], int, int]:
    """STEPS classify steps of one worker through the codec into a store -> (parameters,
    gradient bytes pushed, shards sent as rows with a partial first row)."""
    shards = model_shards(config, shard_bytes=4 * 1000)  # wte: 5 shards, cut mid-row
    init = init_model(config, seed=5)
    store = ParameterStore("ps-0")
    start = [(s.shard_id, shard_view(init.get_parameter(s.param).data, s).clone()) for s in shards]
    store.load(JOB, settings, shards, start, ("w0",))
    replica = Replica(config, shards, torch.device("cpu"), task="classify")
    grids = push_grids(shards) if rows else {}
    nbytes = partial = 0
    for t in range(STEPS):
        replica.load(dict(store.pull(JOB, t, [], timeout_s=5)[1]))
        _, grads = replica.train_step(classify_batch(config, seed=t))
        pushed: list[tuple[str, torch.Tensor | Encoded]] = []
        for sid, g in grads.items():
            sent = encode_push(g, grids[sid], dtype) if sid in grids else g
            if isinstance(sent, torch.Tensor):
                blob = codec.shard_tensor_bytes(sid, t, sent, dtype, wrap=2)
            else:
                blob = codec.compressed_shard_bytes(sid, t, sent, wrap=2)
                partial += sent.grid.first_column > 0
            got = codec.read_push_request(blob)
            assert isinstance(got, tuple)
            nbytes += len(blob)
            pushed.append((sid, got[2]))
        assert store.push(JOB, "w0", t, float(BATCH), pushed).applied
    final = {sid: v.clone() for sid, v in store.pull(JOB, STEPS, [], timeout_s=5)[1]}
    return final, nbytes, partial


@pytest.mark.parametrize(
    ("name", "tied", "dtype"),
    [
        ("sgd-momentum", True, torch.float32),
        ("adamw", True, torch.float32),
        ("sgd-momentum", False, torch.bfloat16),
        ("adamw", False, torch.float32),
    ],
    ids=["sgd-tied-fp32", "adamw-tied-fp32", "sgd-untied-bf16", "adamw-untied-fp32"],
)
def test_classify_training_with_rows_equals_dense_bit_for_bit(
    name: str, tied: bool, dtype: torch.dtype
) -> None:
    config = replace(CONFIG, tie_embeddings=tied)
    with_rows, rows_bytes, partial = train(config, OPTIMIZERS[name], dtype, rows=True)
    dense, dense_bytes, _ = train(config, OPTIMIZERS[name], dtype, rows=False)
    assert with_rows.keys() == dense.keys()
    for sid in dense:
        assert torch.equal(bits(with_rows[sid]), bits(dense[sid])), sid
    assert partial > 0  # shards cut mid-row went as rows
    # wte is 256 x 16 and a batch touches at most 32 of its rows; untied, the unused head's
    # 256 rows go as none: at least a third of the bytes saved either way.
    assert rows_bytes < 0.67 * dense_bytes, (rows_bytes, dense_bytes)


def test_the_rows_found_are_the_rows_with_a_nonzero_bit_pattern() -> None:
    """Against a padded reference, over random shapes and cuts (partial rows at either end,
    shards inside one row) and random zeros, -0.0 among them."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        width = int(torch.randint(1, 12, (), generator=gen))
        column = int(torch.randint(0, width, (), generator=gen))
        numel = int(torch.randint(1, 80, (), generator=gen))
        grid = RowGrid(width, column)
        x = torch.randn(numel, generator=gen)
        x[torch.rand(numel, generator=gen) < 0.9] = 0.0
        x[torch.rand(numel, generator=gen) < 0.05] = -0.0
        padded = torch.zeros(grid.rows(numel) * width, dtype=torch.int32)
        padded[column : column + numel] = x.view(torch.int32)
        want = padded.view(-1, width).ne(0).any(dim=1).nonzero().view(-1).tolist()
        sent = encode_push(x, grid, torch.float32)
        if isinstance(sent, Rows):
            assert sent.indices.tolist() == want, (width, column, numel)
        assert torch.equal(bits(sent.decode() if isinstance(sent, Rows) else sent), bits(x))


def test_rows_are_not_a_job_setting() -> None:
    with pytest.raises(ValueError, match="ROWS is not a setting"):
        codec.compression_from_proto(job_pb2.PushCompression(kind=Compressed.ROWS))

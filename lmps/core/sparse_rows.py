"""Sparse embedding rows: a lossless push encoding for shards whose gradient touches few rows.

A batch of B sequences of T tokens touches at most B * T rows of the token embedding `wte`
(V, C) and T rows of the position embedding `wpe` (block_size, C); the gradient of every
other row is exactly zero. `Rows` sends only the touched rows: their sorted indices (int32)
and their values in the wire dtype. The server rebuilds the dense fp32 shard, zeros and all,
before it checks or applies anything.

Exact, for every optimizer. The rows are found in the values a dense push would send (cast
to the wire dtype first) by bit pattern, so -0.0 (and a NaN, which the server then refuses
as it refuses a dense one) counts as nonzero: the decoded shard is bit for bit what the dense
push decodes to. The weighted mean, clipping norms, weight decay of untouched rows, SGD
momentum, AdamW's moments and checkpoints are then the dense push's.

Lazy (row-wise) updates were not chosen. TensorFlow's LazyAdamOptimizer and torch's
SparseAdam update only the rows a batch touched: an untouched row's moments do not decay,
its momentum does not carry it and its weight decay is skipped, so the numbers differ from
dense AdamW and SGD-with-momentum and the run is another run (not single-process torch,
which tests/cluster/test_parity.py holds lmps to). What is saved here is wire bytes; the
servers' update is the dense one, O(numel) as before.

When it pays: a touched row costs `itemsize * width + 4` bytes (its values and its index)
instead of `itemsize * width`, so rows win unless almost every row is touched; `encode_push`
picks rows only when the whole message is smaller than the dense one (`FRAMING_BYTES`). Where:
`--task classify` (its head is `score`, so wte's gradient holds the batch's tokens only), an
untied `lm_head` that the task does not use, an untied model's wte, wpe when a batch is
shorter than block_size. With tied embeddings and the LM task the head fills every row of wte:
dense, at the cost of one pass over the shard to find that out.

Shards that are not row-aligned: a shard is the flat slice [start, start + numel) of the
row-major parameter, so it may begin and end mid-row. `RowGrid` cuts it on the parameter's
row boundaries: row j of the shard is its elements [max(0, j * width - first_column),
min(numel, (j + 1) * width - first_column)); the first and the last may be partial, and a
listed row carries exactly its elements in the shard.

Pure torch, device-agnostic; no grpc. `lmps.rpc.codec` frames a `Rows` as a
`lmps.v1.Compressed` of kind ROWS and reads it back, calling `validate`; the store checks
the grid against the shard (`check_shard`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lmps.core.partition import Shard

ROW_SPARSE_PARAMS = frozenset(
    {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
)
"""Parameters whose shards a worker pushes as rows when that is smaller: the embeddings and
an untied output head (with tied embeddings the head *is* wte). Other matrices' gradients are
dense (every row of a Linear's weight sees every token), so looking costs a pass for nothing."""

MAX_NUMEL = 2**31 - 1  # row indices are int32 (as `lmps.core.compress.MAX_NUMEL`)

FRAMING_BYTES = 32
"""An upper bound of what a ROWS message has on top of a dense one besides its indices (the
`Compressed` field: kind, numel, row_width, first_column, the indices' tag and length, each
varint at most 5 bytes); rows are sent only when values + indices + this < the dense values,
so a rows message is always strictly smaller than the dense message it replaces."""

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # itemsize -> int dtype


@dataclass(frozen=True)
class RowGrid:
    """How a shard of a matrix falls on the rows of its parameter."""

    width: int
    """Elements per parameter row: the product of the parameter's shape past its first
    dimension (a matrix's columns)."""
    first_column: int
    """Column of the shard's first element in its row (start % width), in [0, width)."""

    def rows(self, numel: int) -> int:
        """Rows a shard of `numel` elements spans, partial ones included."""
        return -(-(self.first_column + numel) // self.width)

    def elements(self, numel: int, indices: Tensor) -> int:
        """Elements of the shard in the listed rows (`indices` strictly increasing, in
        [0, rows(numel))): width each, less the part of a partial first or last row that lies
        outside the shard."""
        k = indices.numel()
        if not k:
            return 0
        n = self.rows(numel)
        out = k * self.width
        if int(indices[0]) == 0:
            out -= self.first_column
        if int(indices[-1]) == n - 1:
            out -= n * self.width - self.first_column - numel
        return out

    def split(self, numel: int) -> tuple[int, int, int]:
        """(head, whole, tail) of a shard of `numel` elements: the elements of a partial first
        row (0 when the shard starts on a row), the number of whole rows, the elements of a
        partial last row (0 when it ends on one). A shard inside one row is all head."""
        head = min(numel, (self.width - self.first_column) % self.width)
        whole = (numel - head) // self.width
        return head, whole, numel - head - whole * self.width

    def pieces(self, numel: int, indices: Tensor) -> tuple[bool, Tensor, bool]:
        """Which pieces of the shard the rows `indices` (strictly increasing, in
        [0, rows(numel))) list: (its partial first row, the whole rows as int64 indices among
        the whole rows, its partial last row)."""
        head, _, tail = self.split(numel)
        idx, k = indices.long(), indices.numel()
        first = head > 0 and k > 0 and int(idx[0]) == 0
        last = tail > 0 and k > 0 and int(idx[-1]) == self.rows(numel) - 1
        return first, idx[int(first) : k - int(last)] - int(head > 0), last


def grid_of(shard: Shard) -> RowGrid | None:
    """The row grid of a shard of a parameter with at least 2 dimensions (a row: one index of
    its first dimension); None for vectors, scalars and empty parameters."""
    shape = shard.param_shape
    width = math.prod(shape[1:])
    if len(shape) < 2 or width < 1:
        return None
    return RowGrid(width, shard.start % width)


def push_grids(shards: Iterable[Shard]) -> dict[str, RowGrid]:
    """Shard id -> grid, for the shards a worker pushes as rows when smaller
    (`ROW_SPARSE_PARAMS`)."""
    out = {}
    for s in shards:
        grid = grid_of(s) if s.param in ROW_SPARSE_PARAMS else None
        if grid is not None:
            out[s.shard_id] = grid
    return out


@dataclass(frozen=True)
class Rows:
    """A shard sent as its nonzero rows: the listed rows' values, every other element 0."""

    numel: int
    grid: RowGrid
    indices: Tensor  # (k,) int32, strictly increasing, in [0, grid.rows(numel))
    values: Tensor  # (m,) float, the wire dtype: the listed rows' elements in the shard, in order

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire: the values and the indices."""
        return self.values.numel() * self.values.element_size() + 4 * self.indices.numel()

    def decode(self) -> Tensor:
        """(numel,) fp32, a new tensor: the values in their rows, zeros elsewhere."""
        numel, width = self.numel, self.grid.width
        out = torch.zeros(numel, dtype=torch.float32, device=self.values.device)
        head, whole, tail = self.grid.split(numel)
        first, body, last = self.grid.pieces(numel, self.indices)
        v, at = self.values.to(torch.float32), 0  # (m,)
        if first:
            out[:head], at = v[:head], head
        if body.numel():
            rows = out[head : head + whole * width].view(whole, width)  # a view: writes to out
            n = body.numel() * width
            rows.index_copy_(0, body, v[at : at + n].view(-1, width))
            at += n
        if last:
            out[numel - tail :] = v[at:]
        return out

    def validate(self) -> None:
        """ValueError naming the first inconsistency (for what arrives from the wire)."""
        if not 1 <= self.numel <= MAX_NUMEL:
            raise ValueError(f"rows numel must be in [1, 2^31), got {self.numel}")
        width, column = self.grid.width, self.grid.first_column
        if not 1 <= width <= MAX_NUMEL:
            raise ValueError(f"row width must be in [1, 2^31), got {width}")
        if not 0 <= column < width:
            raise ValueError(f"first column must be in [0, {width}), got {column}")
        if not self.values.is_floating_point() or self.values.dim() != 1:
            raise ValueError(
                f"row values must be a 1-D float tensor, got {self.values.dtype} "
                f"{list(self.values.shape)}"
            )
        if self.indices.dtype != torch.int32 or self.indices.dim() != 1:
            raise ValueError(
                f"row indices must be 1-D int32, got {self.indices.dtype} "
                f"{list(self.indices.shape)}"
            )
        n, k = self.grid.rows(self.numel), self.indices.numel()
        if k:
            lo, hi = (int(v) for v in torch.aminmax(self.indices))
            if lo < 0 or hi >= n:
                raise ValueError(f"row index out of [0, {n}): {lo if lo < 0 else hi}")
            if k > 1 and not bool((self.indices[1:] > self.indices[:-1]).all()):
                raise ValueError("row indices are not strictly increasing (unsorted or repeated)")
        want = self.grid.elements(self.numel, self.indices)
        if self.values.numel() != want:
            got = self.values.numel()
            raise ValueError(f"{k} rows hold {want} values in this shard, got {got}")


def check_shard(rows: Rows, shard: Shard) -> None:
    """ValueError unless `rows` is cut on `shard`'s row grid (numel is the caller's check)."""
    grid = grid_of(shard)
    if grid is None:
        shape = list(shard.param_shape)
        raise ValueError(f"parameter {shard.param!r} of shape {shape} has no rows")
    if rows.grid != grid:
        raise ValueError(
            f"rows of width {rows.grid.width} from column {rows.grid.first_column}; the shard's "
            f"are of width {grid.width} from column {grid.first_column}"
        )


def encode_push(x: Tensor, grid: RowGrid, dtype: torch.dtype) -> Rows | Tensor:
    """What an uncompressed push sends for the 1-D shard `x`: its touched rows when that
    message is smaller, else the dense values cast to the wire `dtype` (the tensor the codec
    then sends as is)."""
    if x.dim() != 1:
        raise ValueError(f"encode a 1-D shard, got shape {list(x.shape)}")
    if not dtype.is_floating_point:
        raise ValueError(f"the wire dtype must be a float type, got {dtype}")
    w = x.detach().to(dtype)  # (numel,): exactly the values a dense push sends
    numel, itemsize = w.numel(), w.element_size()
    if not numel:
        return w
    # Bit patterns, not values: -0.0 is kept (the decoded shard is the dense one bit for bit)
    # and so is a NaN (which the server refuses, as a dense NaN).
    touched = _touched(w.contiguous().view(_BITS[itemsize]), grid)  # (rows,)
    indices = touched.nonzero().view(-1)
    m = grid.elements(numel, indices)
    if m * itemsize + 4 * indices.numel() + FRAMING_BYTES >= numel * itemsize:
        return w
    head, whole, tail = grid.split(numel)
    first, body, last = grid.pieces(numel, indices)
    parts = [w[:head]] if first else []
    if body.numel():
        rows = w[head : head + whole * grid.width].view(whole, grid.width)
        parts.append(rows.index_select(0, body).view(-1))
    if last:
        parts.append(w[numel - tail :])
    values = torch.cat(parts) if parts else w[:0]  # (m,)
    return Rows(numel=numel, grid=grid, indices=indices.to(torch.int32), values=values)


def _touched(bits: Tensor, grid: RowGrid) -> Tensor:
    """(grid.rows(numel),) bool: which rows of the shard hold a nonzero bit pattern. Whole rows
    in one pass of row-wise max and min (a row is all zeros iff both are 0: 4x faster here
    than `ne(0).any(1)`), a partial first or last row on its own."""
    numel, width = bits.numel(), grid.width
    head, whole, tail = grid.split(numel)
    parts = []
    if head:
        parts.append(bits[:head].ne(0).any().view(1))
    if whole:
        body = bits[head : head + whole * width].view(whole, width)
        parts.append((body.amax(dim=1) != 0) | (body.amin(dim=1) != 0))
    if tail:
        parts.append(bits[numel - tail :].ne(0).any().view(1))
    return torch.cat(parts)

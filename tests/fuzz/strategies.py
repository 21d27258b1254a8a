"""Hypothesis strategies for hostile lmps messages.

State-changing RPCs (Load, Push, SetMembers, SubmitJob, Configure, Register) only ever get
inputs that are invalid by construction: a near-valid message plus at least one defect that
the contract says must be refused. `Case.must_fail` says so and the tests assert it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from hypothesis import strategies as st

from lmps.core.model import GPT, decay_mask
from lmps.core.partition import ParamInfo, validate_cover
from lmps.rpc import codec
from lmps.rpc.codec import CodecError
from lmps.v1 import coordinator_pb2, job_pb2, parameter_pb2, tensor_pb2, worker_pb2

FLOAT_DTYPES: tuple[Any, ...] = (
    tensor_pb2.FLOAT32,
    tensor_pb2.FLOAT16,
    tensor_pb2.BFLOAT16,
    tensor_pb2.FLOAT64,
)
INT_DTYPES: tuple[Any, ...] = (
    tensor_pb2.INT64,
    tensor_pb2.INT32,
    tensor_pb2.INT16,
    tensor_pb2.INT8,
    tensor_pb2.UINT8,
    tensor_pb2.BOOL,
)
KNOWN_DTYPES = FLOAT_DTYPES + INT_DTYPES

# -- scalars -------------------------------------------------------------------------------

huge_text = st.builds(
    lambda c, n: c * n, st.sampled_from("x\u00e9\u4e2d\x00#"), st.integers(1_000, 70_000)
)


def weighted(percent: int, likely: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> Any:
    """`likely` `percent`% of the time, else `other` (one_of weighs its flattened branches)."""
    return st.integers(0, 99).flatmap(lambda r: likely if r < percent else other)


# Mostly short ids: a huge one mostly meets B1 (its error trailers exceed the client's limit).
text = weighted(80, st.one_of(st.just(""), st.text(max_size=24)), huge_text)
u64 = st.one_of(
    st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1])
)
u32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1]))
i64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 70))
doubles = st.one_of(
    st.floats(), st.sampled_from([0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 5e-324, 1e308])
)
# proto3 enums are open: any int32 travels.
enums: st.SearchStrategy[Any] = st.one_of(st.integers(-2, 14), st.integers(-(2**31), 2**31 - 1))
bad_weights = st.sampled_from([0.0, -0.0, -1.0, -1e-300, math.nan, math.inf, -math.inf])


def ids(*real: str) -> st.SearchStrategy[str]:
    """One of `real` half the time, else empty, random or huge."""
    return weighted(50, st.sampled_from(real), text) if real else text


def other_ids(*taken: str) -> st.SearchStrategy[str]:
    """Non-empty ids that are none of `taken`."""
    return weighted(80, st.text(min_size=1, max_size=24), huge_text).filter(
        lambda s: s not in taken
    )


# -- tensors -------------------------------------------------------------------------------


@st.composite
def garbage_tensors(draw: st.DrawFn) -> tensor_pb2.Tensor:
    """Anything a Tensor message can carry: odd dtypes, negative or huge dims, random bytes
    that may or may not match the shape."""
    dtype: Any = draw(st.one_of(st.sampled_from(KNOWN_DTYPES), enums))
    shape = draw(st.lists(st.one_of(st.integers(-2, 40), i64), max_size=4))
    data = draw(st.binary(max_size=300))
    if draw(st.booleans()) and dtype in KNOWN_DTYPES and all(0 <= d <= 40 for d in shape):
        n = math.prod(shape) * codec.to_torch_dtype(dtype).itemsize
        if n <= 4096:
            data = draw(st.binary(min_size=n, max_size=n))  # consistent, random contents
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def values_of(numel: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g) * scale


def encode_as(t: torch.Tensor, dtype: int) -> tensor_pb2.Tensor:
    return codec.encode(t, codec.to_torch_dtype(dtype))


# -- defects that make a tensor invalid wherever a float 1-D value of `numel` is due --------

TENSOR_DEFECTS = (
    "int_dtype",
    "bad_length",
    "wrong_shape",
    "nonfinite",
    "neg_dim",
    "unknown_dtype",
)


@st.composite
def broken_tensor(draw: st.DrawFn, numel: int, defect: str) -> tensor_pb2.Tensor:
    """A value for a shard of `numel` elements that `defect` makes invalid."""
    t = values_of(numel, draw(st.integers(0, 2**32)))
    if defect == "int_dtype":
        return codec.encode(t.round().to(codec.to_torch_dtype(draw(st.sampled_from(INT_DTYPES)))))
    if defect == "bad_length":
        size = draw(st.integers(0, 4 * numel + 8).filter(lambda n: n != 4 * numel))
        return tensor_pb2.Tensor(
            dtype=tensor_pb2.FLOAT32,
            shape=[numel],
            data=draw(st.binary(min_size=size, max_size=size)),
        )
    if defect == "wrong_shape":
        shape = draw(st.sampled_from([[1, numel], [numel, 1], [numel + 1], [0], []]))
        if shape == [] and numel == 1:
            shape = [1, 1]
        return codec.encode(values_of(math.prod(shape), 0).reshape(shape))
    if defect == "nonfinite":
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        t[draw(st.integers(0, numel - 1))] = bad
        return encode_as(t, draw(st.sampled_from(FLOAT_DTYPES)))
    if defect == "neg_dim":
        shape = draw(st.sampled_from([[-numel], [numel, -1], [-1, -numel]]))
        return tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=shape, data=codec.encode(t).data)
    assert defect == "unknown_dtype"
    dtype: Any = draw(st.one_of(st.just(0), st.integers(11, 2**31 - 1), st.integers(-(2**31), -1)))
    return tensor_pb2.Tensor(dtype=dtype, shape=[numel], data=codec.encode(t).data)


@st.composite
def good_tensor(draw: st.DrawFn, numel: int) -> tensor_pb2.Tensor:
    """A valid value of `numel` elements in any float dtype."""
    t = values_of(numel, draw(st.integers(0, 2**32)), draw(st.sampled_from([1.0, 1e-3, 30.0])))
    return encode_as(t, draw(st.sampled_from(FLOAT_DTYPES)))


@st.composite
def good_tensors(draw: st.DrawFn, shards: dict[str, int]) -> list[tuple[str, tensor_pb2.Tensor]]:
    """A valid value for every shard, in float dtypes picked per shard from one seed (a
    handful of draws however many shards there are: generation stays fast)."""
    seed = draw(st.integers(0, 2**32))
    scale = draw(st.sampled_from([1.0, 1e-3, 30.0]))
    mixed = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    out = []
    for sid, n in shards.items():
        dtype = (
            FLOAT_DTYPES[int(torch.randint(0, 4, (), generator=g))] if mixed else FLOAT_DTYPES[0]
        )
        out.append((sid, encode_as(torch.randn(n, generator=g) * scale, dtype)))
    return out


def random_bytes_tensor(numel: int, data: bytes) -> tensor_pb2.Tensor:
    """Random bytes of exactly the right length: valid or not depending on the bytes."""
    return tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[numel], data=data)


# -- streams of (header, items) with defects --------------------------------------------------

STREAM_DEFECTS = ("no_header", "second_header", "empty", "drop", "dup", "unknown_id", "rename")


@dataclass
class Case:
    messages: list[Any]
    defects: list[str]
    must_fail: bool
    cancel_after: int | None = None
    note: str = ""

    def __str__(self) -> str:
        sizes = sum(m.ByteSize() for m in self.messages)
        first = str(self.messages[0])[:300] if self.messages else "<no messages>"
        return (
            f"defects={self.defects} cancel_after={self.cancel_after} {self.note} "
            f"messages={len(self.messages)} bytes={sizes} first={first!r}"
        )


def _apply_stream_defects(
    draw: st.DrawFn,
    header: Any,
    items: list[tuple[str, Any]],
    defects: list[str],
    numel: dict[str, int],
    make_item: Any,
) -> list[Any]:
    """Turn (header, [(shard_id, tensor)]) into messages with `defects` applied."""
    items = list(items)
    # Drops first: a drop after a dup could remove the duplicate and leave a valid stream.
    for d in sorted(defects, key=lambda d: d != "drop"):
        if d in TENSOR_DEFECTS and items:
            i = draw(st.integers(0, len(items) - 1))
            sid = items[i][0]
            items[i] = (sid, draw(broken_tensor(numel.get(sid, 4), d)))
        elif d == "drop" and items:
            items.pop(draw(st.integers(0, len(items) - 1)))
        elif d == "dup" and items:
            items.insert(
                draw(st.integers(0, len(items))), items[draw(st.integers(0, len(items) - 1))]
            )
        elif d == "unknown_id":
            sid = draw(other_ids(*numel))
            items.insert(draw(st.integers(0, len(items))), (sid, draw(good_tensor(4))))
        elif d == "rename" and items:
            i = draw(st.integers(0, len(items) - 1))
            items[i] = (draw(other_ids(*numel)), items[i][1])
    messages = [header] + [make_item(sid, t) for sid, t in items]
    if "no_header" in defects:
        messages = messages[1:]
    if "second_header" in defects:
        # Never first: with no_header that would make the stream well-formed again.
        messages.insert(draw(st.integers(min(1, len(messages)), len(messages))), header)
    if "empty" in defects:
        messages = []
    return messages


@st.composite
def push_cases(
    draw: st.DrawFn,
    shards: dict[str, int],
    version: int,
    members: tuple[str, ...],
    others: tuple[str, ...],
) -> Case:
    """A Push stream for a server holding `shards`. A push from a barrier member at the
    current step always carries at least one defect; any other push is refused for who
    sends it or when (not a member, stale or future step)."""
    worker = draw(st.one_of(st.sampled_from(members), ids(*others)))
    step = draw(
        st.one_of(
            st.just(version),
            st.sampled_from([0, max(version - 1, 0), version + 1, version + 1000]),
            u64,
        )
    )
    weight = draw(st.one_of(st.just(1.0), st.floats(0.5, 64.0), doubles))
    needs_defect = worker in members and step == version
    choices = STREAM_DEFECTS + TENSOR_DEFECTS + ("bad_weight",)
    defects = draw(
        st.lists(st.sampled_from(choices), min_size=1 if needs_defect else 0, max_size=3)
    )
    if "bad_weight" in defects:
        weight = draw(bad_weights)
    items = draw(good_tensors(shards))
    if draw(st.booleans()):
        items = draw(st.permutations(items))
    if defects and draw(st.integers(0, 4)) == 0:  # random bytes as data, next to a real defect
        i = draw(st.integers(0, len(items) - 1))
        sid = items[i][0]
        items[i] = (
            sid,
            random_bytes_tensor(
                shards[sid], draw(st.binary(min_size=4 * shards[sid], max_size=4 * shards[sid]))
            ),
        )
    header = parameter_pb2.PushRequest(
        header=parameter_pb2.PushHeader(job_id="", worker_id=worker, step=step, weight=weight)
    )

    def grad(sid: str, t: tensor_pb2.Tensor) -> parameter_pb2.PushRequest:
        return parameter_pb2.PushRequest(
            grad=tensor_pb2.ShardTensor(
                shard_id=sid, version=draw(st.sampled_from([step, 0])), tensor=t
            )
        )

    if draw(weighted(85, st.just(False), st.just(True))):
        # An abrupt client: a clean stream cut before its last gradient. (Only a clean one:
        # the server may take a cancelled stream's end for a normal end (B3), and a cut
        # could drop the very defect that made a stream invalid.)
        messages = [header] + [grad(sid, t) for sid, t in items]
        cut = draw(st.integers(0, len(messages) - 1))
        return Case(messages, ["cancelled"], True, cut, f"worker={worker[:40]!r} step={step}")
    messages = _apply_stream_defects(draw, header, items, defects, shards, grad)
    return Case(
        messages, defects, True, None, f"worker={worker[:40]!r} step={step} weight={weight}"
    )


def with_job(case: Case, job_id: str) -> Case:
    for m in case.messages:
        if m.WhichOneof("kind") == "header":
            m.header.job_id = job_id
    return case


# Optimizer configs the contract rejects (checked against codec.optimizer_from_proto).
BAD_OPTIMIZERS = (
    job_pb2.OptimizerConfig(kind=job_pb2.OPTIMIZER_UNSPECIFIED, lr=0.1),
    job_pb2.OptimizerConfig(kind=cast(Any, 7), lr=0.1),
    job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.0),
    job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=-1.0),
    job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=math.nan),
    job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=math.inf),
    job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1, momentum=1.0),
    job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1, momentum=-0.5),
    job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1, nesterov=True),
    job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1, weight_decay=-1.0),
    job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1, weight_decay=math.nan),
    job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=0.1, momentum=0.9),
    job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=0.1, beta1=1.0),
    job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=0.1, beta2=-0.1),
    job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=0.1, eps=-1e-8),
    job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1, min_lr=0.2),
)
# Invalid on a server, but SubmitJob fills in total_steps when it is 0, which makes it valid.
COSINE_WITHOUT_TOTAL = job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=0.1, schedule=job_pb2.COSINE)


def optimizer_ok(m: job_pb2.OptimizerConfig) -> bool:
    try:
        codec.optimizer_from_proto(m)
    except ValueError:
        return False
    return True


@st.composite
def optimizers(draw: st.DrawFn) -> job_pb2.OptimizerConfig:
    """Any OptimizerConfig, valid or not."""
    return job_pb2.OptimizerConfig(
        kind=draw(st.one_of(st.sampled_from([job_pb2.SGD, job_pb2.ADAMW]), enums)),
        lr=draw(st.one_of(st.floats(1e-4, 1.0), doubles)),
        momentum=draw(st.one_of(st.just(0.0), doubles)),
        nesterov=draw(st.booleans()),
        weight_decay=draw(st.one_of(st.just(0.0), doubles)),
        beta1=draw(st.one_of(st.just(0.0), doubles)),
        beta2=draw(st.one_of(st.just(0.0), doubles)),
        eps=draw(st.one_of(st.just(0.0), doubles)),
        schedule=draw(enums),
        warmup_steps=draw(u64),
        total_steps=draw(u64),
        min_lr=draw(st.one_of(st.just(0.0), doubles)),
    )


LOAD_DEFECTS = (
    STREAM_DEFECTS
    + TENSOR_DEFECTS
    + (
        "empty_job_id",
        "bad_optimizer",
        "bad_consistency",
        "dup_spec",
        "nonpositive_numel",
        "no_specs",
    )
)


def consistency_ok(value: int) -> bool:
    try:
        codec.consistency_from_proto(value)
    except ValueError:
        return False
    return True


@st.composite
def load_cases(draw: st.DrawFn, real_job: str, has_state: bool) -> Case:
    """A Load stream that the contract says must be refused (at least one defect)."""
    job_id = draw(st.one_of(st.just(real_job), other_ids("")))
    n_specs = draw(st.integers(1, 4))
    names = draw(
        st.lists(st.text(min_size=1, max_size=12), min_size=n_specs, max_size=n_specs, unique=True)
    )
    specs = [
        parameter_pb2.ShardSpec(
            shard_id=f"{name}#0",
            param=name,
            param_shape=[n],
            start=0,
            numel=n,
            server_id=draw(text),
            weight_decay=draw(st.booleans()),
        )
        for name, n in zip(
            names,
            draw(st.lists(st.integers(1, 64), min_size=n_specs, max_size=n_specs)),
            strict=True,
        )
    ]
    numel = {s.shard_id: int(s.numel) for s in specs}
    items = draw(good_tensors(numel))

    def value(sid: str, t: tensor_pb2.Tensor) -> parameter_pb2.LoadRequest:
        if has_state and draw(st.integers(0, 3)) == 0:  # a checkpoint restore, with junk state
            state = draw(
                st.dictionaries(
                    st.sampled_from(["step", "exp_avg", "momentum_buffer", "x"]),
                    garbage_tensors(),
                    max_size=2,
                )
            )
            return parameter_pb2.LoadRequest(
                state=parameter_pb2.ShardState(shard_id=sid, value=t, state=state)
            )
        return parameter_pb2.LoadRequest(shard=tensor_pb2.ShardTensor(shard_id=sid, tensor=t))

    if draw(weighted(85, st.just(False), st.just(True))):
        # An abrupt client: a valid stream for a new job, cut before its last value.
        header = parameter_pb2.LoadRequest(
            header=parameter_pb2.LoadHeader(
                job_id=draw(other_ids(real_job)),
                optimizer=job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1),
                shards=specs,
                members=draw(st.lists(text, max_size=3)),
            )
        )
        messages = [header] + [value(sid, t) for sid, t in items]
        return Case(messages, ["cancelled"], True, draw(st.integers(0, len(messages) - 1)))
    defects = draw(st.lists(st.sampled_from(LOAD_DEFECTS), min_size=1, max_size=3))
    optimizer = job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1)
    if "bad_optimizer" in defects:
        optimizer = draw(
            st.one_of(
                st.sampled_from([*BAD_OPTIMIZERS, COSINE_WITHOUT_TOTAL]),
                optimizers().filter(lambda o: not optimizer_ok(o)),
            )
        )
        assert not optimizer_ok(optimizer)
    elif draw(st.booleans()):
        optimizer = draw(optimizers())  # may or may not be valid: another defect is due anyway
    if "empty_job_id" in defects:
        job_id = ""
    if "dup_spec" in defects:
        specs.append(specs[draw(st.integers(0, len(specs) - 1))])
    if "nonpositive_numel" in defects:
        specs[draw(st.integers(0, len(specs) - 1))].numel = draw(st.sampled_from([0, -1, -(2**63)]))
    header = parameter_pb2.LoadRequest(
        header=parameter_pb2.LoadHeader(
            job_id=job_id,
            optimizer=optimizer,
            shards=[] if "no_specs" in defects else specs,
            members=draw(st.lists(text, max_size=3)),
            version=draw(u64),
            # Any mode when another defect is due; one the server does not know when this is.
            consistency=draw(
                enums.filter(lambda v: not consistency_ok(v))
                if "bad_consistency" in defects
                else enums
            ),
        )
    )
    messages = _apply_stream_defects(draw, header, items, defects, numel, value)
    return Case(messages, defects, True, None)


# -- SubmitJob ------------------------------------------------------------------------------

SUBMIT_DEFECTS = (
    "no_spec",
    "two_specs",
    "empty",
    "bad_split",
    "float_tokens",
    "2d_tokens",
    "codec",
    "out_of_vocab",
    "few_tokens",
    "model",
    "batch0",
    "wire_dtype",
    "optimizer",
    "members",
    "partial_init",
)

BAD_MODELS = (
    job_pb2.ModelConfig(n_layer=0, n_head=2, n_embd=32, block_size=16, vocab_size=64),
    job_pb2.ModelConfig(n_layer=1, n_head=0, n_embd=32, block_size=16, vocab_size=64),
    job_pb2.ModelConfig(n_layer=1, n_head=3, n_embd=32, block_size=16, vocab_size=64),
    job_pb2.ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=0, vocab_size=64),
    job_pb2.ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=0),
    job_pb2.ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=1.0),
    job_pb2.ModelConfig(
        n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=math.nan
    ),
    job_pb2.ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=-0.5),
    job_pb2.ModelConfig(
        n_layer=0, n_head=7, n_embd=2**32 - 1, block_size=2**32 - 1, vocab_size=2**32 - 1
    ),
)


def model_ok(m: job_pb2.ModelConfig) -> bool:
    try:
        codec.model_from_proto(m)
    except ValueError:
        return False
    return True


def _tokens_part(split: str, t: torch.Tensor) -> coordinator_pb2.SubmitJobRequest:
    return coordinator_pb2.SubmitJobRequest(
        data=coordinator_pb2.DatasetPart(split=split, tokens=codec.encode(t))
    )


@st.composite
def submit_cases(draw: st.DrawFn, spec: job_pb2.JobSpec, train: torch.Tensor, vocab: int) -> Case:
    """A SubmitJob stream with at least one defect that makes the coordinator refuse it
    before it creates a job (so nothing is loaded onto the servers)."""
    s = job_pb2.JobSpec()
    s.CopyFrom(spec)
    s.name = draw(text)
    s.seed = draw(u64)
    s.wait_for_members_s = 0.2
    defects = draw(st.lists(st.sampled_from(SUBMIT_DEFECTS), min_size=1, max_size=3))
    if "model" in defects:
        s.model.CopyFrom(draw(st.sampled_from(BAD_MODELS)))
        assert not model_ok(s.model)
    if "batch0" in defects:
        s.batch_size = 0
    if "wire_dtype" in defects:
        bad: Any = draw(st.one_of(st.sampled_from(INT_DTYPES), st.integers(11, 2**31 - 1)))
        s.wire_dtype = bad
    if "optimizer" in defects:
        s.optimizer.CopyFrom(draw(st.sampled_from(BAD_OPTIMIZERS)))
    if "members" in defects:
        s.num_servers = draw(st.integers(3, 2**32 - 1))  # more than the cluster has
        s.wait_for_members_s = draw(st.sampled_from([0.05, 0.2, -1.0]))
    start = draw(st.integers(0, max(0, train.numel() - 1)))
    tokens = (
        train
        if "few_tokens" not in defects
        else train[start : start + draw(st.integers(0, s.batch_size * 16))]
    )
    parts = [_tokens_part("train", tokens)]
    if "out_of_vocab" in defects:
        bad = torch.tensor(
            [draw(st.one_of(st.integers(vocab, 2**31 - 1), st.integers(-(2**31), -1)))],
            dtype=torch.int32,
        )
        parts.insert(
            draw(st.integers(0, len(parts))),
            _tokens_part(draw(st.sampled_from(["train", "eval"])), bad),
        )
    if "bad_split" in defects:
        parts.append(_tokens_part(draw(other_ids("train", "eval")), tokens[:8]))
    if "float_tokens" in defects:
        parts.append(_tokens_part("train", torch.ones(8)))
    if "2d_tokens" in defects:
        parts.append(_tokens_part("train", torch.zeros((2, 4), dtype=torch.int32)))
    if "codec" in defects:
        t = draw(garbage_tensors().filter(_undecodable))
        parts.append(
            coordinator_pb2.SubmitJobRequest(
                data=coordinator_pb2.DatasetPart(split="train", tokens=t)
            )
        )
    if "partial_init" in defects and hasattr(coordinator_pb2, "InitialParameter"):
        parts += draw(partial_init(s.model))
    messages = [coordinator_pb2.SubmitJobRequest(spec=s), *parts]
    if "two_specs" in defects:
        messages.insert(draw(st.integers(1, len(messages))), messages[0])
    if "no_spec" in defects:
        messages = messages[1:]
    if "empty" in defects:
        messages = []
    return Case(messages, defects, True, None)


@st.composite
def partial_init(draw: st.DrawFn, model: job_pb2.ModelConfig) -> list[Any]:
    """Initial values for some but not all parameters (the contract wants all or none),
    in any shape or dtype, NaN or not, maybe under unknown or repeated names."""
    try:
        with torch.device("meta"):
            shapes = {
                n: tuple(p.shape) for n, p in GPT(codec.model_from_proto(model)).named_parameters()
            }
    except ValueError:
        shapes = {"transformer.wte.weight": (4, 4)}
    names = draw(
        st.lists(st.sampled_from(sorted(shapes)), min_size=1, max_size=len(shapes) - 1 or 1)
    )
    names += draw(st.lists(text, max_size=2))
    out = []
    for name in names:
        shape = shapes.get(name, (3,))
        value = draw(
            st.one_of(
                st.just(codec.encode(torch.zeros(shape))),
                st.just(codec.encode(torch.full(shape, math.nan))),
                st.just(codec.encode(torch.full(shape, 1e39, dtype=torch.float64))),
                garbage_tensors(),
            )
        )
        out.append(
            coordinator_pb2.SubmitJobRequest(
                init=coordinator_pb2.InitialParameter(name=name, value=value)
            )
        )
    return out


def _undecodable(t: tensor_pb2.Tensor) -> bool:
    try:
        codec.decode(t)
    except CodecError:
        return True
    return False


@st.composite
def submit_cancel_cases(draw: st.DrawFn, spec: job_pb2.JobSpec, train: torch.Tensor) -> Case:
    """A valid job whose client vanishes while its first train tokens are on the way: what
    arrived is too little for one batch even if the server took the cut for the end of the
    stream (B3: it may; the reproducer cuts later)."""
    s = job_pb2.JobSpec()
    s.CopyFrom(spec)
    too_few = s.batch_size * s.model.block_size  # one token short of a batch
    chunks = list(torch.split(train[:too_few], draw(st.integers(4, 16))))
    parts = [_tokens_part("train", c) for c in chunks]
    messages = [coordinator_pb2.SubmitJobRequest(spec=s), *parts, _tokens_part("train", train)]
    return Case(messages, ["cancelled"], True, draw(st.integers(0, len(messages) - 1)))


# -- Configure ------------------------------------------------------------------------------


def configure_ok(req: worker_pb2.ConfigureRequest) -> bool:
    """What the worker would accept, computed here (on the meta device: no allocation)."""
    try:
        config = codec.model_from_proto(req.spec.model)
        codec.wire_dtype(req.spec.wire_dtype)
        shards = [codec.shard_from_proto(s) for s in req.shards]
        with torch.device("meta"):
            model = GPT(config)
        infos = [
            ParamInfo(n, tuple(p.shape), decay_mask(n, p)) for n, p in model.named_parameters()
        ]
        validate_cover(shards, infos)
        addresses = {s.server_id for s in req.servers}
        return all(s.server_id in addresses for s in shards)
    except (ValueError, CodecError):
        return False


@st.composite
def small_models(draw: st.DrawFn) -> job_pb2.ModelConfig:
    """Small model configs (valid or not): the worker builds the model before it checks the
    shard map, so big ones would only measure allocation."""
    return job_pb2.ModelConfig(
        n_layer=draw(st.integers(0, 2)),
        n_head=draw(st.integers(0, 4)),
        n_embd=draw(st.sampled_from([0, 4, 8, 12, 32])),
        block_size=draw(st.integers(0, 32)),
        vocab_size=draw(st.integers(0, 80)),
        dropout=draw(st.one_of(st.just(0.0), st.floats(-1, 2), st.just(math.nan))),
        bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
        activation=cast(Any, draw(st.integers(0, 3))),  # 3: unknown to this build
    )


@st.composite
def configure_requests(
    draw: st.DrawFn, fx_spec: job_pb2.JobSpec, shard_map: Any
) -> worker_pb2.ConfigureRequest:
    spec = job_pb2.JobSpec()
    spec.CopyFrom(fx_spec)
    if draw(st.booleans()):
        spec.model.CopyFrom(draw(small_models()))
    if draw(st.booleans()):
        spec.wire_dtype = draw(enums)
    shards = [parameter_pb2.ShardSpec.FromString(s.SerializeToString()) for s in shard_map.shards]
    mutation = draw(
        st.sampled_from(
            ["drop", "dup", "shift", "resize", "rename", "reshape", "decay", "random", "none"]
        )
    )
    if shards and mutation != "none":
        i = draw(st.integers(0, len(shards) - 1))
        if mutation == "drop":
            shards.pop(i)
        elif mutation == "dup":
            shards.append(shards[i])
        elif mutation == "shift":
            shards[i].start += draw(st.sampled_from([-1, 1, 2**40]))
        elif mutation == "resize":
            shards[i].numel += draw(st.sampled_from([-1, 1, -(2**40)]))
        elif mutation == "rename":
            shards[i].param = draw(text)
        elif mutation == "reshape":
            shards[i].param_shape.append(draw(st.integers(-2, 3)))
        elif mutation == "decay":
            shards[i].weight_decay = not shards[i].weight_decay
        else:
            shards = [
                parameter_pb2.ShardSpec(
                    shard_id=draw(text),
                    param=draw(text),
                    param_shape=draw(st.lists(i64, max_size=3)),
                    start=draw(i64),
                    numel=draw(i64),
                    server_id=draw(text),
                )
                for _ in range(draw(st.integers(0, 4)))
            ]
    servers = [
        worker_pb2.ServerAddress(server_id=s.server_id, address=s.address)
        for s in shard_map.servers
    ]
    if draw(st.booleans()):
        servers = [
            worker_pb2.ServerAddress(server_id=draw(text), address=draw(text))
            for _ in range(draw(st.integers(0, 3)))
        ]
    return worker_pb2.ConfigureRequest(job_id=draw(text), spec=spec, shards=shards, servers=servers)


# -- evaluation tokens ------------------------------------------------------------------------


def eval_tokens_ok(t: tensor_pb2.Tensor, vocab: int, block_size: int) -> bool:
    """Held-out sequences the contract accepts: int (N, T+1), 2 <= T+1 <= block_size + 1,
    ids in [0, vocab)."""
    try:
        seq = codec.decode(t)
    except CodecError:
        return False
    if seq.dim() != 2 or not 2 <= seq.shape[1] <= block_size + 1 or seq.is_floating_point():
        return False
    return not seq.numel() or (int(seq.min()) >= 0 and int(seq.max()) < vocab)


@st.composite
def eval_tokens(draw: st.DrawFn, vocab: int, block_size: int) -> tensor_pb2.Tensor:
    kind = draw(st.sampled_from(["valid", "valid", "range", "shape", "long", "dtype", "garbage"]))
    n = draw(st.integers(0, 3))
    t1 = draw(st.integers(2, block_size + 1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    seq = torch.randint(0, vocab, (n, t1), generator=g, dtype=torch.int64)
    if kind == "valid":
        return codec.encode(seq.to(draw(st.sampled_from([torch.int32, torch.int64, torch.int16]))))
    if kind == "range":
        seq = torch.randint(0, vocab, (max(n, 1), t1), generator=g, dtype=torch.int64)
        seq[0, 0] = draw(st.one_of(st.integers(vocab, 2**62), st.integers(-(2**62), -1)))
        return codec.encode(seq)
    if kind == "shape":
        shape = draw(st.sampled_from([(t1,), (n, 1), (n, 0), (1, 2, t1), ()]))
        return codec.encode(torch.zeros(shape, dtype=torch.int32))
    if kind == "long":  # longer than the model's context
        return codec.encode(
            torch.zeros((1, block_size + draw(st.integers(2, 40))), dtype=torch.int32)
        )
    if kind == "dtype":
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.float64]))
        return codec.encode(seq.to(dtype))
    return draw(garbage_tensors())

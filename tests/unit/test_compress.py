"""lmps.core.compress: int8 and top-k push encodings, and error feedback (EF-SGD).

Pure torch: no gRPC, no processes. The error-feedback properties are the ones EF-SGD
(Karimireddy et al., ICML 2019) rests on: nothing is lost, only delayed (the residual
identity), so the time average of what is sent converges to that of the true values as 1/T,
and top-k starves no coordinate.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmps.core.compress import (
    COMPRESSIONS,
    KINDS,
    Compression,
    Dense,
    ErrorFeedback,
    Int8Chunks,
    TopK,
    compression_from_name,
    encode,
    largest,
)

EPS32 = torch.finfo(torch.float32).eps  # 2^-23: twice the unit roundoff of one fp32 op


def spiky(n: int, seed: int) -> torch.Tensor:
    """Normal values with a few outliers (what a gradient shard looks like to a quantizer)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[torch.randint(0, n, (max(1, n // 100),), generator=g)] *= 50
    return x


def test_registry_and_kinds_agree() -> None:
    assert tuple(COMPRESSIONS) == KINDS == ("none", "int8", "topk")


# -- int8 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "chunk"), [(5000, 1024), (1024, 1024), (37, 7), (3, 1024)])
def test_int8_error_is_at_most_half_a_scale(n: int, chunk: int) -> None:
    x = spiky(n, seed=n)
    x[:chunk] = 0.0  # a chunk of zeros: scale 0, decoded exactly
    sent = encode(x, Compression("int8", chunk=chunk))
    assert isinstance(sent, Int8Chunks)
    sent.validate()
    assert sent.q.dtype == torch.int8 and sent.q.shape == (n,)
    assert sent.scales.shape == (math.ceil(n / chunk),)
    per_element = sent.scales.repeat_interleave(chunk)[:n]  # (n,) the scale of each element
    for c in range(math.ceil(n / chunk)):
        block = x[c * chunk : (c + 1) * chunk]
        assert sent.scales[c] == block.abs().max() / 127
    err = (sent.decode() - x).abs()
    # s / 2 from rounding q, plus the fp32 roundings of x / s and q * s (relative 2^-24 of
    # |q| <= 127 scales each): 127 * 2^-23 * s is a safe bound for both together.
    bound = per_element * (0.5 + 127 * EPS32)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert bool((sent.decode()[:chunk] == 0).all())
    assert sent.nbytes == n + 4 * math.ceil(n / chunk)


def test_int8_keeps_a_nan_for_the_server_to_refuse() -> None:
    x = torch.tensor([1.0, float("nan"), 2.0, 0.0])
    sent = encode(x, Compression("int8", chunk=2))
    with pytest.raises(ValueError, match="NaN or infinite"):
        sent.validate()


# -- top-k ----------------------------------------------------------------------------------


def test_topk_keeps_exactly_the_k_largest() -> None:
    x = spiky(3000, seed=1)
    c = Compression("topk", ratio=0.01)
    sent = encode(x, c)
    assert isinstance(sent, TopK)
    sent.validate()
    k = math.ceil(0.01 * 3000)
    assert sent.values.numel() == sent.indices.numel() == k == c.k(3000)
    want = torch.argsort(x.abs(), descending=True)[:k].sort().values  # random: no ties
    assert torch.equal(sent.indices.long(), want)
    assert torch.equal(sent.values, x[want])
    dense = sent.decode()
    assert torch.equal(dense[want], x[want])
    rest = torch.ones(3000, dtype=torch.bool)
    rest[want] = False
    assert bool((dense[rest] == 0).all())
    assert sent.nbytes == k * 8  # fp32 value + int32 index


def test_topk_ties_go_to_the_lower_index() -> None:
    # |x| = 3 three times for the last two places after the 5: indices 1 and 4 win, not 6.
    x = torch.tensor([1.0, -3.0, 0.5, 5.0, 3.0, 2.0, 3.0, 0.0])
    sent = encode(x, Compression("topk", ratio=3 / 8))
    assert isinstance(sent, TopK)
    assert sent.indices.tolist() == [1, 3, 4]
    assert sent.values.tolist() == [-3.0, 5.0, 3.0]
    # The choice depends on the values alone, whatever torch.topk does with ties.
    for k in range(1, 9):
        got = largest(x.abs(), k).tolist()
        order = sorted(range(8), key=lambda i: (-abs(float(x[i])), i))[:k]
        assert got == sorted(order)


@pytest.mark.parametrize(("ratio", "n", "k"), [(0.07, 100, 7), (0.01, 50, 1), (1.0, 9, 9)])
def test_topk_k_is_the_ceiling_of_the_ratio_as_written(ratio: float, n: int, k: int) -> None:
    assert Compression("topk", ratio=ratio).k(n) == k


def test_topk_values_travel_in_the_wire_dtype() -> None:
    x = spiky(1000, seed=2)
    sent = encode(x, Compression("topk", ratio=0.1), torch.bfloat16)
    assert isinstance(sent, TopK)
    assert sent.values.dtype == torch.bfloat16 and sent.nbytes == 100 * 6
    assert torch.equal(
        sent.decode()[sent.indices.long()], x[sent.indices.long()].bfloat16().float()
    )


def test_none_is_the_dense_value_in_the_wire_dtype() -> None:
    x = spiky(10, seed=3)
    sent = encode(x, Compression(), torch.bfloat16)
    assert isinstance(sent, Dense) and torch.equal(sent.decode(), x.bfloat16().float())


# -- error feedback -------------------------------------------------------------------------

SETTINGS = [Compression("int8", chunk=256), Compression("topk", ratio=0.05)]


def series(steps: int, n: int = 2000, seed: int = 0) -> list[torch.Tensor]:
    """A drifting mean plus noise: values that compress with a bias when sent alone."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, generator=g)
    return [mu + 0.5 * torch.randn(n, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("c", SETTINGS, ids=lambda c: c.spec)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_identity(c: Compression, dtype: torch.dtype) -> None:
    """sum of what was sent + the final residual == sum of the true values."""
    ef = ErrorFeedback(c, dtype)
    xs = series(50)
    sent = torch.zeros(2000, dtype=torch.float64)
    biggest = 0.0  # max |x_t + r_{t-1}| over the run
    for x in xs:
        r = ef.residuals.get("s", torch.zeros_like(x))
        biggest = max(biggest, float((x + r).abs().max()))
        sent += ef.compress("s", x).decode().double()
    true = torch.stack(xs).double().sum(0)
    # Each step rounds twice in fp32 (x + r, then v - decoded), each by at most 2^-24 of a
    # value <= `biggest`: over T steps the identity holds to T * 2^-23 * biggest.
    atol = len(xs) * EPS32 * biggest
    torch.testing.assert_close(sent + ef.residuals["s"].double(), true, rtol=0, atol=atol)


@pytest.mark.parametrize("c", SETTINGS, ids=lambda c: c.spec)
def test_time_average_converges_as_one_over_t(c: Compression) -> None:
    """With error feedback the mean of what was sent is off the true mean by residual / T,
    the residual bounded: 20x more steps, ~20x smaller error (at least 10x asserted, the
    residual's size varies). Without it, int8's rounding noise averages out only as
    1/sqrt(T) (~4.5x) and top-k's bias not at all: below 10x."""
    xs = series(200)
    for feedback, at_least, below in ((True, 10.0, math.inf), (False, 0.0, 10.0)):
        ef = ErrorFeedback(c)
        sent = torch.zeros(2000, dtype=torch.float64)
        true = torch.zeros(2000, dtype=torch.float64)
        err = {}
        for t, x in enumerate(xs, 1):
            out = ef.compress("s", x) if feedback else encode(x, c)
            sent += out.decode().double()
            true += x.double()
            if t in (10, 200):
                err[t] = float(((sent - true) / t).abs().max())
        assert at_least <= err[10] / err[200] < below, (feedback, err)


def test_topk_with_feedback_starves_no_coordinate() -> None:
    """A constant vector whose values span 1 to 0.1: top-k alone sends the same 2 largest
    forever; with error feedback a small coordinate's residual grows until it is sent."""
    n = 200
    x = 10.0 ** -(torch.arange(n, dtype=torch.float32) / n)  # 1 ... ~0.1
    c = Compression("topk", ratio=0.01)  # k = 2
    ef = ErrorFeedback(c)
    with_ef = torch.zeros(n, dtype=torch.int64)
    without = torch.zeros(n, dtype=torch.int64)
    for _ in range(1000):
        for counts, out in ((with_ef, ef.compress("s", x)), (without, encode(x, c))):
            assert isinstance(out, TopK)
            counts[out.indices.long()] += 1
    assert int((with_ef == 0).sum()) == 0, "a coordinate was never sent"
    assert int((without > 0).sum()) == 2
    # Not once by luck: the smallest is sent again, and each about x_i / x_0 as often as the
    # largest (the residuals' steady state).
    assert int(with_ef[-1]) >= 2
    sent_ratio = float(with_ef[-20:].sum() / with_ef[:20].sum())  # smallest 20 / largest 20
    size_ratio = float(x[-20:].sum() / x[:20].sum())
    assert 0.5 < sent_ratio / size_ratio < 2


def test_step_keeps_nothing_until_commit() -> None:
    ef = ErrorFeedback(Compression("int8", chunk=4))
    x = spiky(10, seed=4)
    sent, residual = ef.step("s", x)
    assert ef.residuals == {}
    ef.commit({"s": residual})
    torch.testing.assert_close(residual, x - sent.decode(), rtol=0, atol=0)
    again, _ = ef.step("s", x)  # starts from the committed residual
    assert torch.equal(again.decode(), encode(x + residual, ef.compression).decode())
    with pytest.raises(ValueError, match="residual"):
        ef.step("s", x[:5])


# -- the setting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("none", Compression()),
        ("int8", Compression("int8", chunk=1024)),
        ("int8:2048", Compression("int8", chunk=2048)),
        (" INT8:7 ", Compression("int8", chunk=7)),
        ("topk", Compression("topk", ratio=0.01)),
        ("topk:0.01", Compression("topk", ratio=0.01)),
        ("topk:1", Compression("topk", ratio=1.0)),
    ],
)
def test_compression_from_name(text: str, want: Compression) -> None:
    got = compression_from_name(text)
    assert got == want
    assert compression_from_name(got.spec) == got


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("gzip", "unknown push compression"),
        ("", "unknown push compression"),
        ("none:1", "takes no argument"),
        ("int8:", "nothing after"),
        ("int8:big", "chunk must be an integer"),
        ("int8:0", r"chunk must be in \[1, 2\^31\)"),
        ("int8:-4", r"chunk must be in"),
        ("topk:x", "ratio must be a number"),
        ("topk:0", r"ratio must be in \(0, 1\]"),
        ("topk:1.5", "ratio must be in"),
        ("topk:nan", "ratio must be in"),
    ],
)
def test_compression_from_name_refuses(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        compression_from_name(text)


def test_compression_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="must be one of"):
        Compression("fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be an int"):
        Compression("int8", chunk=True)

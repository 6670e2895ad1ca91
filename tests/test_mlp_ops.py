"""The sparse-MLP ops (polar::mlp_route, gather_up, gather_gated_up, gather_down, gather_down_partials): opcheck, errors, and their
reference impls against float64 math written here (one neuron at a time, no shared code with ops.py)."""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Importing polar_compile imports triton (through torch._inductor): set the interpreter first, so that the
    # kernel tests that may run after this module in the same process (tests/kernels) get it.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import given, settings
from hypothesis import strategies as st

import polar_compile  # noqa: F401  (registers the ops)
from tests.budget import examples

ops = torch.ops.polar
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# |op - float64| <= TOL * (1 + |float64|): fp32 accumulation, then one rounding to the output dtype
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ROUNDING = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}  # twice the unit roundoff


def up_float64(x, w, b, idx):
    """out[:, j] = x . w[idx[j]] + b[idx[j]], one column per selected neuron, float64."""
    return torch.stack([x.double() @ w[i].double() + b[i].double() for i in idx.tolist()], dim=1)


def down_float64(h, w_t, b, idx):
    """out = sum_j h[:, j] (outer) w_t[idx[j]] + b, float64."""
    out = b.double().expand(h.shape[0], -1).clone()
    for j, i in enumerate(idx.tolist()):
        out += h[:, j : j + 1].double() * w_t[i].double()[None, :]
    return out


def assert_near(actual, expected, dtype):
    assert actual.dtype == dtype and actual.shape == expected.shape
    error = (actual.double() - expected).abs()
    assert (error <= TOL[dtype] * (1 + expected.abs())).all(), f"max error {error.max().item():.3g}"


@st.composite
def mlp_inputs(draw):
    """x [N, d], up weights for ffn neurons, a down weight [ffn, d_out], idx: k distinct neurons, sorted or not."""
    rows = draw(st.sampled_from([1, 2, 3, 7, 16, 33]))
    d, d_out = draw(st.integers(1, 40)), draw(st.integers(1, 24))
    ffn = draw(st.integers(1, 40))
    k = draw(st.one_of(st.just(ffn), st.integers(1, ffn)))  # k = ffn: every neuron, in a random order
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    idx = torch.randperm(ffn, generator=generator)[:k]
    if draw(st.booleans()):
        idx = idx.sort().values
    return dict(
        x=randn(rows, d), w=randn(ffn, d, scale=d**-0.5), b=randn(ffn), w_up=randn(ffn, d, scale=d**-0.5),
        b_up=randn(ffn), h=randn(rows, k), w_t=randn(ffn, d_out, scale=k**-0.5), b_down=randn(d_out), idx=idx,
    )


@settings(max_examples=examples(60))
@given(mlp_inputs())
def test_gather_references_match_float64(a):
    x, idx, dtype = a["x"], a["idx"], a["x"].dtype
    gate = up_float64(x, a["w"], a["b"], idx)
    assert_near(ops.gather_up(x, a["w"], a["b"], idx), gate.clamp(min=0), dtype)
    gated = gate.clamp(min=0) * up_float64(x, a["w_up"], a["b_up"], idx)
    assert_near(ops.gather_gated_up(x, a["w"], a["b"], a["w_up"], a["b_up"], idx), gated, dtype)
    expected = down_float64(a["h"], a["w_t"], a["b_down"], idx)
    assert_near(ops.gather_down(a["h"], a["w_t"], a["b_down"], idx), expected, dtype)


@settings(max_examples=examples(40))
@given(mlp_inputs(), st.integers(1, 45))
def test_gather_down_partials_are_the_slices_of_the_sum(a, split_len):
    """Slice s of the partials is sum_{j in [s L, (s + 1) L)} h[:, j] (outer) w_t[idx[j]] in fp32, unrounded."""
    h, w_t, idx = a["h"], a["w_t"], a["idx"]
    parts = ops.gather_down_partials(h, w_t, idx, split_len)
    k = idx.shape[0]
    assert parts.dtype == torch.float32 and parts.shape == (math.ceil(k / split_len), h.shape[0], w_t.shape[1])
    zero = torch.zeros(w_t.shape[1], dtype=h.dtype)
    for s, part in enumerate(parts):
        cut = slice(s * split_len, (s + 1) * split_len)
        expected = down_float64(h[:, cut], w_t, zero, idx[cut])
        error = (part.double() - expected).abs()
        assert (error <= 1e-5 * (1 + expected.abs())).all(), f"slice {s}: max error {error.max().item():.3g}"


def route_scores_float64(x, w_in, w_out):
    """score[n] = sum over rows of relu(x_row . (W_out W_in)[n]), float64."""
    rows = x.reshape(-1, x.shape[-1]).double()
    scores = torch.zeros(w_out.shape[0], dtype=torch.float64)
    for row in rows:
        scores += (w_out.double() @ (w_in.double() @ row)).clamp(min=0)
    return scores


@st.composite
def route_inputs(draw):
    hidden, r, ffn = draw(st.integers(1, 24)), draw(st.integers(1, 8)), draw(st.integers(1, 40))
    lead = draw(st.sampled_from([(1,), (3,), (8,), (2, 1), (4, 1)]))
    k = draw(st.one_of(st.just(ffn), st.integers(1, ffn)))
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(*lead, hidden, generator=generator)
    w_in = torch.randn(r, hidden, generator=generator) / hidden**0.5
    w_out = torch.randn(ffn, r, generator=generator) / r**0.5
    return x.to(dtype), w_in.to(dtype), w_out.to(dtype), k


@settings(max_examples=examples(80))
@given(route_inputs())
def test_mlp_route_picks_float64_top_k_in_index_order(args):
    """k distinct neurons in ascending order, each scoring within a rounding margin of the float64 k-th best."""
    x, w_in, w_out, k = args
    picked = ops.mlp_route(x, w_in, w_out, k)
    assert picked.dtype == torch.int64 and picked.shape == (k,)
    assert (picked[1:] > picked[:-1]).all() and picked[0] >= 0 and picked[-1] < w_out.shape[0]
    scores = route_scores_float64(x, w_in, w_out)
    # the op rounds x @ w_in^T to x's dtype between its products: a relative error of up to ROUNDING[dtype] in each
    # term of the second product
    low = x.reshape(-1, x.shape[-1]).double() @ w_in.double().T
    margin = ROUNDING[x.dtype] * (low.abs() @ w_out.double().abs().T).sum(0).max() + 1e-6
    assert (scores[picked] >= scores.topk(k).values[-1] - margin).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_route_ties_go_to_the_lower_index_and_nan_ranks_last(dtype):
    # two rows with x = e0 and w_in = I: score[n] = 2 relu(w_out[n, 0]) exactly, in every dtype
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=dtype)
    w_in = torch.eye(2, dtype=dtype)
    w_out = torch.zeros(8, 2, dtype=dtype)
    w_out[:, 0] = torch.tensor([1.0, 2.0, 2.0, math.nan, 2.0, -0.0, 0.0, -1.0])  # scores 2 4 4 NaN 4 0 0 0
    expected = {1: [1], 3: [1, 2, 4], 4: [0, 1, 2, 4], 5: [0, 1, 2, 4, 5], 7: [0, 1, 2, 4, 5, 6, 7],
                8: list(range(8))}
    for k, want in expected.items():
        assert ops.mlp_route(x, w_in, w_out, k).tolist() == want, k
    # every score NaN (a NaN input), or every score 0 (no rows): the first k neurons
    assert ops.mlp_route(torch.full((1, 2), math.nan, dtype=dtype), w_in, w_out, 3).tolist() == [0, 1, 2]
    assert ops.mlp_route(x[:0], w_in, w_out, 3).tolist() == [0, 1, 2]


def small_args(dtype):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    idx = torch.tensor([5, 0, 3])
    return {
        "mlp_route": (randn(2, 1, 8), randn(4, 8), randn(10, 4), 3),
        "gather_up": (randn(3, 8), randn(10, 8), randn(10), idx),
        "gather_gated_up": (randn(3, 8), randn(10, 8), randn(10), randn(10, 8), randn(10), idx),
        "gather_down": (randn(3, 3), randn(10, 6), randn(6), idx),
        "gather_down_partials": (randn(3, 3), randn(10, 6), idx, 2),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["mlp_route", "gather_up", "gather_gated_up", "gather_down", "gather_down_partials"])
def test_opcheck(op, dtype):
    torch.library.opcheck(getattr(ops, op).default, small_args(dtype)[op])


NAMES = {
    "mlp_route": ("x", "w_in", "w_out", "k"),
    "gather_up": ("x", "w", "b", "idx"),
    "gather_gated_up": ("x", "w_gate", "b_gate", "w_up", "b_up", "idx"),
    "gather_down": ("h", "w_t", "b", "idx"),
    "gather_down_partials": ("h", "w_t", "idx", "split_len"),
}


def bad(op, **change):
    """``op`` and small_args of it (fp32) with the arguments named in ``change`` replaced."""
    args = dict(zip(NAMES[op], small_args(torch.float32)[op], strict=True)) | change
    return op, tuple(args.values())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (bad("mlp_route", w_in=torch.randn(4, 6)), r"w_in \[r, hidden\], got \(2, 1, 8\) and \(4, 6\)"),
        (bad("mlp_route", w_out=torch.randn(10, 5)), r"w_out \[ffn, r=4\], got \(10, 5\)"),
        (bad("mlp_route", w_out=torch.randn(10, 4).half()), r"w_out of x's dtype torch.float32, got torch.float16"),
        (bad("mlp_route", k=11), r"k must be in \[1, 10\] \(the number of neurons\), got 11"),
        (bad("mlp_route", k=0), r"k must be in \[1, 10\].*got 0"),
        (bad("gather_up", x=torch.randn(3, 1, 8)), r"gather_up: expected x \[N, d\], got \(3, 1, 8\)"),
        (bad("gather_up", x=torch.randn(3, 8).double()), r"x of dtype float16, bfloat16 or float32, got torch.float64"),
        (bad("gather_up", w=torch.randn(10, 7)), r"expected w \[ffn, d=8\], got \(10, 7\)"),
        (bad("gather_up", b=torch.randn(9)), r"expected b \[ffn=10\], got \(9,\)"),
        (bad("gather_up", b=torch.randn(10).bfloat16()), r"b of x's dtype torch.float32, got torch.bfloat16"),
        (bad("gather_up", idx=torch.tensor([1, 2], dtype=torch.int32)), r"idx int64 \[k\] with k >= 1, got \(2,\) torch.int32"),
        (bad("gather_up", idx=torch.tensor([[1, 2]])), r"idx int64 \[k\].*got \(1, 2\) torch.int64"),
        (bad("gather_up", idx=torch.tensor([], dtype=torch.int64)), r"idx int64 \[k\] with k >= 1, got \(0,\)"),
        (bad("gather_gated_up", w_up=torch.randn(9, 8)), r"expected b_up \[ffn=9\], got \(10,\)"),
        (bad("gather_gated_up", w_up=torch.randn(9, 8), b_up=torch.randn(9)), r"w_up of w_gate's shape \(10, 8\), got \(9, 8\)"),
        (bad("gather_gated_up", w_gate=torch.randn(10, 8).half()), r"w_gate of x's dtype torch.float32, got torch.float16"),
        (bad("gather_down", h=torch.randn(3, 4)), r"h \[N, k=3\] \(a column per index\), got \(3, 4\)"),
        (bad("gather_down", w_t=torch.randn(10)), r"w_t \[ffn, d_out\], got \(10,\)"),
        (bad("gather_down", b=torch.randn(5)), r"b \[d_out=6\], got \(5,\)"),
        (bad("gather_down", w_t=torch.randn(10, 6).bfloat16()), r"w_t of h's dtype torch.float32, got torch.bfloat16"),
        (bad("gather_down", idx=torch.tensor([0, 1, 2], dtype=torch.int32)), r"idx int64 \[k\].*torch.int32"),
        (bad("gather_down_partials", h=torch.randn(3, 4)), r"gather_down_partials: expected h \[N, k=3\]"),
        (bad("gather_down_partials", w_t=torch.randn(10, 6).half()), r"w_t of h's dtype torch.float32, got torch.float16"),
        (bad("gather_down_partials", split_len=0), r"split_len >= 1 \(selected neurons a slice\), got 0"),
    ],
)
def test_bad_inputs_name_expected_and_actual(call, message):
    op, args = call
    with pytest.raises(ValueError, match=message):
        getattr(ops, op)(*args)

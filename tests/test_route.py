"""polar::route (the head router) and its Triton kernel against float64 top-k written here.

The kernel runs in Triton's CPU interpreter without CUDA (tiny shapes). A correct pick is any set whose float64
scores are the top k up to a rounding margin, so near-ties do not make the test flaky while a wrong unit still fails.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import given, settings
from hypothesis import strategies as st

import polar_compile  # noqa: F401  (registers the ops)
from polar_compile.kernels.route import route_triton
from polar_compile.ops import route_reference
from tests.budget import examples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Score rounding allowed between the op and float64 (inputs are N(0, 1), hidden <= 300).
MARGIN = {torch.float32: 1e-4, torch.float16: 0.05, torch.bfloat16: 0.3}


def assert_top_k(picked: torch.Tensor, x, weight, bias, k: int, dtype: torch.dtype) -> None:
    """``picked [..., k]`` holds k distinct units, sorted by score, each within MARGIN of the float64 top k."""
    scores = (x.double() @ weight.double().T + bias.double()).reshape(-1, weight.shape[0])  # [N, units]
    picked = picked.reshape(-1, k).cpu()
    assert picked.dtype == torch.int64 and picked.shape == (scores.shape[0], k)
    assert ((picked >= 0) & (picked < weight.shape[0])).all()
    for row, chosen in zip(scores, picked, strict=True):
        assert len(set(chosen.tolist())) == k, chosen
        kth_best = row.topk(k).values[-1]
        got = row[chosen]
        assert (got >= kth_best - MARGIN[dtype]).all(), (got, kth_best)
        assert (got[:-1] >= got[1:] - MARGIN[dtype]).all(), got  # descending


@st.composite
def router_inputs(draw):
    lead = draw(st.sampled_from([(1,), (3,), (17,), (2, 1), (2, 5), (4, 1)]))
    hidden = draw(st.sampled_from([8, 48, 130, 300]))
    units = draw(st.integers(1, 40))
    k = draw(st.integers(1, units))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(*lead, hidden, generator=generator)
    weight = torch.randn(units, hidden, generator=generator) / hidden**0.5
    bias = torch.randn(units, generator=generator)
    return x.to(dtype), weight.to(dtype), bias.to(dtype), k


@settings(max_examples=examples(40))
@given(router_inputs())
def test_kernel_picks_float64_top_k(args):
    x, weight, bias, k = (a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    assert_top_k(route_triton(x, weight, bias, k), x.cpu(), weight.cpu(), bias.cpu(), k, x.dtype)


@settings(max_examples=examples(100))
@given(router_inputs())
def test_reference_picks_float64_top_k(args):
    x, weight, bias, k = args
    assert_top_k(route_reference(x, weight, bias, k), x, weight, bias, k, x.dtype)


@pytest.mark.parametrize("extra_units", [0, 34, 110])  # sorts 16, 64 and 128 wide
def test_ties_and_nan_rank_like_the_reference(extra_units):
    """Exact ties go to the lower index (a -0.0 bias ties a +0.0 one) and NaN scores rank with -inf, last, in the
    kernel as in the reference."""
    units = 9 + extra_units
    x = torch.ones(3, 4)
    weight = torch.zeros(units, 4)
    head = [1.0, 2.0, 2.0, float("nan"), 2.0, -1.0, -0.0, 0.0, float("-inf")]
    bias = torch.cat([torch.tensor(head), torch.full((extra_units,), -2.0)])
    x[2, 0] = float("nan")  # row 2: every score is NaN -> units in index order
    expected = route_reference(x, weight, bias, units)
    assert expected[0].tolist() == [1, 2, 4, 0, 6, 7, 5, *range(9, units), 3, 8]
    assert expected[2].tolist() == list(range(units))
    out = route_triton(x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), units).cpu()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = torch.randn(4, 1, 32, dtype=dtype)
    weight, bias = torch.randn(8, 32, dtype=dtype), torch.randn(8, dtype=dtype)
    torch.library.opcheck(torch.ops.polar.route.default, (x, weight, bias, 3))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.randn(2, 16), torch.randn(4, 8), torch.randn(4), 2), r"weight \[units, hidden\].*\(4, 8\)"),
        ((torch.randn(2, 16), torch.randn(4, 16), torch.randn(5), 2), r"bias \[units=4\], got \(5,\)"),
        ((torch.randn(2, 16), torch.randn(4, 16), torch.randn(4), 5), r"k must be in \[1, 4\].*got 5"),
        ((torch.randn(2, 16), torch.randn(4, 16), torch.randn(4), 0), r"k must be in \[1, 4\].*got 0"),
        ((torch.randn(2, 16), torch.randn(4, 16).half(), torch.randn(4), 2), r"one dtype.*float16"),
        ((torch.randn(2, 16).double(), torch.randn(4, 16).double(), torch.randn(4).double(), 2), r"float64"),
    ],
)
def test_bad_inputs_name_expected_and_actual(args, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.polar.route(*args)

"""The MLP router's Triton kernels (scores, then top-k in ascending index order) against float64 math and a
selection written here.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``). The
index output is poisoned before the select kernel writes it, so a slot it never writes fails.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polar_compile.kernels import dot_types
from polar_compile.kernels.mlp_route import _BLOCK_F, _scores_kernel, _select_kernel, mlp_route_triton
from tests.budget import examples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def top_k_ascending(scores: torch.Tensor, k: int) -> list[int]:
    """The k best neurons by (score desc, index asc), NaN lowest, as a sorted list: plain Python."""
    values = [float("-inf") if v != v else v for v in scores.tolist()]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(order[:k])


def scores_float64(x, w_in, w_out):
    low = (x.double() @ w_in.double().T).to(x.dtype).double()  # the rank-r activation in x's dtype, as cuBLAS
    return torch.relu(low @ w_out.double().T).sum(0)


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ffn=st.integers(1, 300), data=st.data(), ties=st.sampled_from(["none", "zeros", "few values", "nan"]))
def test_select_keeps_the_top_k_ascending_ties_to_the_lower_index(ffn, data, ties):
    k = data.draw(st.integers(1, ffn))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    scores = torch.rand(ffn, generator=generator) * 10
    if ties == "zeros":  # dead neurons: many exact zeros (and a -0.0)
        scores[torch.rand(ffn, generator=generator) < 0.6] = 0.0
        scores[0] = -0.0
    elif ties == "few values":
        scores = torch.randint(0, 3, (ffn,), generator=generator).float()
    elif ties == "nan":
        scores[torch.rand(ffn, generator=generator) < 0.3] = float("nan")
        scores[-1] = float("inf")
    idx = torch.full((k,), -7, dtype=torch.int64, device=DEVICE)
    block = max(16, 1 << (ffn - 1).bit_length())
    _select_kernel[(1,)](scores.to(DEVICE), idx, ffn, k, BLOCK=block)
    assert idx.cpu().tolist() == top_k_ascending(scores, k)


@settings(max_examples=examples(10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 20), hidden=st.sampled_from([16, 48]), rank=st.sampled_from([16, 80]),
       ffn=st.integers(1, 150), dtype=st.sampled_from(DTYPES), data=st.data())
def test_scores_and_route_match_float64(rows, hidden, rank, ffn, dtype, data):
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(rows, hidden, generator=generator).to(DEVICE, dtype)
    w_in = (torch.randn(rank, hidden, generator=generator) / hidden**0.5).to(DEVICE, dtype)
    w_out = (torch.randn(ffn, rank, generator=generator) / rank**0.5).to(DEVICE, dtype)
    expected = scores_float64(x.cpu(), w_in.cpu(), w_out.cpu())

    low = torch.nn.functional.linear(x, w_in)
    scores = torch.full((ffn,), float("nan"), device=DEVICE)
    dot_dtype, precision = dot_types(dtype, x.device)
    _scores_kernel[((ffn + _BLOCK_F - 1) // _BLOCK_F,)](
        low, w_out, scores, rows, ffn, rank, low.stride(0), low.stride(1), w_out.stride(0), w_out.stride(1),
        BLOCK_N=16, BLOCK_F=_BLOCK_F, BLOCK_R=64, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(scores.cpu().double(), expected, rtol=tolerance, atol=tolerance * rows)

    k = data.draw(st.integers(1, ffn))
    idx = mlp_route_triton(x, w_in, w_out, k).cpu()
    assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == k
    chosen = torch.zeros(ffn, dtype=torch.bool)
    chosen[idx] = True
    if k < ffn:  # a valid top-k of the float64 scores, up to the kernels' rounding
        assert expected[chosen].min() >= expected[~chosen].max() - 2 * tolerance * (1 + expected.abs().max())

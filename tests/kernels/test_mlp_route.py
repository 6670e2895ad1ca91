"""The MLP router's Triton kernels (scores and histogram; boundary bin and candidates; threshold and writes of the
top-k in ascending index order) against float64 math and a selection written here.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``). Index
outputs are poisoned before a launch, so a slot it never writes fails.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polar_compile.kernels.mlp_route import _CHUNK, LOW_SPLIT_ROWS, mlp_route_triton, top_k_ascending_triton
from tests.budget import examples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TIES = ["none", "zeros", "all zero", "few values", "nan and inf", "all nan", "huge range"]


def top_k_ascending(scores: torch.Tensor, k: int) -> list[int]:
    """The k best neurons by (score desc, index asc), NaN lowest, -0.0 == +0.0, as a sorted list: plain Python."""
    values = [float("-inf") if v != v else v + 0.0 for v in scores.tolist()]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(order[:k])


def scores_float64(x, w_in, w_out):
    low = (x.double() @ w_in.double().T).to(x.dtype).double()  # the rank-r activation in x's dtype, as cuBLAS
    return torch.relu(low @ w_out.double().T).sum(0)


def tied_scores(ffn: int, ties: str, generator: torch.Generator) -> torch.Tensor:
    scores = torch.rand(ffn, generator=generator) * 10
    if ties == "zeros":  # dead neurons: many exact zeros (and a -0.0)
        scores[torch.rand(ffn, generator=generator) < 0.6] = 0.0
        scores[0] = -0.0
    elif ties == "all zero":
        scores = torch.zeros(ffn)
        scores[::3] = -0.0
    elif ties == "few values":
        scores = torch.randint(0, 3, (ffn,), generator=generator).float()
    elif ties == "nan and inf":
        scores[torch.rand(ffn, generator=generator) < 0.3] = float("nan")
        scores[torch.rand(ffn, generator=generator) < 0.1] = float("inf")
    elif ties == "all nan":
        scores = torch.full((ffn,), float("nan"))
    elif ties == "huge range":  # beyond the histogram's binade window at both ends: its clamped first and last bins
        scores = torch.exp2(torch.randint(-140, 128, (ffn,), generator=generator).float()) * (1 + scores / 10)
    return scores


def select(scores: torch.Tensor, k: int, capacity: int, chunk: int = _CHUNK) -> list[int]:
    poisoned = torch.full((k + 64,), -7, dtype=torch.int64, device=DEVICE)  # a guard after the k slots
    top_k_ascending_triton(scores.to(DEVICE), k, out=poisoned[:k], capacity=capacity, chunk=chunk)
    assert (poisoned[k:] == -7).all(), "wrote past slot k - 1"
    return poisoned[:k].cpu().tolist()


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ffn=st.integers(1, 300), data=st.data(), ties=st.sampled_from(TIES), capacity=st.sampled_from([16, 2048]),
       chunk=st.sampled_from([16, 64, _CHUNK]))
def test_select_keeps_the_top_k_ascending_ties_to_the_lower_index(ffn, data, ties, capacity, chunk):
    """capacity 16 overflows the candidate buffer often: the search over the scores must agree. Chunks of 16 keys
    spread the selection over up to 19 programs."""
    k = data.draw(st.integers(1, ffn))
    scores = tied_scores(ffn, ties, torch.Generator().manual_seed(data.draw(st.integers(0, 2**16))))
    assert select(scores, k, capacity, chunk) == top_k_ascending(scores, k)


@pytest.mark.parametrize("ffn, k", [(1, 1), (2, 1), (2, 2), (_CHUNK + 1, 1), (2 * _CHUNK + 37, 900),
                                    (2 * _CHUNK + 37, 2 * _CHUNK + 37)])
@pytest.mark.parametrize("ties", ["none", "zeros", "few values", "nan and inf"])
def test_select_over_several_chunks_and_at_the_ends_of_k(ffn, k, ties):
    scores = tied_scores(ffn, ties, torch.Generator().manual_seed(ffn + k))
    expected = top_k_ascending(scores, k)
    assert select(scores, k, 2048) == expected
    assert select(scores, k, 16) == expected  # the candidate buffer overflows whenever the boundary bin has > 16
    assert select(scores, k, 2048, chunk=256) == expected  # up to 17 programs
    assert select(scores, k, 16, chunk=256) == expected


@pytest.mark.parametrize("ties, capacity", [("zeros", 4), ("few values", 4), ("few values", 256)])
def test_select_with_the_boundary_bin_spread_over_many_chunks(ties, capacity):
    """Equal keys of the boundary bin in every one of 12 chunks: the lowest indices among them are taken, each
    chunk starting its slots after the kept keys of all earlier chunks; capacity 4 overflows (the search over the
    scores), 256 holds the boundary bin (the search in registers)."""
    ffn = 12 * 16 - 3
    scores = tied_scores(ffn, ties, torch.Generator().manual_seed(7))
    for k in [1, 60, ffn - 1]:
        assert select(scores, k, capacity, chunk=16) == top_k_ascending(scores, k), k


@pytest.mark.parametrize("capacity", [2, 2048])
def test_select_finds_a_tied_threshold_among_close_keys_of_one_bin(capacity):
    """Keys one ulp apart share a histogram bin; the k-th largest is the top key (tied), the lowest, or between."""
    one = torch.tensor(1.0)
    up = torch.nextafter(one, torch.tensor(2.0))
    down = torch.nextafter(one, torch.tensor(0.0))
    scores = torch.stack([one, up, down, up, one, down, up]).repeat(2)
    for k in range(1, scores.shape[0] + 1):
        assert select(scores, k, capacity) == top_k_ascending(scores, k), k
        assert select(scores, k, capacity, chunk=4) == top_k_ascending(scores, k), k


def test_consecutive_calls_of_other_sizes():
    generator = torch.Generator().manual_seed(0)
    for ffn, k in [(5000, 700), (300, 299), (5000, 1), (64, 64)]:
        scores = tied_scores(ffn, "zeros", generator)
        assert select(scores, k, 2048) == top_k_ascending(scores, k)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's NaN dot
@pytest.mark.parametrize("ties", ["none", "zeros", "all zero", "few values", "nan and inf", "huge range"])
def test_route_selects_exactly_on_its_own_scores(ties):
    """One row, rank 1, fp32: score[n] = relu(w_out[n, 0]) exactly, so the fused kernel sees every tie pattern;
    its index output must be the plain selection applied to the scores it wrote, bit for bit."""
    ffn = 2 * _CHUNK + 5
    generator = torch.Generator().manual_seed(1)
    w_out = tied_scores(ffn, ties, generator)[:, None].to(DEVICE)
    x = torch.ones(1, 1, device=DEVICE)
    scores = torch.full((ffn,), -1.0, device=DEVICE)
    for k in [1, 300, ffn]:
        idx = mlp_route_triton(x, torch.ones(1, 1, device=DEVICE), w_out, k, scores=scores).cpu().tolist()
        assert idx == top_k_ascending(scores.cpu(), k), k


@settings(max_examples=examples(10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.sampled_from([1, 3, 20, 70]), hidden=st.sampled_from([16, 48, 200]), rank=st.sampled_from([16, 80]),
       ffn=st.integers(1, 150), dtype=st.sampled_from(DTYPES), data=st.data())
def test_scores_and_route_match_float64(rows, hidden, rank, ffn, dtype, data):
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(rows, hidden, generator=generator).to(DEVICE, dtype)
    w_in = (torch.randn(rank, hidden, generator=generator) / hidden**0.5).to(DEVICE, dtype)
    w_out = (torch.randn(ffn, rank, generator=generator) / rank**0.5).to(DEVICE, dtype)
    expected = scores_float64(x.cpu(), w_in.cpu(), w_out.cpu())

    k = data.draw(st.integers(1, ffn))
    scores = torch.full((ffn,), float("nan"), device=DEVICE)
    idx = mlp_route_triton(x, w_in, w_out, k, scores=scores).cpu()
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(scores.cpu().double(), expected, rtol=tolerance, atol=tolerance * rows)
    assert idx.tolist() == top_k_ascending(scores.cpu(), k)  # exact on the kernel's own scores
    chosen = torch.zeros(ffn, dtype=torch.bool)
    chosen[idx] = True
    if k < ffn:  # a valid top-k of the float64 scores, up to the kernel's rounding
        assert expected[chosen].min() >= expected[~chosen].max() - 2 * tolerance * (1 + expected.abs().max())


@pytest.mark.parametrize("rows", [1, 5, LOW_SPLIT_ROWS, LOW_SPLIT_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_hidden_low_rank_activation_matches_float64(rows, dtype):
    """hidden 1000 splits x @ w_in^T over four programs per rank block (five blocks of rank 80), the last to arrive
    summing the partials; x is a strided view. Above LOW_SPLIT_ROWS rows cuBLAS (here the CPU's GEMM) takes over:
    both paths must give the float64 scores, and the top-k of the scores they wrote."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 2000, generator=generator).to(DEVICE, dtype)[:, ::2]
    w_in = (torch.randn(80, 1000, generator=generator) / 1000**0.5).to(DEVICE, dtype)
    w_out = (torch.randn(300, 80, generator=generator) / 80**0.5).to(DEVICE, dtype)
    scores = torch.full((300,), float("nan"), device=DEVICE)
    idx = mlp_route_triton(x, w_in, w_out, 37, scores=scores).cpu()
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    expected = scores_float64(x.cpu(), w_in.cpu(), w_out.cpu())
    torch.testing.assert_close(scores.cpu().double(), expected, rtol=tolerance, atol=tolerance * rows)
    assert idx.tolist() == top_k_ascending(scores.cpu(), 37)

"""The Triton gather-GEMMs of the sparse MLP against float64 math written here.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``),
so shapes stay tiny. Every call writes into an output poisoned with NaN, so an element the kernels never write
fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polar_compile.kernels.gather_gemm import (
    MAX_SPLITS,
    GatherConfig,
    gather_down_config,
    gather_down_partials_triton,
    gather_down_split_len,
    gather_down_triton,
    gather_up_config,
    gather_up_triton,
)
from tests.budget import examples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# |kernel - float64| <= TOL * (1 + |float64|): fp32 accumulation (fp16 products on the GPU), one output rounding
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def up_float64(x, w, b, idx):
    """[N, k]: column j is x . w[idx[j]] + b[idx[j]], float64."""
    x, w, b = x.cpu().double(), w.cpu().double(), b.cpu().double()
    return torch.stack([x @ w[i] + b[i] for i in idx.tolist()], dim=1)


def down_float64(h, w_t, b, idx):
    """[N, d_out]: sum_j h[:, j] (outer) w_t[idx[j]] + b, float64."""
    h, w_t = h.cpu().double(), w_t.cpu().double()
    out = b.cpu().double().expand(h.shape[0], -1).clone()
    for j, i in enumerate(idx.tolist()):
        out += h[:, j : j + 1] * w_t[i][None, :]
    return out


def check(result, out, expected, dtype):
    assert result.data_ptr() == out.data_ptr() and result.dtype == dtype
    got = result.cpu().double()
    assert not got.isnan().any(), "an output element was never written (or is NaN)"
    error = (got - expected).abs()
    assert (error <= TOL[dtype] * (1 + expected.abs())).all(), f"max error {error.max().item():.3g}"


def make(shape, dtype, generator, scale=1.0, strided=False):
    """N(0, scale^2) values of ``shape``; ``strided``: a view with padded rows (as a slice of a larger buffer)."""
    if strided:
        base = torch.randn(shape[0], shape[1] + 5, generator=generator) * scale
        return base[:, 2 : shape[1] + 2].to(dtype).to(DEVICE)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(DEVICE)


def random_idx(ffn, k, generator, order):
    """k distinct neurons: sorted (what mlp_route gives), or in random order."""
    idx = torch.randperm(ffn, generator=generator)[:k]
    return (idx.sort().values if order == "sorted" else idx).to(DEVICE)


CONFIGS = st.builds(
    GatherConfig,
    block_n=st.sampled_from([1, 2, 4, 16, 32]),  # < 16: the multiply-add path, >= 16: tl.dot
    block_c=st.sampled_from([4, 16, 32]),
    block_r=st.sampled_from([16, 32, 64]),
    splits=st.integers(1, 4),
    num_warps=st.just(4),
    num_stages=st.sampled_from([1, 2]),
)
SHAPES = dict(
    rows=st.sampled_from([1, 2, 5, 16, 17, 40]),
    ffn=st.integers(1, 60),
    density=st.floats(0.01, 1.0),
    dtype=st.sampled_from(DTYPES),
    order=st.sampled_from(["sorted", "random"]),
    strided=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=examples(60), deadline=None, suppress_health_check=list(HealthCheck))
@given(d=st.integers(1, 80), gated=st.booleans(), config=st.one_of(st.none(), CONFIGS), **SHAPES)
def test_gather_up_matches_float64(rows, d, ffn, density, dtype, order, strided, seed, gated, config):
    generator = torch.Generator().manual_seed(seed)
    k = max(1, round(density * ffn))
    x = make((rows, d), dtype, generator, strided=strided)
    w, w_up = (make((ffn, d), dtype, generator, scale=d**-0.5, strided=strided) for _ in range(2))
    b, b_up = make((ffn,), dtype, generator), make((ffn,), dtype, generator)
    idx = random_idx(ffn, k, generator, order)
    out = torch.full((rows, k), math.nan, dtype=dtype, device=DEVICE)
    if gated:
        result = gather_up_triton(x, w, b, idx, w_up, b_up, config=config, out=out)
        expected = up_float64(x, w, b, idx).clamp(min=0) * up_float64(x, w_up, b_up, idx)
    else:
        result = gather_up_triton(x, w, b, idx, config=config, out=out)
        expected = up_float64(x, w, b, idx).clamp(min=0)
    check(result, out, expected, dtype)


@settings(max_examples=examples(60), deadline=None, suppress_health_check=list(HealthCheck))
@given(d_out=st.integers(1, 80), config=st.one_of(st.none(), CONFIGS), **SHAPES)
def test_gather_down_matches_float64(rows, d_out, ffn, density, dtype, order, strided, seed, config):
    generator = torch.Generator().manual_seed(seed)
    k = max(1, round(density * ffn))
    h = make((rows, k), dtype, generator, strided=strided).relu()
    w_t = make((ffn, d_out), dtype, generator, scale=k**-0.5, strided=strided)
    b = make((d_out,), dtype, generator)
    idx = random_idx(ffn, k, generator, order)
    out = torch.full((rows, d_out), math.nan, dtype=dtype, device=DEVICE)
    check(gather_down_triton(h, w_t, b, idx, config=config, out=out), out, down_float64(h, w_t, b, idx), dtype)


@settings(max_examples=examples(40), deadline=None, suppress_health_check=list(HealthCheck))
@given(d_out=st.integers(1, 80), split_len=st.integers(1, 70), config=st.one_of(st.none(), CONFIGS), **SHAPES)
def test_gather_down_partials_match_float64(rows, d_out, ffn, density, dtype, order, strided, seed, split_len, config):
    """Each slice of split_len selected neurons: its own fp32 partial product (no bias), every element written."""
    generator = torch.Generator().manual_seed(seed)
    k = max(1, round(density * ffn))
    h = make((rows, k), dtype, generator, strided=strided).relu()
    w_t = make((ffn, d_out), dtype, generator, scale=k**-0.5, strided=strided)
    idx = random_idx(ffn, k, generator, order)
    slices = math.ceil(k / split_len)
    out = torch.full((slices, rows, d_out), math.nan, device=DEVICE)
    result = gather_down_partials_triton(h, w_t, idx, split_len, config=config, out=out)
    assert result.data_ptr() == out.data_ptr() and not result.isnan().any(), "an element was never written"
    zero = torch.zeros(d_out)
    for s in range(slices):
        cut = slice(s * split_len, (s + 1) * split_len)
        expected = down_float64(h[:, cut], w_t, zero, idx[cut])
        error = (result[s].cpu().double() - expected).abs()
        assert (error <= TOL[torch.float32] * 4 * (1 + expected.abs())).all(), f"slice {s}: {error.max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_configs_split_and_finish(dtype):
    """Shapes where the launch heuristic splits the reduction (few tiles for 132 SMs): partials + _finish_kernel."""
    generator = torch.Generator().manual_seed(3)
    rows, d, ffn, k, d_out = 3, 600, 70, 40, 50
    up_config = gather_up_config(rows, d, k, True, dtype, torch.device(DEVICE))
    down_config = gather_down_config(rows, 300, d_out, dtype, torch.device(DEVICE))
    assert up_config.splits > 1 and down_config.splits > 1
    x = make((rows, d), dtype, generator)
    w, w_up = (make((ffn, d), dtype, generator, scale=d**-0.5) for _ in range(2))
    b, b_up = make((ffn,), dtype, generator), make((ffn,), dtype, generator)
    idx = random_idx(ffn, k, generator, "random")
    out = torch.full((rows, k), math.nan, dtype=dtype, device=DEVICE)
    expected = up_float64(x, w, b, idx).clamp(min=0) * up_float64(x, w_up, b_up, idx)
    check(gather_up_triton(x, w, b, idx, w_up, b_up, out=out), out, expected, dtype)

    h = make((rows, 300), dtype, generator).relu()
    w_t = make((400, d_out), dtype, generator, scale=300**-0.5)
    b_down = make((d_out,), dtype, generator)
    idx = random_idx(400, 300, generator, "sorted")
    out = torch.full((rows, d_out), math.nan, dtype=dtype, device=DEVICE)
    check(gather_down_triton(h, w_t, b_down, idx, out=out), out, down_float64(h, w_t, b_down, idx), dtype)
    # the backend's form: the same split's partials, summed in split order + bias, equal gather_down's finish
    split_len = gather_down_split_len(rows, 300, d_out, dtype, torch.device(DEVICE))
    parts = gather_down_partials_triton(h, w_t, idx, split_len)
    assert parts.shape[0] == down_config.splits
    # bitwise, but for the interpreter's fp32 -> bf16 conversion, which truncates where torch rounds to nearest
    ulps = 2**-7 if DEVICE == "cpu" and dtype == torch.bfloat16 else 0
    torch.testing.assert_close(sum(parts.unbind(0)[1:], parts[0]).add(b_down.float()).to(dtype), out, atol=0, rtol=ulps)


def test_default_config_for_a_batch_in_two_row_blocks():
    """64 rows over few neurons and a narrow d_out, where the partials' cap would bound the splits: the heuristic
    runs two 32-row blocks (each writes only its own rows) and still splits k; against float64, output poisoned."""
    generator = torch.Generator().manual_seed(6)
    rows, k, ffn, d_out, dtype = 64, 1024, 1100, 64, torch.bfloat16
    config = gather_down_config(rows, k, d_out, dtype, torch.device(DEVICE))
    assert config.block_n == 32 and config.splits > 1
    h = make((rows, k), dtype, generator).relu()
    w_t = make((ffn, d_out), dtype, generator, scale=k**-0.5)
    b = make((d_out,), dtype, generator)
    idx = random_idx(ffn, k, generator, "sorted")
    out = torch.full((rows, d_out), math.nan, dtype=dtype, device=DEVICE)
    check(gather_down_triton(h, w_t, b, idx, out=out), out, down_float64(h, w_t, b, idx), dtype)


@pytest.mark.parametrize("gated", [False, True])
def test_default_config_for_one_row(gated):
    """B=1 with enough neurons for the heuristic's one-row path (fp32 multiply-adds, no split) against float64."""
    generator = torch.Generator().manual_seed(4)
    d, ffn, k, dtype = 40, 1200, 1100, torch.bfloat16
    assert gather_up_config(1, d, k, gated, dtype, torch.device(DEVICE)).block_n == 1
    x = make((1, d), dtype, generator)
    w, w_up = (make((ffn, d), dtype, generator, scale=d**-0.5) for _ in range(2))
    b, b_up = make((ffn,), dtype, generator), make((ffn,), dtype, generator)
    idx = random_idx(ffn, k, generator, "random")
    out = torch.full((1, k), math.nan, dtype=dtype, device=DEVICE)
    expected = up_float64(x, w, b, idx).clamp(min=0)
    if gated:
        check(gather_up_triton(x, w, b, idx, w_up, b_up, out=out), out, expected * up_float64(x, w_up, b_up, idx),
              dtype)
    else:
        check(gather_up_triton(x, w, b, idx, out=out), out, expected, dtype)


def test_split_count_does_not_change_the_result():
    """Splits cover the reduction exactly once: 1..5 splits agree (incl. more splits than chunks)."""
    generator = torch.Generator().manual_seed(5)
    x, w, b = make((4, 90), torch.float32, generator), make((30, 90), torch.float32, generator), make((30,), torch.float32, generator)
    idx = random_idx(30, 20, generator, "random")
    ups = [gather_up_triton(x, w, b, idx, config=GatherConfig(16, 16, 16, s)) for s in (1, 2, 5, 9)]
    downs = [gather_down_triton(ups[0], w, x[0], idx, config=GatherConfig(16, 16, 16, s)) for s in (1, 2, 5)]
    for results in (ups, downs):
        for other in results[1:]:
            torch.testing.assert_close(other, results[0], atol=1e-5, rtol=1e-5)


def test_out_of_range_indices_read_zeros():
    """Indices outside [0, ffn) gather zero weights and bias (never memory out of bounds)."""
    x, w, b = torch.ones(2, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE), torch.ones(4, device=DEVICE)
    idx = torch.tensor([1, 4, -1, 1000], device=DEVICE)
    assert gather_up_triton(x, w, b, idx).tolist() == [[9.0, 0.0, 0.0, 0.0]] * 2
    assert gather_up_triton(x, w, b, idx, w, -b).tolist() == [[63.0, 0.0, 0.0, 0.0]] * 2
    h = torch.ones(2, 4, device=DEVICE)
    assert gather_down_triton(h, w, torch.ones(8, device=DEVICE), idx).tolist() == [[2.0] * 8] * 2


@pytest.mark.parametrize(("d", "ffn"), [(4096, 16384), (9216, 36864)])  # OPT-6.7B, OPT-66B
def test_heuristic_configs_for_model_shapes(d, ffn):
    """Static, sane configs: a decode batch of up to 64 rows is one row block (weights read once), tl.dot tiles
    >= 16 (gather_up at B=1: one row, no split, whole chunks of d), splits in [1, MAX_SPLITS] only where tiles are
    fewer than 2 per SM, fp32 partials <= 1/2 of the weight bytes."""
    cpu = torch.device("cpu")  # 132 SMs off the GPU, an H200's count
    for rows in (1, 8, 16, 32, 64, 128):
        for density in (0.1, 0.25, 0.5, 1.0):
            k = round(density * ffn)
            for up, config, cols, weight_bytes in (
                (True, gather_up_config(rows, d, k, False, torch.bfloat16, cpu), k, 2 * k * d),
                (True, gather_up_config(rows, d, k, True, torch.bfloat16, cpu), k, 4 * k * d),
                (False, gather_down_config(rows, k, d, torch.bfloat16, cpu), d, 2 * k * d),
            ):
                # gather_up splits over 64 rows into blocks of 64 when 128-row tiles would be too few, gather_down
                # 64 rows into blocks of 32 when its partials' cap would bound the splits
                assert config.block_n >= rows or (config.splits > 1 and (config.block_n, rows) in (
                    ((64, 128),) if up else ((32, 64),)))
                if config.block_n == 1:  # gather_up's multiply-add path at B=1
                    assert cols == k and config.splits == 1 and d % config.block_r == 0
                    assert 2 * 132 <= math.ceil(k / config.block_c) <= 65535
                else:
                    assert min(config.block_n, config.block_c, config.block_r) >= 16
                assert 1 <= config.splits <= MAX_SPLITS
                tiles = math.ceil(cols / config.block_c)
                assert config.splits == 1 or tiles < 2 * 132
                assert config.splits == 1 or 8 * config.splits * rows * cols <= weight_bytes
    assert gather_up_config(1, d, round(0.1 * ffn), False, torch.bfloat16, cpu).block_n == 1
    assert gather_up_config(2, d, round(0.1 * ffn), False, torch.bfloat16, cpu).splits > 1
    assert gather_up_config(1, d, 256, False, torch.bfloat16, cpu).splits > 1  # too few neurons: split tl.dot tiles
    assert gather_up_config(128, d, ffn, False, torch.bfloat16, cpu).splits == 1
    assert gather_down_config(64, ffn, d, torch.bfloat16, cpu).block_n == 64  # many neurons: no cap, one block

"""The fused single-launch sparse MLP (kernels/gather_mlp.py) against float64 math written here.

Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``), which
runs the programs one after another: the last-arrival finishing then always falls to the last program, so these
tests check the arithmetic, the masking and that the workspace is left zero, not the GPU's memory ordering (the
CUDA benchmark, benchmarks/mlp.py --fused, checks its results against dense math on the GPU). Every call writes
into an output poisoned with NaN, and every test calls the kernel twice with different inputs: a workspace left
dirty by the first call would spoil the second.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polar_compile.kernels.gather_gemm import gather_down_triton, gather_up_triton
from polar_compile.kernels.gather_mlp import (
    FUSED_MAX_ROWS,
    GatherMlpConfig,
    _workspace,
    cached_workspace,
    gather_mlp_config,
    gather_mlp_triton,
)
from tests.budget import examples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# |kernel - float64| <= TOL * (1 + |float64|): fp32 accumulation (fp16 products on the GPU), h and the output
# rounded to the dtype
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.4e-2}


def mlp_float64(x, w, b, w_t, b_down, idx, w_up=None, b_up=None):
    """[N, d_out]: h[:, j] = relu(x . w[idx[j]] + b[idx[j]]) (times x . w_up[idx[j]] + b_up[idx[j]]) rounded to
    x's dtype, out = sum_j h[:, j] (outer) w_t[idx[j]] + b_down; float64, neurons outside [0, ffn) weigh zero."""
    x64 = x.cpu().double()
    out = b_down.cpu().double().expand(x.shape[0], -1).clone()
    for i in idx.tolist():
        if not 0 <= i < w.shape[0]:
            continue
        h = (x64 @ w[i].cpu().double() + b[i].cpu().double()).clamp(min=0)
        if w_up is not None:
            h = h * (x64 @ w_up[i].cpu().double() + b_up[i].cpu().double())
        out += h.to(x.dtype).double()[:, None] * w_t[i].cpu().double()[None, :]
    return out


def check(result, out, expected, dtype):
    assert result.data_ptr() == out.data_ptr() and result.dtype == dtype
    got = result.cpu().double()
    assert not got.isnan().any(), "an output element was never written (or is NaN)"
    error = (got - expected).abs()
    assert (error <= TOL[dtype] * (1 + expected.abs())).all(), f"max error {error.max().item():.3g}"


def assert_workspace_clean(d_out):
    ws, count = cached_workspace(DEVICE, d_out)
    assert (ws == 0).all() and (count == 0).all(), "the call left its workspace dirty"


def make(shape, dtype, generator, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(DEVICE)


def mlp_args(rows, d, d_out, ffn, k, dtype, gated, generator, sort=True):
    """x, w, b, w_t, b_down, idx (k distinct neurons, sorted or random order), then w_up, b_up if gated."""
    idx = torch.randperm(ffn, generator=generator)[:k]
    args = [make((rows, d), dtype, generator), make((ffn, d), dtype, generator, scale=d**-0.5),
            make((ffn,), dtype, generator), make((ffn, d_out), dtype, generator, scale=k**-0.5),
            make((d_out,), dtype, generator), (idx.sort().values if sort else idx).to(DEVICE)]
    if gated:
        args += [make((ffn, d), dtype, generator, scale=d**-0.5), make((ffn,), dtype, generator)]
    return args


def run_checked(args, dtype, config=None):
    out = torch.full((args[0].shape[0], args[3].shape[1]), math.nan, dtype=dtype, device=DEVICE)
    check(gather_mlp_triton(*args, config=config, out=out), out, mlp_float64(*args), dtype)
    assert_workspace_clean(args[3].shape[1])


@st.composite
def configs(draw):
    block_d = draw(st.sampled_from([16, 32]))
    return GatherMlpConfig(
        block_n=draw(st.sampled_from([16, 32])), block_j=16, block_r=draw(st.sampled_from([16, 32, 64])),
        block_d=block_d, group_d=block_d * draw(st.sampled_from([1, 2, 3])), num_warps=4, num_stages=1,
    )


@settings(max_examples=examples(40), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    rows=st.integers(1, 20), d=st.integers(1, 72), d_out=st.integers(1, 80), ffn=st.integers(1, 60),
    k_choice=st.sampled_from(["one", "all", "any"]), k_any=st.integers(1, 60), gated=st.booleans(),
    dtype=st.sampled_from(DTYPES), sort=st.booleans(), config=st.one_of(st.none(), configs()),
    seed=st.integers(0, 2**31 - 1),
)
def test_gather_mlp_matches_float64_twice(rows, d, d_out, ffn, k_choice, k_any, gated, dtype, sort, config, seed):
    k = {"one": 1, "all": ffn, "any": min(k_any, ffn)}[k_choice]
    if config is not None and config.block_n < rows:
        config = config._replace(block_n=32)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(2):  # fresh inputs, the same workspace: the second call sees what the first left
        run_checked(mlp_args(rows, d, d_out, ffn, k, dtype, gated, generator, sort), dtype, config)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("config", [None, GatherMlpConfig(16, 16, 32, 32, 64)])
def test_fused_agrees_with_the_two_op_kernels(gated, config):
    """fp32: the fused result is gather_down(gather_up(...)) up to fp32 summation order (k = 70: 5 programs of 16
    neurons; d_out = 300: one group by default, 5 groups of 64 columns (the last one short) otherwise)."""
    generator = torch.Generator().manual_seed(1)
    x, w, b, w_t, b_down, idx, *up = mlp_args(5, 96, 300, 90, 70, torch.float32, gated, generator)
    fused = gather_mlp_triton(x, w, b, w_t, b_down, idx, *up, config=config)
    two_op = gather_down_triton(gather_up_triton(x, w, b, idx, *up), w_t, b_down, idx)
    torch.testing.assert_close(fused, two_op, atol=2e-5, rtol=2e-5)
    assert_workspace_clean(300)


@pytest.mark.parametrize("rows", [1, 33, FUSED_MAX_ROWS])
def test_rows_up_to_the_fused_limit(rows):
    generator = torch.Generator().manual_seed(rows)
    for dtype in (torch.bfloat16, torch.float32):
        run_checked(mlp_args(rows, 24, 40, 30, 17, dtype, False, generator), dtype)


def test_out_of_range_indices_read_zeros():
    """Indices outside [0, ffn) gather zero weights and bias (never memory out of bounds)."""
    x, w, b = torch.ones(2, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE), torch.ones(4, device=DEVICE)
    w_t, b_down = torch.ones(4, 3, device=DEVICE), torch.full((3,), 0.5, device=DEVICE)
    idx = torch.tensor([1, 4, -1, 1000], device=DEVICE)
    assert gather_mlp_triton(x, w, b, w_t, b_down, idx).tolist() == [[9.5] * 3] * 2
    assert gather_mlp_triton(x, w, b, w_t, b_down, idx, w, -b).tolist() == [[63.5] * 3] * 2
    assert_workspace_clean(3)


def test_workspace_is_cached_per_device_and_width_and_fresh_while_tracing():
    generator = torch.Generator().manual_seed(2)
    args = mlp_args(3, 16, 37, 20, 9, torch.float32, False, generator)
    gather_mlp_triton(*args)
    ws, count = cached_workspace(DEVICE, 37)
    assert ws.shape == (FUSED_MAX_ROWS, 37) and ws.dtype == torch.float32 and count.dtype == torch.int32
    gather_mlp_triton(*mlp_args(3, 16, 37, 20, 9, torch.float32, False, generator))
    assert cached_workspace(DEVICE, 37)[0] is ws  # reused, not reallocated
    assert_workspace_clean(37)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake_ws, _ = _workspace(torch.empty(3, 16, device=DEVICE), 37)
    assert fake_ws is not ws and cached_workspace(DEVICE, 37)[0] is ws


@pytest.mark.parametrize(("d", "ffn"), [(4096, 16384), (9216, 36864)])  # OPT-6.7B, OPT-66B
def test_heuristic_configs_for_model_shapes(d, ffn):
    """Static, sane configs: one row block, tl.dot tiles >= 16, whole down tiles per group, <= 4 groups a row at
    N = 1 (one counter round trip a program for d_out <= 4096)."""
    cpu = torch.device("cpu")
    for rows in (1, 2, 8, 16, 32, 64):
        for density in (0.1, 0.5, 1.0):
            config = gather_mlp_config(rows, d, d, round(density * ffn), False, torch.bfloat16, cpu)
            assert config.block_n >= rows and min(config.block_n, config.block_j, config.block_r) >= 16
            assert config.group_d % config.block_d == 0 and math.ceil(d / config.group_d) <= max(4, rows)
    assert math.ceil(4096 / gather_mlp_config(1, 4096, 4096, 1638, False, torch.bfloat16, cpu).group_d) == 1

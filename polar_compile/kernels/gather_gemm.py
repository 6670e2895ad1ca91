"""Gather-GEMMs of the sparse MLP: its first layer for the selected neurons only, its second over them only.

With idx [k] the neurons selected for the whole batch (N tokens, one decode step), in fp32:

    gather_up:        out[n, j] = relu(x[n] . w[idx[j]] + b[idx[j]])                                     [N, k]
    gather_gated_up:  out[n, j] = relu(x[n] . w_gate[idx[j]] + b_gate[idx[j]]) * (x[n] . w_up[idx[j]] + b_up[idx[j]])
    gather_down:      out[n, c] = sum_j h[n, j] * w_t[idx[j], c] + b[c]                                  [N, d_out]

At decode N is small (1..128), so both are memory-bound: the time is reading the k selected rows of each weight (a
row of w is one neuron's input weights, a row of w_t, the transposed down weight, its output weights; both are
contiguous). Algorithm:

1. ``_gather_up_kernel``, grid (row blocks, column blocks, splits). Program (m, c, s) owns BLOCK_N rows of x (a
   whole decode batch when BLOCK_N >= N, so each weight row is read once in all) and the BLOCK_C neurons
   idx[c*BLOCK_C : (c+1)*BLOCK_C]. It streams the s-th slice of d in BLOCK_R chunks, gathering those neurons' rows
   of w (and of w_up, same indices):  acc += x[:, chunk] @ w[neurons, chunk]^T  (tl.dot, rows past N are zeros;
   row blocks under 16 rows multiply-add in fp32 instead, which the heuristic picks for B=1: a few neurons a
   program over the whole of d, no split).
2. ``_gather_down_kernel``, grid (row blocks, column blocks, splits). Program (m, c, s) owns BLOCK_N rows of h and
   BLOCK_C output columns. It streams the s-th slice of the k selected neurons in BLOCK_R chunks, gathering rows
   idx[j] of w_t over its columns (contiguous, so coalesced):  acc += h[:, chunk] @ w_t[idx[chunk], columns].
3. With one split a program finishes its own tile: bias (gathered through idx for up), ReLU (times up for gated),
   cast, store. With several (too few tiles to keep the SMs streaming: small k, narrow d_out) each program stores
   its fp32 partial tile and ``_finish_kernel``, grid (row blocks, column blocks), sums the splits in split order
   (the same bits every run) and finishes. ``gather_down_partials_triton`` stops before that launch: the polar
   backend sums the partials in graph ops that Inductor fuses into the MLP output's consumer (``passes/finish.py``).

Every output element is written by exactly one program. Indices must be in [0, ffn): others read zero weights
and bias instead of memory out of bounds. Grid and workspace depend on shapes only: no host sync, CUDA-graph
safe. Kernels launch through ``wrap_triton`` so the ``polar::`` triton_ops are traceable by Inductor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import dot_types, num_sms

__all__ = [
    "GatherConfig",
    "gather_down_config",
    "gather_down_partials_triton",
    "gather_down_split_len",
    "gather_down_triton",
    "gather_up_config",
    "gather_up_triton",
    "split_length",
]


@triton.jit
def _row_times_rows(a, b, acc, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b for a [BLOCK_N, R], b [R, C]: tl.dot for row blocks of >= 16 (the tensor-core tile), fp32
    multiply-adds for fewer rows, so no program pads its rows to 16."""
    if a.shape[0] >= 16:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    return acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _row_times_cols(a, b, acc, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b^T for a [BLOCK_N, R], b [C, R] (as ``_row_times_rows``)."""
    if a.shape[0] >= 16:
        return tl.dot(a.to(DOT_DTYPE), tl.trans(b.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    return acc + tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _up_epilogue(gate, up, B_GATE, B_UP, neurons, neuron_ok, stride_bg, stride_bu, GATED: tl.constexpr):
    """relu(gate + b_gate[neurons]), times (up + b_up[neurons]) if GATED; [BLOCK_N, BLOCK_C] fp32. NaN stays NaN
    (as in torch.relu)."""
    gate += tl.load(B_GATE + neurons * stride_bg, mask=neuron_ok, other=0.0).to(tl.float32)[None, :]
    out = tl.where(gate < 0, 0.0, gate)
    if GATED:
        up += tl.load(B_UP + neurons * stride_bu, mask=neuron_ok, other=0.0).to(tl.float32)[None, :]
        out = out * up
    return out


@triton.jit
def _gather_up_kernel(
    X, W_GATE, B_GATE, W_UP, B_UP, IDX, OUT, PART,
    rows, d, ffn, k, split_len,
    stride_xn, stride_xd,
    stride_wgf, stride_wgd, stride_bg,
    stride_wuf, stride_wud, stride_bu,
    stride_idx, stride_on, stride_oc, stride_ps, stride_pp, stride_pn,
    GATED: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # X: [N, d]   W_GATE, W_UP: [ffn, d]   B_GATE, B_UP: [ffn]   IDX: [k] int64   OUT: [N, k]
    # PART: [SPLITS, 2 if GATED else 1, N, k] fp32 (SPLITS > 1 only)   (W_UP, B_UP unused unless GATED)
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of x
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # slots j of idx: output columns
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_n < rows
    col_ok = offs_c < k
    neurons = tl.load(IDX + offs_c * stride_idx, mask=col_ok, other=0)  # [BLOCK_C] int64
    neuron_ok = col_ok & (neurons >= 0) & (neurons < ffn)
    start = split * split_len
    stop = tl.minimum(start + split_len, d)

    gate = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for r0 in range(start, stop, BLOCK_R):
        r = r0 + offs_r  # [BLOCK_R] input features
        r_ok = r < stop
        x = tl.load(X + offs_n[:, None] * stride_xn + r[None, :] * stride_xd,
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        w_ok = neuron_ok[:, None] & r_ok[None, :]
        w = tl.load(W_GATE + neurons[:, None] * stride_wgf + r[None, :] * stride_wgd,
                    mask=w_ok, other=0.0)  # [BLOCK_C, BLOCK_R]: the neurons' rows, contiguous along d
        gate = _row_times_cols(x, w, gate, DOT_DTYPE, DOT_PRECISION)
        if GATED:
            w = tl.load(W_UP + neurons[:, None] * stride_wuf + r[None, :] * stride_wud, mask=w_ok, other=0.0)
            up = _row_times_cols(x, w, up, DOT_DTYPE, DOT_PRECISION)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    if SPLITS == 1:
        out = _up_epilogue(gate, up, B_GATE, B_UP, neurons, neuron_ok, stride_bg, stride_bu, GATED)
        o_ptrs = OUT + offs_n[:, None] * stride_on + offs_c[None, :] * stride_oc
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=tile_ok)
    else:
        p_ptrs = PART + split * stride_ps + offs_n[:, None] * stride_pn + offs_c[None, :]
        tl.store(p_ptrs, gate, mask=tile_ok)
        if GATED:
            tl.store(p_ptrs + stride_pp, up, mask=tile_ok)


@triton.jit
def _gather_down_kernel(
    H, W_T, BIAS, IDX, OUT, PART,
    rows, k, ffn, d_out, split_len,
    stride_hn, stride_hk, stride_wf, stride_wc, stride_b,
    stride_idx, stride_on, stride_oc, stride_ps, stride_pn,
    FINISH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # H: [N, k]   W_T: [ffn, d_out]   BIAS: [d_out]   IDX: [k] int64   OUT: [N, d_out] (FINISH only)
    # PART: [splits, 1, N, d_out] fp32 (unless FINISH: one split, which adds the bias and stores OUT)
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of h
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # output features
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_n < rows
    col_ok = offs_c < d_out
    start = split * split_len
    stop = tl.minimum(start + split_len, k)

    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for r0 in range(start, stop, BLOCK_R):
        j = r0 + offs_r  # [BLOCK_R] slots of idx: columns of h
        j_ok = j < stop
        neurons = tl.load(IDX + j * stride_idx, mask=j_ok, other=0)  # [BLOCK_R] int64
        neuron_ok = j_ok & (neurons >= 0) & (neurons < ffn)
        h = tl.load(H + offs_n[:, None] * stride_hn + j[None, :] * stride_hk,
                    mask=row_ok[:, None] & j_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        w = tl.load(W_T + neurons[:, None] * stride_wf + offs_c[None, :] * stride_wc,
                    mask=neuron_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_C]: rows of w_t
        acc = _row_times_rows(h, w, acc, DOT_DTYPE, DOT_PRECISION)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    if FINISH:
        acc += tl.load(BIAS + offs_c * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        o_ptrs = OUT + offs_n[:, None] * stride_on + offs_c[None, :] * stride_oc
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(PART + split * stride_ps + offs_n[:, None] * stride_pn + offs_c[None, :], acc, mask=tile_ok)


@triton.jit
def _finish_kernel(
    PART, IDX, BIAS, BIAS_UP, OUT,
    rows, cols, ffn,
    stride_idx, stride_b, stride_bu, stride_on, stride_oc, stride_ps, stride_pp, stride_pn,
    SPLITS: tl.constexpr, UP: tl.constexpr, GATED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # PART: [SPLITS, 2 if GATED else 1, N, cols] fp32   OUT: [N, cols]
    # UP: columns are slots of IDX (bias gathered through IDX, then ReLU, times up if GATED); else
    # BIAS [cols] is added (gather_down).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = offs_n < rows
    col_ok = offs_c < cols
    tile_ok = row_ok[:, None] & col_ok[None, :]
    p_ptrs = PART + offs_n[:, None] * stride_pn + offs_c[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for s in tl.static_range(SPLITS):  # in split order: the same bits every run
        acc += tl.load(p_ptrs + s * stride_ps, mask=tile_ok, other=0.0)
        if GATED:
            up += tl.load(p_ptrs + s * stride_ps + stride_pp, mask=tile_ok, other=0.0)
    if UP:
        neurons = tl.load(IDX + offs_c * stride_idx, mask=col_ok, other=0)
        neuron_ok = col_ok & (neurons >= 0) & (neurons < ffn)
        out = _up_epilogue(acc, up, BIAS, BIAS_UP, neurons, neuron_ok, stride_b, stride_bu, GATED)
    else:
        out = acc + tl.load(BIAS + offs_c * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs_n[:, None] * stride_on + offs_c[None, :] * stride_oc, out.to(OUT.dtype.element_ty),
             mask=tile_ok)


# ---------------------------------------------------------------------------------------------------------------
# Launch heuristics
# ---------------------------------------------------------------------------------------------------------------

MAX_SPLITS = 8
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension (column blocks)


class GatherConfig(NamedTuple):
    """How one gather-GEMM call is launched."""

    block_n: int  # rows of x (h) per program: >= 16 (tl.dot); >= N keeps a decode batch in one row block
    block_c: int  # output columns per program: selected neurons (up) or output features (down)
    block_r: int  # reduction chunk per loop step: input features (up) or selected neurons (down)
    splits: int  # programs sharing one tile's reduction (fp32 partials, summed by _finish_kernel)
    num_warps: int = 4
    num_stages: int = 3


def _config(rows: int, cols: int, reduce: int, block_c: int, up: bool, weight_bytes: int,
            device: torch.device) -> GatherConfig:
    block_n = min(128, max(16, triton.next_power_of_2(rows)))
    if up and block_n > 64 and triton.cdiv(cols, block_c) < 2 * num_sms(device):
        # too few 128-row tiles to fill the GPU (small k): blocks of 64 rows before splitting the reduction; a row
        # block's neighbour runs beside it, so the second read of a weight row is mostly from L2 (sweep 12, OPT-6.7B
        # B=128 at 10%: gather_up 18.8 -> 14.5 µs; gather_down, whose tiles span d, gained nothing there)
        block_n = 64
    config = _tile_config(rows, cols, reduce, block_n, block_c, up, weight_bytes, device)
    if not up and block_n == 64 and config.splits < _wanted_splits(config, rows, cols, reduce, device):
        # the partials' cap, not the reduction, limits gather_down's splits (small k over a narrow d_out): 32-row
        # blocks double the tiles, so fewer splits are wanted (sweeps 08 and 12, OPT-6.7B B=64 at 10%: 16.8 -> 15.0
        # µs, the whole MLP 28.0 -> 27.5 in run 40; B=128 kept its 128-row tile: 32-row blocks took 23.0-26.6 µs
        # against 20.8; a rule for every batch over 32 rows lost 3-9% at densities 0.25-1.0: run 39)
        config = _tile_config(rows, cols, reduce, 32, block_c, up, weight_bytes, device)
    return config


def _tile_config(rows: int, cols: int, reduce: int, block_n: int, block_c: int, up: bool, weight_bytes: int,
                 device: torch.device) -> GatherConfig:
    """The launch for row blocks of ``block_n``: tile widths and warps for that block, then the splits."""
    block_r = 128 if block_n <= 32 else 64  # x/h tile + weight tile, 3 stages: <= 72 KiB of shared memory
    num_warps = 4 if block_n <= 32 else 8
    if block_n == 64:  # sweep 08 (B = 64): 64 columns a program, 8 warps for up and 4 for down
        block_c, num_warps = 64, 8 if up else 4
    config = GatherConfig(block_n, block_c, block_r, 1, num_warps=num_warps, num_stages=3)
    splits = _wanted_splits(config, rows, cols, reduce, device)
    # fp32 partials (written and read once) cost at most 1/2 of the weight bytes the call streams (sweep 08: at
    # OPT-6.7B B=128 a cap of 1/4 left gather_down one split, 2.3x slower than two)
    return config._replace(splits=max(1, min(splits, weight_bytes // (2 * 4 * max(1, rows * cols)))))


def _wanted_splits(config: GatherConfig, rows: int, cols: int, reduce: int, device: torch.device) -> int:
    """Splits of the reduction for ~4 programs per SM when the tiles are fewer than 2 per SM (sweeps 01-04:
    OPT-66B gather_down 1.15x with 4 splits over 2; 6.7B shapes flat to 1.06x), each split >= 2 chunks."""
    tiles = triton.cdiv(rows, config.block_n) * triton.cdiv(cols, config.block_c)
    splits = 1 if tiles >= 2 * num_sms(device) else triton.cdiv(4 * num_sms(device), tiles)
    return min(splits, MAX_SPLITS, max(1, triton.cdiv(reduce, 2 * config.block_r)))


def gather_up_config(rows: int, d: int, k: int, gated: bool, dtype: torch.dtype, device: torch.device) -> GatherConfig:
    """Launch configuration of gather_up / gather_gated_up from shapes alone (static, so CUDA-graph safe).

    A decode batch (N <= 128) is one row block, so the selected weight rows are read once (but 128 rows over too
    few neurons for 2 tiles per SM: two 64-row blocks, side by side, the second read from L2); 32 neurons a program
    (64 for 32 < N <= 64), d in chunks of 128 (64 for N > 32): 256 B of each gathered row a step. When that gives
    fewer than 2 programs per SM (small k), d is split for about 4 programs per SM, over up to 8 programs, each >= 2
    chunks, while the fp32 partials stay under 1/2 of the weight bytes read (benchmarks/mlp_sweep.py tunes these).
    One row (B=1) multiply-adds in fp32 instead, when there are enough neurons for 2 programs per SM without
    splits: 2 neurons a program (4 gated), d in chunks of up to 2048.
    """
    weight_bytes = (2 if gated else 1) * k * d * torch.finfo(dtype).bits // 8
    config = _config(rows, k, d, 32, True, weight_bytes, device)
    if rows != 1:
        return config
    # sweeps 10-11 (run 33-34): at B=1 and 10% of the neurons 1.08-1.26x faster than a 16-row tl.dot tile with 5-8
    # splits and their finishing launch (at B >= 2 the dot is as fast or faster, except 1.14x at OPT-6.7B B=2)
    block_c = max(4 if gated else 2, triton.next_power_of_2(triton.cdiv(k, MAX_GRID_Y)))
    block_r = min(triton.next_power_of_2(d), next((c for c in (2048, 1024, 512, 256) if d % c == 0), 1024))
    if triton.cdiv(k, block_c) < 2 * num_sms(device):  # too few neurons to fill the GPU without splits: as tuned
        return config
    return GatherConfig(1, block_c, block_r, 1, num_warps=4, num_stages=3)


def gather_down_config(rows: int, k: int, d_out: int, dtype: torch.dtype, device: torch.device) -> GatherConfig:
    """Launch configuration of gather_down from shapes alone: as ``gather_up_config``, with 64 output features a
    program (128 B of each gathered w_t row in bf16: whole cache lines) and the k selected neurons split instead
    of d; a batch of 33-64 rows runs as two 32-row blocks when the partials' cap would bound its splits."""
    return _config(rows, d_out, k, 64, False, k * d_out * torch.finfo(dtype).bits // 8, device)


def split_length(reduce: int, config: GatherConfig) -> tuple[int, int]:
    """(splits, split_len) a launch with ``config`` runs over a reduction of ``reduce``: whole BLOCK_R chunks per
    split, every split non-empty (so up to ``config.splits``)."""
    split_len = triton.cdiv(triton.cdiv(max(reduce, 1), config.splits), config.block_r) * config.block_r
    return triton.cdiv(max(reduce, 1), split_len), split_len


def _partials(splits: int, parts: int, rows: int, cols: int, device: torch.device) -> Tensor:
    shape = (splits, parts, rows, cols) if splits > 1 else (1, 1, 1, 1)
    return torch.empty(shape, dtype=torch.float32, device=device)


def gather_up_triton(
    x: Tensor, w: Tensor, b: Tensor, idx: Tensor, w_up: Tensor | None = None, b_up: Tensor | None = None,
    *, config: GatherConfig | None = None, out: Tensor | None = None,
) -> Tensor:
    """``polar::gather_up`` with the kernels above, or ``polar::gather_gated_up`` when ``w_up, b_up`` are given
    (``w, b`` are then the gate's). ``config`` forces the launch configuration (tests, benchmarks); ``out`` is a
    preallocated ``[N, k]`` output (tests poison it to check that every element is written)."""
    # x: [N, d]   w, w_up: [ffn, d]   b, b_up: [ffn]   idx: [k] int64
    rows, d = x.shape
    ffn, k = w.shape[0], idx.shape[0]
    gated = w_up is not None
    assert w.shape == (ffn, d) and b.shape == (ffn,) and idx.dtype == torch.int64
    assert not gated or (w_up.shape == w.shape and b_up is not None and b_up.shape == b.shape)
    if config is None:
        config = gather_up_config(rows, d, k, gated, x.dtype, x.device)
    if out is None:
        out = torch.empty((rows, k), dtype=x.dtype, device=x.device)
    assert out.shape == (rows, k) and out.dtype == x.dtype
    if out.numel() == 0:
        return out
    if not gated:
        w_up, b_up = w, b  # not read by the kernel
    splits, split_len = split_length(d, config)
    part = _partials(splits, 2 if gated else 1, rows, k, x.device)
    dot_dtype, dot_precision = dot_types(x.dtype, x.device)
    grid = (triton.cdiv(rows, config.block_n), triton.cdiv(k, config.block_c), splits)
    wrap_triton(_gather_up_kernel)[grid](
        x, w, b, w_up, b_up, idx, out, part,
        rows, d, ffn, k, split_len,
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1), b.stride(0),
        w_up.stride(0), w_up.stride(1), b_up.stride(0),
        idx.stride(0), out.stride(0), out.stride(1), part.stride(0), part.stride(1), part.stride(2),
        GATED=gated, SPLITS=splits,
        BLOCK_N=config.block_n, BLOCK_C=config.block_c, BLOCK_R=config.block_r,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        _finish(part, idx, b, b_up, out, ffn, grid, config, up=True, gated=gated)
    return out


def gather_down_triton(
    h: Tensor, w_t: Tensor, b: Tensor, idx: Tensor, *, config: GatherConfig | None = None, out: Tensor | None = None,
) -> Tensor:
    """``polar::gather_down`` with the kernels above; ``config`` and ``out`` as in ``gather_up_triton``."""
    # h: [N, k]   w_t: [ffn, d_out]   b: [d_out]   idx: [k] int64
    rows, k = h.shape
    d_out = w_t.shape[1]
    assert b.shape == (d_out,)
    if config is None:
        config = gather_down_config(rows, k, d_out, h.dtype, h.device)
    if out is None:
        out = torch.empty((rows, d_out), dtype=h.dtype, device=h.device)
    assert out.shape == (rows, d_out) and out.dtype == h.dtype
    if out.numel() == 0:
        return out
    splits, split_len = split_length(k, config)
    if splits == 1:
        _launch_down(h, w_t, b, idx, out, _partials(1, 1, rows, d_out, h.device), split_len, config, finish=True)
        return out
    part = _partials(splits, 1, rows, d_out, h.device)
    grid = _launch_down(h, w_t, b, idx, out, part, split_len, config, finish=False)
    _finish(part, idx, b, b, out, w_t.shape[0], grid, config, up=False, gated=False)
    return out


def gather_down_split_len(rows: int, k: int, d_out: int, dtype: torch.dtype, device: torch.device) -> int:
    """Selected neurons per split of the reduction that ``gather_down`` runs with by default (``>= k``: one
    split, which finishes its own tiles)."""
    return split_length(k, gather_down_config(rows, k, d_out, dtype, device))[1]


def gather_down_partials_triton(
    h: Tensor, w_t: Tensor, idx: Tensor, split_len: int, *, config: GatherConfig | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``polar::gather_down_partials``: the fp32 partial products of ``gather_down`` over consecutive slices of
    ``split_len`` selected neurons, ``[cdiv(k, split_len), N, d_out]``, unsummed and without the bias (the caller's
    graph sums them where it adds the bias, so the sum fuses into the output's consumer)."""
    # h: [N, k]   w_t: [ffn, d_out]   idx: [k] int64
    rows, k = h.shape
    d_out = w_t.shape[1]
    splits = triton.cdiv(k, split_len)
    if config is None:
        config = gather_down_config(rows, k, d_out, h.dtype, h.device)._replace(splits=splits)
    if out is None:
        out = torch.empty((splits, rows, d_out), dtype=torch.float32, device=h.device)
    assert out.shape == (splits, rows, d_out) and out.dtype == torch.float32 and out.is_contiguous()
    if out.numel() > 0:
        # the bias and the output are not read without FINISH: any [d_out] and [N, d_out] tensor will do
        _launch_down(h, w_t, out[0, 0], idx, out[0], out.unsqueeze(1), split_len, config, finish=False)
    return out


def _launch_down(h: Tensor, w_t: Tensor, b: Tensor, idx: Tensor, out: Tensor, part: Tensor, split_len: int,
                 config: GatherConfig, *, finish: bool) -> tuple[int, int, int]:
    """Launch ``_gather_down_kernel`` over ``cdiv(k, split_len)`` splits; returns its grid."""
    rows, k = h.shape
    ffn, d_out = w_t.shape
    assert idx.shape == (k,) and idx.dtype == torch.int64
    dot_dtype, dot_precision = dot_types(h.dtype, h.device)
    grid = (triton.cdiv(rows, config.block_n), triton.cdiv(d_out, config.block_c), triton.cdiv(k, split_len))
    wrap_triton(_gather_down_kernel)[grid](
        h, w_t, b, idx, out, part,
        rows, k, ffn, d_out, split_len,
        h.stride(0), h.stride(1), w_t.stride(0), w_t.stride(1), b.stride(0),
        idx.stride(0), out.stride(0), out.stride(1), part.stride(0), part.stride(2),
        FINISH=finish,
        BLOCK_N=config.block_n, BLOCK_C=config.block_c, BLOCK_R=config.block_r,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return grid


def _finish(part: Tensor, idx: Tensor, b: Tensor, b_up: Tensor, out: Tensor, ffn: int, grid: tuple,
            config: GatherConfig, *, up: bool, gated: bool) -> None:
    """Launch ``_finish_kernel`` over the output tiles of ``grid``: sum the splits' partials, then bias/activation."""
    rows, cols = out.shape
    wrap_triton(_finish_kernel)[grid[:2]](
        part, idx, b, b_up, out,
        rows, cols, ffn,
        idx.stride(0), b.stride(0), b_up.stride(0), out.stride(0), out.stride(1),
        part.stride(0), part.stride(1), part.stride(2),
        SPLITS=part.shape[0], UP=up, GATED=gated, BLOCK_N=config.block_n, BLOCK_C=config.block_c,
        num_warps=config.num_warps,
    )

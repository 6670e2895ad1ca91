"""The head router in one kernel: ``top-k(x @ W^T + b)`` per row, split over ``hidden`` across programs.

Replaces a cuBLAS GEMM (plus its split-K reduce) and ``torch.topk`` (two sort kernels) per routed layer: at
decode the router is a [B, hidden] x [hidden, units] product, far too small to keep a GPU busy, so what costs is
launches and the latency of streaming W through few SMs, not math.

Grid (row blocks, splits). Program (m, s) computes the partial scores [BLOCK_M, BLOCK_U] of its BLOCK_M rows over
the s-th slice of ``hidden`` (fp32 accumulation) and stores them; the last program of row block m to finish (an
atomic counter, zeroed by the caller) sums the partials in split order (deterministic), adds the bias and sorts
each row's units by (score descending, index ascending), then stores the first k: the k best units in descending
score, ties to the lower index. NaN scores rank as -inf, so every output slot is written whatever the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import dot_types, num_sms

__all__ = ["route_triton"]

_BLOCK_M = 16  # rows per program (the smallest tl.dot tile)
_BLOCK_K = 128  # hidden columns per loop step
_MAX_SPLITS = 16  # more programs per row block made the last one's sum slower than the streaming they saved (H200)


@triton.jit
def _route_kernel(
    X, W, BIAS, PARTIAL, ARRIVED, OUT,
    rows, hidden, num_units, k, split_len,
    stride_xm, stride_xk, stride_wu, stride_wk, stride_om,
    NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_U: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # X: [rows, hidden]   W: [units, hidden]   BIAS: [units]   OUT: [rows, k] int64
    # PARTIAL: [NUM_SPLITS, row blocks * BLOCK_M, BLOCK_U] fp32 (unused for one split)
    # ARRIVED: [row blocks] int32, zero on entry
    block = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_u = tl.arange(0, BLOCK_U)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < rows
    unit_ok = offs_u < num_units
    start = split * split_len
    stop = tl.minimum(start + split_len, hidden)
    scores = tl.zeros([BLOCK_M, BLOCK_U], dtype=tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < stop
        x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(W + offs_u[None, :] * stride_wu + kk[:, None] * stride_wk,
                    mask=unit_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_U]
        scores = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), scores, input_precision=DOT_PRECISION)

    if NUM_SPLITS > 1:
        partial = PARTIAL + offs_m[:, None] * BLOCK_U + offs_u[None, :]  # this row block's tile, split 0
        split_stride = tl.num_programs(0) * BLOCK_M * BLOCK_U
        tl.store(partial + split * split_stride, scores)
        # Every thread's stores are issued before the one atomic (barrier); acq_rel then makes this program's
        # partials visible to whichever program arrives last, and that one sees all of them.
        tl.debug_barrier()
        if tl.atomic_add(ARRIVED + block, 1, sem="acq_rel") != NUM_SPLITS - 1:
            return
        scores = tl.zeros([BLOCK_M, BLOCK_U], dtype=tl.float32)
        for s in range(NUM_SPLITS):  # in split order, whichever program sums: the same bits every run
            scores += tl.load(partial + s * split_stride, cache_modifier=".cg")

    scores += tl.load(BIAS + offs_u, mask=unit_ok, other=0.0).to(tl.float32)[None, :]
    # NaN and padding units rank last; -inf ties are broken by index like any other tie. No score is -0.0 (the sums
    # start from +0.0), so equal floats have equal bits.
    scores = tl.where(unit_ok[None, :] & (scores == scores), scores, float("-inf"))
    # Sort (score, -unit) pairs packed in int64, descending: one bitonic network in registers. Ranking one unit a
    # step (a dependent load or a cross-thread reduction per unit) cost ~0.3 us per unit on the H200.
    bits = scores.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 in the floats' order
    packed = (key.to(tl.int64) << 32) | (BLOCK_U - 1 - offs_u)[None, :].to(tl.int64)  # [BLOCK_M, BLOCK_U]
    ranked = tl.sort(packed, dim=1, descending=True)
    units = (BLOCK_U - 1) - (ranked & 0xFFFFFFFF)  # [BLOCK_M, BLOCK_U]: column j holds the unit ranked j
    tl.store(OUT + offs_m[:, None] * stride_om + offs_u[None, :], units,
             mask=row_ok[:, None] & (offs_u[None, :] < k))


def _route_splits(rows: int, hidden: int, device: torch.device) -> int:
    """How many programs share each row block's ``hidden``: up to one program per SM streams W, at most 16."""
    row_blocks = triton.cdiv(rows, _BLOCK_M)
    return max(1, min(triton.cdiv(hidden, _BLOCK_K), _MAX_SPLITS, num_sms(device) // row_blocks))


def route_triton(x: Tensor, weight: Tensor, bias: Tensor, k: int) -> Tensor:
    """``polar::route`` with the kernel above: int64 ``[..., k]``, the top-k units of ``x @ weight.T + bias``."""
    # x: [..., hidden]   weight: [units, hidden]   bias: [units]
    hidden = x.shape[-1]
    num_units = weight.shape[0]
    rows = x.reshape(-1, hidden)  # a view for the decode router input [B, 1, hidden]
    out = torch.empty((*x.shape[:-1], k), dtype=torch.int64, device=x.device)
    row_blocks = triton.cdiv(rows.shape[0], _BLOCK_M)
    splits = _route_splits(rows.shape[0], hidden, x.device)
    split_len = triton.cdiv(triton.cdiv(hidden, splits), _BLOCK_K) * _BLOCK_K
    splits = triton.cdiv(hidden, split_len)  # every split non-empty
    block_u = max(16, triton.next_power_of_2(num_units))
    part_shape = (splits, row_blocks * _BLOCK_M, block_u) if splits > 1 else (1,)  # one split keeps its scores
    partial = torch.empty(part_shape, dtype=torch.float32, device=x.device)
    arrived = torch.zeros(row_blocks, dtype=torch.int32, device=x.device)
    dot_dtype, dot_precision = dot_types(x.dtype, x.device)
    wrap_triton(_route_kernel)[(row_blocks, splits)](
        rows, weight, bias, partial, arrived, out,
        rows.shape[0], hidden, num_units, k, split_len,
        rows.stride(0), rows.stride(1), weight.stride(0), weight.stride(1), k,
        NUM_SPLITS=splits, BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, BLOCK_U=block_u,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision,
        # H200, 8 warps against 4: 72 units 12.3 -> 10.4 us (B=1), 13.5 -> 11.5 (B=64); 32 even; 8 units +0.2 us
        num_warps=8 if block_u >= 32 else 4,
    )
    return out

"""Selective-head decode attention: split-K flash-decoding over the selected KV groups only.

For each sequence b and each selected KV group g = units[b, j] (R = H / Hkv query heads per group):

    out[b, g*R + r] = softmax(scale * q[b, g*R + r] . K[b, g]^T + mask[b]) @ V[b, g]      r = 0 .. R-1

and every head of an unselected group is exactly 0. Algorithm (flash-decoding, paper symbols):

1. ``_select_attention_split_kernel``, grid (num_splits, k + 1, B). Program (s, j < k, b) loads the R query
   heads of group g = units[b, j] into one [BLOCK_R >= 16, BLOCK_D] tile (rows past R are zero), finds the
   attended range [lo, hi) of sequence b from its mask row, and streams the s-th of num_splits equal runs of
   whole BLOCK_N blocks of that range of K[b, g] and V[b, g] once, for all R heads:

       m_new = max(m_i, rowmax(S))      S = scale * Q K^T + mask
       alpha = exp(m_i - m_new)         P = exp(S - m_new)
       l_i   = alpha * l_i + rowsum(P)  acc = alpha * acc + P V      m_i = m_new

   Keys the mask rules out (False, or -inf) are never read: outside [lo, hi) (the unfilled tail of a static
   cache, left padding) no block is visited at all; inside it their K/V rows are predicated off in the loads.
   With one split the program writes out = acc / l_i directly; with several it writes its fp32 partials
   (m_i, l_i, acc). Program (0, k, b) writes the zeros of every head of every unselected group of sequence b.
2. ``_select_attention_merge_kernel`` (several splits only), grid (k, B): program (j, b) merges the splits of
   pair (b, j) online,  out = sum_s exp(m_s - m) acc_s / sum_s exp(m_s - m) l_s  (m = max_s m_s), into the
   heads of group units[b, j]. Every output element is written by exactly one program: no zero fill, no atomics.

A query row whose keys are all masked gets l_i = 0 and output 0 (not NaN). The launch grid depends only on
shapes and k = units.shape[1]: no host sync, CUDA-graph safe. Kernels launch through ``wrap_triton`` so the
``polar::select_attention`` triton_op is traceable by Inductor.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import dot_types, num_sms

__all__ = ["SelectAttentionConfig", "select_attention_config", "select_attention_triton"]


@triton.jit
def _load_mask(mask_row, n, stride_mn, limit, MASK_IS_BOOL: tl.constexpr):
    """keep[n] (key n is attended) and bias[n] (the additive mask, fp32) for key positions n < limit."""
    if MASK_IS_BOOL:
        keep = (tl.load(mask_row + n * stride_mn, mask=n < limit, other=0) != 0) & (n < limit)
        bias = tl.zeros(n.shape, dtype=tl.float32)
    else:
        bias = tl.load(mask_row + n * stride_mn, mask=n < limit, other=float("-inf")).to(tl.float32)
        keep = bias > float("-inf")
    return keep, bias


@triton.jit
def _attended_range(mask_row, stride_mn, kv_len, MASK_IS_BOOL: tl.constexpr, BLOCK_SCAN: tl.constexpr):
    """[lo, hi): from the first to past the last attended key of one sequence (lo >= hi when none is)."""
    lo = kv_len
    hi = 0
    for c in range(0, kv_len, BLOCK_SCAN):
        n = c + tl.arange(0, BLOCK_SCAN)
        keep, _ = _load_mask(mask_row, n, stride_mn, kv_len, MASK_IS_BOOL)
        lo = tl.minimum(lo, tl.min(tl.where(keep, n, kv_len), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(keep, n + 1, 0), axis=0))
    return lo, hi


@triton.jit
def _select_attention_split_kernel(
    Q, K, V, UNITS, MASK, OUT, M_PART, L_PART, ACC_PART,
    scale, kv_len, num_splits, num_units, kv_heads,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ub, stride_uj,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_U: tl.constexpr,
    BLOCK_SCAN: tl.constexpr, SPLIT_K: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Q: [B, H, 1, D]   K, V: [B, Hkv, L, D]   UNITS: [B, k]   MASK: [B|1, 1, 1, L]   OUT: [B, H, 1, D]
    # M_PART, L_PART: [B, k, num_splits, GROUP] fp32   ACC_PART: [B, k, num_splits, GROUP, D] fp32 (if SPLIT_K)
    LOG2E: tl.constexpr = 1.4426950408889634
    split = tl.program_id(0)
    j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < GROUP
    d_ok = offs_d < HEAD_DIM

    if j >= num_units:
        # The extra program of each sequence (split 0 only) writes zeros to every head of every unselected group.
        if split == 0:
            offs_u = tl.arange(0, BLOCK_U)
            units = tl.load(UNITS + b * stride_ub + offs_u * stride_uj, mask=offs_u < num_units, other=-1)
            zeros = tl.zeros([BLOCK_R, BLOCK_D], dtype=OUT.dtype.element_ty)
            for g in range(0, kv_heads):
                selected = tl.sum((units == g).to(tl.int32), axis=0) > 0
                zero_rows = offs_r < tl.where(selected, 0, GROUP)  # all GROUP heads of g, or none
                o_ptrs = OUT + b * stride_ob + (g * GROUP + offs_r[:, None]) * stride_oh + offs_d[None, :] * stride_od
                tl.store(o_ptrs, zeros, mask=zero_rows[:, None] & d_ok[None, :])
        return

    g = tl.load(UNITS + b * stride_ub + j * stride_uj).to(tl.int64)
    heads = g * GROUP + offs_r  # [BLOCK_R] query heads of group g
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_R, BLOCK_D]
    k_base = K + b * stride_kb + g * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + g * stride_vh + offs_d[None, :] * stride_vd
    mask_row = MASK + b * stride_mb

    # Split the attended range [lo, hi) (not [0, L): the unfilled tail and left padding) into whole blocks.
    lo, hi = _attended_range(mask_row, stride_mn, kv_len, MASK_IS_BOOL, BLOCK_SCAN)
    first = (lo // BLOCK_N) * BLOCK_N
    blocks_per_split = tl.cdiv(tl.maximum(hi - first, 0), BLOCK_N * num_splits)
    start = first + split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, hi)

    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n  # [BLOCK_N] key positions
        keep, bias = _load_mask(mask_row, n, stride_mn, end, MASK_IS_BOOL)
        # Masked keys are predicated off: their K/V rows are not read.
        kv_ok = keep[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None] * stride_kn, mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        s = tl.where(keep[None, :], s * scale + bias[None, :], float("-inf"))  # [BLOCK_R, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys so far masked: keep exp() finite
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        p = tl.exp2((s - m_safe[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None] * stride_vn, mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new

    if not SPLIT_K:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # all keys masked: l_i = 0, acc = 0, out = 0
        o_ptrs = OUT + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = (b * num_units + j) * num_splits + split  # row of [B, k, num_splits]
        tl.store(M_PART + part * GROUP + offs_r, m_i, mask=row_ok)
        tl.store(L_PART + part * GROUP + offs_r, l_i, mask=row_ok)
        acc_ptrs = ACC_PART + (part * GROUP + offs_r[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.store(acc_ptrs, acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _select_attention_merge_kernel(
    UNITS, OUT, M_PART, L_PART, ACC_PART,
    num_units,
    stride_ub, stride_uj,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    # M_PART, L_PART: [B, k, NUM_SPLITS, GROUP] fp32   ACC_PART: [B, k, NUM_SPLITS, GROUP, D] fp32
    # OUT: [B, H, 1, D]; program (j, b) writes the GROUP heads of group units[b, j].
    LOG2E: tl.constexpr = 1.4426950408889634
    j = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < GROUP
    out_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]

    # Online merge of the splits' (m, l, acc); every load is independent of the others and of units.
    first = (b * num_units + j) * NUM_SPLITS
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        row = (first + s) * GROUP + offs_r
        m_s = tl.load(M_PART + row, mask=row_ok, other=float("-inf"))
        l_s = tl.load(L_PART + row, mask=row_ok, other=0.0)
        acc_s = tl.load(ACC_PART + row[:, None] * HEAD_DIM + offs_d[None, :], mask=out_ok, other=0.0)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m - m_safe) * LOG2E)
        w = tl.exp2((m_s - m_safe) * LOG2E)
        l_sum = l_sum * alpha + w * l_s
        acc = acc * alpha[:, None] + w[:, None] * acc_s
        m = m_new
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # all keys masked: l = 0, acc = 0, out = 0

    g = tl.load(UNITS + b * stride_ub + j * stride_uj).to(tl.int64)
    o_ptrs = OUT + b * stride_ob + (g * GROUP + offs_r[:, None]) * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------------------------
# Launch heuristics (tuned on one H200, bf16, D=128; see benchmarks/NOTES-attention.md)
# ---------------------------------------------------------------------------------------------------------------


class SelectAttentionConfig(NamedTuple):
    """How one call is launched: KV splits per (sequence, unit), keys per block, warps, pipeline stages."""

    num_splits: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


def select_attention_config(
    batch: int, num_units: int, kv_len: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> SelectAttentionConfig:
    """The launch configuration for one call, from shapes alone (static, so CUDA-graph safe).

    Tuned on one H200 (bf16, D=128, B=1..128, L=1k..8k; benchmarks/NOTES-attention.md):
    - BLOCK_N: one K+V stage is 16 KiB (bf16 D=128: 32 keys; D=64: 64; D=256 or fp32 D=128: 16), 3 stages,
      4 warps: 48 KiB of shared memory, so 4 programs (16 warps) share an SM. Fewer warps per SM (64 keys,
      2 programs of 4 warps) ran up to 1.3x slower at 512 programs: latency, not bytes in flight, was short.
    - Splits: the B*k (sequence, unit) pairs run as waves of 4 programs per SM; a last wave that is only partly
      full leaves bandwidth unused (384 pairs on 528 slots ran 1.25x slower than 768 -> 1536 programs would).
      So split into 1..16 chunks of >= 256 keys, choosing the count whose waves are fullest (time ~ ceil(w) / w
      for w = programs / slots), the fewest within 5% of the best: 1 for 512 or 1024 pairs (no merge launch), 2 for 256,
      4 for 384, 8 for 64. Where that still leaves fewer programs than SMs, stages are twice as long.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    stage_bytes = 2 * block_d * torch.finfo(dtype).bits // 8
    block_n = max(16, min(128, 16384 // stage_bytes))
    pairs = batch * num_units
    slots = 4 * num_sms(device)

    def wave_cost(splits: int) -> float:  # time relative to perfectly full waves
        waves = pairs * splits / slots
        return math.ceil(waves) / waves

    max_splits = max(1, min(16, kv_len // 256))
    best = min(wave_cost(splits) for splits in range(1, max_splits + 1))
    num_splits = next(splits for splits in range(1, max_splits + 1) if wave_cost(splits) <= 1.05 * best)
    if pairs * num_splits <= num_sms(device):
        block_n = min(2 * block_n, 128)
    return SelectAttentionConfig(num_splits, block_n, num_warps=4, num_stages=3)


def select_attention_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    units: Tensor,
    attn_mask: Tensor,
    scale: float,
    *,
    config: SelectAttentionConfig | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Selective decode attention (semantics of ``polar::select_attention``) with the Triton kernels above.

    ``config`` forces the launch configuration (tests, benchmarks); ``out`` is a preallocated contiguous
    ``[B, H, 1, D]`` output (tests poison it to check that every element is written).
    """
    # query: [B, H, 1, D]   key, value: [B, Hkv, L, D]   units: [B, k]   attn_mask: [B|1, 1, 1, L]
    batch, heads, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    num_units = units.shape[1]
    group = heads // kv_heads
    assert group * kv_heads == heads and key.shape == value.shape and attn_mask.shape[-1] == kv_len
    if config is None:
        config = select_attention_config(batch, num_units, kv_len, head_dim, query.dtype, query.device)
    num_splits, block_n, num_warps, num_stages = config
    if out is None:
        out = torch.empty((batch, heads, 1, head_dim), dtype=query.dtype, device=query.device)
    assert out.shape == query.shape and out.dtype == query.dtype and out.is_contiguous()
    mask_is_bool = attn_mask.dtype == torch.bool
    mask = attn_mask  # bool masks load as int1 (a view as uint8 would not lower in Inductor, torch 2.11)
    stride_mb = 0 if mask.shape[0] == 1 else mask.stride(0)
    part_shape = (batch, num_units, num_splits, group)
    m_part = torch.empty(part_shape if num_splits > 1 else (1,), dtype=torch.float32, device=query.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(
        (*part_shape, head_dim) if num_splits > 1 else (1,), dtype=torch.float32, device=query.device
    )
    block_r = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_u = max(2, triton.next_power_of_2(num_units))
    block_scan = min(2048, max(16, triton.next_power_of_2(kv_len)))
    dot_dtype, dot_precision = dot_types(query.dtype, query.device)
    # One extra program per sequence (j = k) writes the unselected groups' zeros.
    grid = (num_splits, num_units + 1, batch)
    wrap_triton(_select_attention_split_kernel)[grid](
        query, key, value, units, mask, out, m_part, l_part, acc_part,
        scale, kv_len, num_splits, num_units, kv_heads,
        query.stride(0), query.stride(1), query.stride(3),
        key.stride(0), key.stride(1), key.stride(2), key.stride(3),
        value.stride(0), value.stride(1), value.stride(2), value.stride(3),
        units.stride(0), units.stride(1),
        stride_mb, mask.stride(3),
        out.stride(0), out.stride(1), out.stride(3),
        GROUP=group, HEAD_DIM=head_dim,
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_U=block_u, BLOCK_SCAN=block_scan,
        SPLIT_K=num_splits > 1, MASK_IS_BOOL=mask_is_bool, DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        wrap_triton(_select_attention_merge_kernel)[(num_units, batch)](
            units, out, m_part, l_part, acc_part,
            num_units,
            units.stride(0), units.stride(1),
            out.stride(0), out.stride(1), out.stride(3),
            GROUP=group, HEAD_DIM=head_dim,
            BLOCK_R=block_r, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            num_warps=4,
        )
    return out

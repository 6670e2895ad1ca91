"""The MLP router in one Triton launch after cuBLAS: ``sum_rows relu(low @ w_out^T)`` over the neurons, then the k
best neurons in ascending index order, exact.

``low = x @ w_in^T`` ([N, rank], in x's dtype) comes from cuBLAS. Then ``_mlp_route_kernel``, grid (neuron blocks):

1. Program f computes the scores of its BLOCK_F neurons (``relu(low @ w_out[neurons]^T)`` summed over the rows,
   fp32) and stores them. Scores are sums of ReLUs (>= 0, or NaN), so as int keys ``bits(score) + 1`` (NaN -> 0,
   -0.0 -> +0.0) they order as the floats do. The program adds its keys to a global histogram of NUM_BINS bins
   (``_bin``: a monotone map, 64 bins per binade over [2**-32, 2**32), clamped outside), one atomic per distinct bin
   of the block, then takes a ticket from an arrival counter.
2. The program that arrives last selects, alone (``_select``), reading every score back from L2:
   a. the boundary bin b* holding the k-th largest key, and ``above`` = #{keys in bins > b*}, from the histogram;
   b. one pass over the scores in CHUNK-key chunks appends every key in bins >= b* with its index to a list (in
      index order, by a prefix sum per chunk and a running offset) and the keys of bin b* to a candidate buffer;
   c. the k-th largest key T: a binary search between the smallest and the largest candidate, counting in
      registers when the candidates fit the buffer (CAPACITY), else over the list chunk by chunk (slow, exact:
      a bin crowded by equal scores, e.g. dead neurons all exactly 0, has min == max and needs no step);
   d. one pass over the list writes ``idx``: keys > T all kept, keys == T the lowest indices while k needs them
      (ties to the lower index, NaN lowest: as ``ops.mlp_route_reference``), each at its slot = #kept before it,
      so the output is in ascending index order and every slot of ``idx [k]`` is written whatever the scores;

Memory ordering. Each program stores its scores and does its (relaxed) histogram atomics, then ``debug_barrier``
(bar.sync: every thread's writes precede, in causality order, what thread 0 does next), then one ``acq_rel``
atomic on the counter (a gpu-scope release, cumulative over the block's writes). The last program's ticket comes
from the same atomic (an acquire that synchronizes with every earlier release) and reaches its other threads
through the barrier Triton puts after a scalar atomic; it reads scores and histogram with ``.cg`` loads (L2, so no
SM's L1 can serve a stale line). Its own list and buffer are written and read by one block, ordered by barriers.

The histogram and counter live in a zeroed workspace allocated per call (``_workspace``: one memset). Grids depend
on shapes only: no host sync, CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import dot_types

__all__ = ["MAX_SELECT_NEURONS", "mlp_route_triton"]

MAX_SELECT_NEURONS = 65536  # wider layers take the op's reference path: the widths tested and timed (no hard limit)
_BLOCK_F = 64  # neurons per program
_BLOCK_R = 64  # rank columns per loop step
_NUM_BINS = 4096  # histogram bins: 64 per binade (key >> 17) over 64 binades from 2**-32 (key 95 << 23)
_BIN_SHIFT = 17
_BIN_OFFSET = 95 << 6
_CHUNK = 2048  # keys per step of the last program's passes; < 2**15: two counts share an int32 prefix sum
_NUM_WARPS = 4  # 8 warps with 8192-key chunks measured slower on the H200 (OPT-66B shape: 78.4 vs 66.0 µs)
_CAPACITY = 2048  # candidates of the boundary bin searched in registers


@triton.jit
def _score_key(score):
    """fp32 scores (>= 0 or NaN) -> int32 keys in the same order: NaN 0, -0.0 and +0.0 1, +inf 0x7F800001."""
    bits = score.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(score != score, 0, bits + 1)


@triton.jit
def _bin(key, NUM_BINS: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_OFFSET: tl.constexpr):
    """The histogram bin of each key: monotone non-decreasing in the key, in [0, NUM_BINS)."""
    return tl.minimum(tl.maximum((key >> BIN_SHIFT) - BIN_OFFSET, 0), NUM_BINS - 1)


@triton.jit
def _count_and_arrive(HIST, ARRIVED, key, ok, BLOCK: tl.constexpr,
                      NUM_BINS: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_OFFSET: tl.constexpr):
    """Adds this block's keys to HIST (one atomic per distinct bin: no same-address pile-up when many neurons
    share a bin) and returns whether this program arrived last."""
    # key: [BLOCK] int32   ok: [BLOCK] bool   HIST: [NUM_BINS] int32   ARRIVED: [] int32
    b = tl.where(ok, _bin(key, NUM_BINS, BIN_SHIFT, BIN_OFFSET), -1)
    same = b[:, None] == b[None, :]  # [BLOCK, BLOCK]
    count = tl.sum(same.to(tl.int32), axis=1)
    earlier = tl.arange(0, BLOCK)[None, :] < tl.arange(0, BLOCK)[:, None]
    first = tl.sum((same & earlier).to(tl.int32), axis=1) == 0  # the block's first key in its bin
    tl.atomic_add(HIST + b, count, mask=ok & first, sem="relaxed")
    tl.debug_barrier()  # every thread's scores and atomics, then the one release below (see the module docstring)
    return tl.atomic_add(ARRIVED, 1, sem="acq_rel") == tl.num_programs(0) - 1


@triton.jit
def _select(SCORES, HIST, ARRIVED, CAND, LIST_KEY, LIST_IDX, IDX, ffn, k,
            NUM_BINS: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_OFFSET: tl.constexpr,
            CHUNK: tl.constexpr, CAPACITY: tl.constexpr):
    """Steps a-e of the module docstring, run by the last program alone."""
    # SCORES: [ffn] fp32   CAND: [CAPACITY] int32   LIST_KEY, LIST_IDX: [ffn] int32   IDX: [k] int64
    # a. boundary bin: at_or_above[b] = #{keys in bins >= b} is non-increasing, at_or_above[0] = ffn >= k
    bins = tl.arange(0, NUM_BINS)
    hist = tl.load(HIST + bins, cache_modifier=".cg")
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    boundary = tl.sum((at_or_above >= k).to(tl.int32), axis=0) - 1
    above = tl.max(tl.where(at_or_above < k, at_or_above, 0), axis=0)  # < k <= above + hist[boundary]

    # b. list every key in bins >= boundary, and buffer those in the boundary bin; one packed prefix sum per chunk
    # (low 16 bits: listed, high: candidates). The next chunk's load is issued before this one's scan.
    offs = tl.arange(0, CHUNK)
    listed = tl.zeros([], dtype=tl.int32)
    cands = tl.zeros([], dtype=tl.int32)
    score = tl.load(SCORES + offs, mask=offs < ffn, other=0.0, cache_modifier=".cg")
    for start in range(0, ffn, CHUNK):
        n = start + offs
        ahead = n + CHUNK
        score_ahead = tl.load(SCORES + ahead, mask=ahead < ffn, other=0.0, cache_modifier=".cg")
        key = _score_key(score)
        b = _bin(key, NUM_BINS, BIN_SHIFT, BIN_OFFSET)
        ok = n < ffn
        at = ok & (b >= boundary)
        cand = ok & (b == boundary)
        packed = tl.cumsum(at.to(tl.int32) | (cand.to(tl.int32) << 16), axis=0)
        slot = listed + (packed & 0xFFFF) - 1
        tl.store(LIST_KEY + slot, key, mask=at)
        tl.store(LIST_IDX + slot, n, mask=at)
        cand_slot = cands + (packed >> 16) - 1
        tl.store(CAND + cand_slot, key, mask=cand & (cand_slot < CAPACITY))
        chunk_total = tl.max(packed, axis=0)  # the last element: both halves are non-decreasing
        listed += chunk_total & 0xFFFF
        cands += chunk_total >> 16
        score = score_ahead
    tl.debug_barrier()  # the list and the buffer, written by every thread, are read by every thread below

    # c. T = the largest key with #{keys >= T} >= k, between the smallest and the largest candidate
    if cands <= CAPACITY:
        c_offs = tl.arange(0, CAPACITY)
        c_ok = c_offs < cands
        cand_key = tl.load(CAND + c_offs, mask=c_ok, other=-1)  # -1: below every key
        lo = tl.min(tl.where(c_ok, cand_key, 0x7FFFFFFF), axis=0)  # #{keys >= lo} = above + cands >= k
        hi = tl.max(cand_key, axis=0) + 1  # #{keys >= hi} = above < k
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            enough = above + tl.sum((cand_key >= mid).to(tl.int32), axis=0) >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        greater = above + tl.sum((cand_key > lo).to(tl.int32), axis=0)
    else:  # the buffer overflowed: the same search over the list (every key in it above the boundary bin counts)
        lo = tl.full([], 0x7FFFFFFF, dtype=tl.int32)
        hi = tl.zeros([], dtype=tl.int32)
        for start in range(0, listed, CHUNK):
            n = start + offs
            key = tl.load(LIST_KEY + n, mask=n < listed, other=-1)
            in_bin = _bin(key, NUM_BINS, BIN_SHIFT, BIN_OFFSET) == boundary
            lo = tl.minimum(lo, tl.min(tl.where(in_bin & (n < listed), key, 0x7FFFFFFF), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(in_bin, key, -1), axis=0) + 1)
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            count = tl.zeros([], dtype=tl.int32)
            for start in range(0, listed, CHUNK):
                n = start + offs
                count += tl.sum((tl.load(LIST_KEY + n, mask=n < listed, other=-1) >= mid).to(tl.int32), axis=0)
            enough = count >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        greater = tl.zeros([], dtype=tl.int32)
        for start in range(0, listed, CHUNK):
            n = start + offs
            greater += tl.sum((tl.load(LIST_KEY + n, mask=n < listed, other=-1) > lo).to(tl.int32), axis=0)
    threshold = lo
    need = k - greater  # >= 1 keys equal to T still to keep

    # d. keep key > T, and key == T while fewer than `need` equal keys came before; slot = #kept before
    kept_greater = tl.zeros([], dtype=tl.int32)
    seen_equal = tl.zeros([], dtype=tl.int32)
    for start in range(0, listed, CHUNK):
        n = start + offs
        n_ok = n < listed
        key = tl.load(LIST_KEY + n, mask=n_ok, other=-1)
        neuron = tl.load(LIST_IDX + n, mask=n_ok, other=0)
        gt = (key > threshold).to(tl.int32)
        eq = (key == threshold).to(tl.int32)
        packed = tl.cumsum(gt | (eq << 16), axis=0)
        gt_before = kept_greater + (packed & 0xFFFF) - gt
        eq_before = seen_equal + (packed >> 16) - eq
        kept = (gt == 1) | ((eq == 1) & (eq_before < need))
        tl.store(IDX + gt_before + tl.minimum(eq_before, need), neuron.to(tl.int64), mask=kept)
        chunk_total = tl.max(packed, axis=0)
        kept_greater += chunk_total & 0xFFFF
        seen_equal += chunk_total >> 16



@triton.jit
def _mlp_route_kernel(
    LOW, W_OUT, SCORES, HIST, ARRIVED, CAND, LIST_KEY, LIST_IDX, IDX, rows, ffn, rank, k,
    stride_ln, stride_lr, stride_wf, stride_wr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NUM_BINS: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_OFFSET: tl.constexpr,
    CHUNK: tl.constexpr, CAPACITY: tl.constexpr,
):
    # LOW: [N, rank]   W_OUT: [ffn, rank]   SCORES: [ffn] fp32   IDX: [k] int64, ascending
    # HIST: [NUM_BINS] int32, ARRIVED: [] int32, zero on entry
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < ffn
    offs_r = tl.arange(0, BLOCK_R)
    total = tl.zeros([BLOCK_F], dtype=tl.float32)
    for n0 in range(0, rows, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < rows
        acc = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + offs_r
            r_ok = r < rank
            low = tl.load(LOW + offs_n[:, None] * stride_ln + r[None, :] * stride_lr,
                          mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
            w = tl.load(W_OUT + offs_f[:, None] * stride_wf + r[None, :] * stride_wr,
                        mask=f_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_F, BLOCK_R]
            acc = tl.dot(low.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
        acc = tl.where(acc < 0, 0.0, acc)  # ReLU; NaN stays NaN
        total += tl.sum(tl.where(n_ok[:, None], acc, 0.0), axis=0)
    tl.store(SCORES + offs_f, total, mask=f_ok)
    if _count_and_arrive(HIST, ARRIVED, _score_key(total), f_ok, BLOCK_F, NUM_BINS, BIN_SHIFT, BIN_OFFSET):
        _select(SCORES, HIST, ARRIVED, CAND, LIST_KEY, LIST_IDX, IDX, ffn, k,
                NUM_BINS, BIN_SHIFT, BIN_OFFSET, CHUNK, CAPACITY)


@triton.jit
def _top_k_kernel(
    SCORES, HIST, ARRIVED, CAND, LIST_KEY, LIST_IDX, IDX, ffn, k,
    BLOCK_F: tl.constexpr, NUM_BINS: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_OFFSET: tl.constexpr,
    CHUNK: tl.constexpr, CAPACITY: tl.constexpr,
):
    # The selection half alone, on given scores (tests, and timing it apart): SCORES [ffn] fp32 -> IDX [k] int64
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < ffn
    key = _score_key(tl.load(SCORES + offs_f, mask=f_ok, other=0.0))
    if _count_and_arrive(HIST, ARRIVED, key, f_ok, BLOCK_F, NUM_BINS, BIN_SHIFT, BIN_OFFSET):
        _select(SCORES, HIST, ARRIVED, CAND, LIST_KEY, LIST_IDX, IDX, ffn, k,
                NUM_BINS, BIN_SHIFT, BIN_OFFSET, CHUNK, CAPACITY)


def _workspace(device: torch.device) -> Tensor:
    """A zeroed int32 [NUM_BINS + 1] (the histogram, then the arrival counter) for one launch: one memset per call.
    A workspace cached across calls (kept zero by each launch's last program) broke Inductor's CUDA-graph trees:
    first allocated during their warm-up run, it was a live tensor of the graphs' memory pool that no graph
    output tracked (H200, torch 2.11)."""
    return torch.zeros(_NUM_BINS + 1, dtype=torch.int32, device=device)


def _selection_buffers(ffn: int, capacity: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(candidate buffer [capacity], list keys [ffn], list indices [ffn]) int32: scratch, no zeroing needed."""
    scratch = torch.empty(capacity + 2 * ffn, dtype=torch.int32, device=device)
    return scratch[:capacity], scratch[capacity:capacity + ffn], scratch[capacity + ffn:]


def top_k_ascending_triton(scores: Tensor, k: int, *, out: Tensor | None = None, capacity: int = _CAPACITY) -> Tensor:
    """The selection half alone: the k largest fp32 ``scores`` [ffn] as int64 indices in ascending order, as
    ``ops._top_k_ascending``. ``capacity`` (a power of two) sizes the candidate buffer; tests shrink it."""
    ffn = scores.shape[0]
    assert scores.dtype == torch.float32 and ffn <= MAX_SELECT_NEURONS and 1 <= k <= ffn
    idx = torch.empty(k, dtype=torch.int64, device=scores.device) if out is None else out
    workspace = _workspace(scores.device)
    cand, list_key, list_idx = _selection_buffers(ffn, capacity, scores.device)
    wrap_triton(_top_k_kernel)[(triton.cdiv(ffn, _BLOCK_F),)](
        scores, workspace, workspace[_NUM_BINS:], cand, list_key, list_idx, idx, ffn, k,
        BLOCK_F=_BLOCK_F, NUM_BINS=_NUM_BINS, BIN_SHIFT=_BIN_SHIFT, BIN_OFFSET=_BIN_OFFSET,
        CHUNK=_CHUNK, CAPACITY=capacity, num_warps=_NUM_WARPS,
    )
    return idx


def mlp_route_triton(x: Tensor, w_in: Tensor, w_out: Tensor, k: int, *, scores: Tensor | None = None) -> Tensor:
    """``polar::mlp_route`` on CUDA (fp16/bf16): cuBLAS for ``x @ w_in^T``, then the kernel above. ``scores``
    (fp32 [ffn]), when given, receives the neurons' scores (tests)."""
    rows = x.reshape(-1, x.shape[-1])
    low = torch.nn.functional.linear(rows, w_in)  # [N, rank] in x's dtype
    ffn, rank = w_out.shape
    assert ffn <= MAX_SELECT_NEURONS and 1 <= k <= ffn
    if scores is None:
        scores = torch.empty(ffn, dtype=torch.float32, device=x.device)
    idx = torch.empty(k, dtype=torch.int64, device=x.device)
    workspace = _workspace(x.device)
    cand, list_key, list_idx = _selection_buffers(ffn, _CAPACITY, x.device)
    dot_dtype, dot_precision = dot_types(x.dtype, x.device)
    block_n = min(64, max(16, triton.next_power_of_2(low.shape[0])))
    wrap_triton(_mlp_route_kernel)[(triton.cdiv(ffn, _BLOCK_F),)](
        low, w_out, scores, workspace, workspace[_NUM_BINS:], cand, list_key, list_idx, idx,
        low.shape[0], ffn, rank, k,
        low.stride(0), low.stride(1), w_out.stride(0), w_out.stride(1),
        BLOCK_N=block_n, BLOCK_F=_BLOCK_F, BLOCK_R=_BLOCK_R, DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision,
        NUM_BINS=_NUM_BINS, BIN_SHIFT=_BIN_SHIFT, BIN_OFFSET=_BIN_OFFSET, CHUNK=_CHUNK, CAPACITY=_CAPACITY,
        num_warps=_NUM_WARPS,
    )
    return idx

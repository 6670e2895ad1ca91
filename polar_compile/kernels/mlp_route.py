"""The MLP router: ``low = x @ w_in^T``, then three Triton launches. ``sum_rows relu(low @ w_out^T)`` over the
neurons, then the k best neurons in ascending index order, exact (as ``ops.mlp_route_reference``: ties to the lower
index, NaN lowest, -0.0 == +0.0).

``low`` ([N, rank], in x's dtype) comes from ``_low_kernel`` for a decode batch of at most LOW_SPLIT_ROWS rows: the
hidden dim split over programs that store fp32 partials, the last-arriving program of each rank block summing them
in split order (the same bits every run) and rounding to x's dtype. cuBLAS runs a split-K GEMM and a reduction
kernel here: 4.0 + 1.4 / 4.8 + 1.8 µs at OPT-6.7B / 66B B=1 against 3.8 / 6.2 µs for this launch in the router
(H200, ``benchmarks/mlp_profile.py --parts route``; ``--parts low`` times the launch alone); at B=64 cuBLAS was
faster, and larger batches keep it. Scores are sums of ReLUs (>= 0, or NaN), so as int keys ``bits(score) + 1``
(NaN -> 0, -0.0 -> +0.0) they order as the floats do. ``_bin`` maps keys to NUM_BINS histogram bins, monotone (64
bins per binade over [2**-32, 2**32), clamped outside).

A. ``_scores_kernel`` (or ``_histogram_kernel`` on given scores), one program per BLOCK_F neurons: the scores
   (``relu(low @ w_out[neurons]^T)`` summed over the rows, fp32), stored; their keys added to a global histogram,
   one atomic per distinct bin of the block, adjacent bins on different L2 lines (``_slot``).
B. ``_boundary_kernel``, one program per CHUNK keys: from the histogram (each program alone, redundantly) the
   boundary bin b* holding the k-th largest key and ``above`` = #{keys in bins > b*}; for its chunk, ``counts[p]``
   = #{keys in bins > b*}, and its keys of bin b* with their indices appended to a candidate buffer of CAPACITY at
   slots from one atomic counter (in no particular order; past CAPACITY only counted).
C. ``_write_kernel``, one program per CHUNK keys, each alone: T = the k-th largest key, by a search between the
   smallest and the largest candidate, counting in registers: five-way over SMALL slots (four probes a reduction,
   <= 8 steps), binary over CAPACITY slots; when the buffer overflowed, a binary search counting over every key of
   bin b* read chunk by chunk (slow, exact, rare — a bin crowded by equal scores, e.g. dead neurons all exactly 0,
   has min == max and needs no step). Keys > T are all kept, keys == T the ``need`` lowest indices.
   Each kept key goes to slot #{kept keys before it} = #{keys > T before it} + min(need, #{keys == T before it}):
   before the chunk from ``counts`` and the candidates, within it from one prefix sum. So ``idx`` is in ascending
   index order and each of its k slots is written exactly once, whatever the scores.

Why three launches: a single launch whose last-arriving program selected alone, serially, measured 27 µs (ffn
16384) to 50 µs (36864) for the selection on the H200, as long as the sparse MLP it steers. Launch boundaries order
every memory access between the steps. A graph node costs ~1 µs (an empty kernel 0.6 µs, a dependent load and
store 1.1 µs, a memset 1.2 µs); each launch's own chain of dependent memory round trips and block reductions
(3.7-4.8 µs for B and C) is the larger cost.

The histogram, the candidate counter and ``_low_kernel``'s arrival counters live in a zeroed workspace allocated per
call (``_workspace``: one memset); the other buffers are scratch. Grids depend on shapes only: no host sync,
CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import dot_types

__all__ = ["LOW_SPLIT_ROWS", "MAX_SELECT_NEURONS", "mlp_route_triton", "top_k_ascending_triton"]

MAX_SELECT_NEURONS = 65536  # wider layers take the op's reference path: the widths tested and timed (no hard limit)
LOW_SPLIT_ROWS = 16  # decode batches up to this many rows get x @ w_in^T from _low_kernel, larger ones from cuBLAS
_BLOCK_RL = 16  # rank rows of w_in per program of _low_kernel
_BLOCK_H = 128  # hidden columns per loop step of _low_kernel
_MAX_LOW_SPLITS = 16
_BLOCK_F = 64  # neurons per program of launch A
_BLOCK_R = 64  # rank columns per loop step
_NUM_BINS = 4096  # histogram bins: 64 per binade (key >> 17) over 64 binades from 2**-32 (key 95 << 23)
_BIN_SHIFT = 17
_BIN_OFFSET = 95 << 6
_CHUNK = 1024  # keys per program of launches B and C; < 2**15: two counts share an int32 prefix sum
_NUM_WARPS = 4
_CAPACITY = 4096  # candidates of the boundary bin, searched in registers by every program of launch C
_SMALL = 256  # ... over a vector this wide when they fit (a reduction over CAPACITY per search step costs)


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
def _slot(b, NUM_BINS: tl.constexpr):
    """Where bin b's count lives in HIST: consecutive bins 32 slots (128 bytes) apart, so the few dozen bins that
    a layer's scores crowd into spread over many L2 lines instead of sharing a handful (their atomics serialize per
    line: the scores launch measured up to 2.8 µs faster on the H200, none at OPT-6.7B B=1;
    ``benchmarks/mlp_histogram.py``)."""
    LINES: tl.constexpr = NUM_BINS // 32
    return (b % LINES) * 32 + b // LINES


@triton.jit
def _histogram_in_bin_order(HIST, NUM_BINS: tl.constexpr):
    """HIST's counts, [NUM_BINS] in bin order: loaded whole lines at a time (a load through ``_slot`` touches one
    line per bin: 2.8 µs slower), then transposed in registers."""
    LINES: tl.constexpr = NUM_BINS // 32
    slots = tl.load(HIST + tl.arange(0, LINES)[:, None] * 32 + tl.arange(0, 32)[None, :])  # [LINES, 32]
    return tl.reshape(tl.trans(slots), [NUM_BINS])  # bin j * LINES + line was at [line, j]


@triton.jit
def _add_to_histogram(HIST, key, ok, BLOCK: tl.constexpr,
                      NUM_BINS: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_OFFSET: tl.constexpr):
    """Adds this block's keys to HIST, one atomic per distinct bin: no same-address pile-up when many neurons share
    a bin."""
    # key: [BLOCK] int32   ok: [BLOCK] bool   HIST: [NUM_BINS] int32, bin b at _slot(b)
    b = tl.where(ok, _bin(key, NUM_BINS, BIN_SHIFT, BIN_OFFSET), -1)
    same = b[:, None] == b[None, :]  # [BLOCK, BLOCK]
    count = tl.sum(same.to(tl.int32), axis=1)
    earlier = tl.arange(0, BLOCK)[None, :] < tl.arange(0, BLOCK)[:, None]
    first = tl.sum((same & earlier).to(tl.int32), axis=1) == 0  # the block's first key in its bin
    tl.atomic_add(HIST + _slot(tl.maximum(b, 0), NUM_BINS), count, mask=ok & first, sem="relaxed")


@triton.jit
def _low_kernel(X, W_IN, PART, COUNTER, LOW, rows, hidden, rank, split_len,
                stride_xn, stride_xh, stride_wr, stride_wh,
                SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_RL: tl.constexpr, BLOCK_H: tl.constexpr,
                DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # X: [N, hidden], N <= BLOCK_N   W_IN: [rank, hidden]   PART: [SPLITS, N, rank] fp32
    # COUNTER: [rank blocks] int32, zero on entry   LOW: [N, rank] contiguous, x's dtype; grid (rank blocks, SPLITS)
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = pid_r * BLOCK_RL + tl.arange(0, BLOCK_RL)
    n_ok = offs_n < rows
    r_ok = offs_r < rank
    tile_ok = n_ok[:, None] & r_ok[None, :]
    stop = tl.minimum(split * split_len + split_len, hidden)
    acc = tl.zeros([BLOCK_N, BLOCK_RL], dtype=tl.float32)
    for h0 in range(split * split_len, stop, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_ok = h < stop
        x = tl.load(X + offs_n[:, None] * stride_xn + h[None, :] * stride_xh, mask=n_ok[:, None] & h_ok[None, :],
                    other=0.0)  # [BLOCK_N, BLOCK_H]
        w = tl.load(W_IN + offs_r[:, None] * stride_wr + h[None, :] * stride_wh, mask=r_ok[:, None] & h_ok[None, :],
                    other=0.0)  # [BLOCK_RL, BLOCK_H]
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    tile = offs_n[:, None] * rank + offs_r[None, :]
    tl.store(PART + split * rows * rank + tile, acc, mask=tile_ok)
    # every thread's partial store, then (the barrier orders them before it) one release-acquire count: the
    # program that counts last sees all the block's partials, read through L2 (".cg": other programs wrote them)
    tl.debug_barrier()
    if tl.atomic_add(COUNTER + pid_r, 1, sem="acq_rel") == SPLITS - 1:
        total = tl.zeros([BLOCK_N, BLOCK_RL], dtype=tl.float32)
        for s in tl.static_range(SPLITS):  # in split order: the same bits every run
            total += tl.load(PART + s * rows * rank + tile, mask=tile_ok, other=0.0, cache_modifier=".cg")
        tl.store(LOW + tile, total.to(LOW.dtype.element_ty), mask=tile_ok)


@triton.jit
def _neuron_scores(LOW, W_OUT, offs_f, f_ok, rows, rank, stride_ln, stride_lr, stride_wf, stride_wr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The neurons' scores: ``relu(low @ w_out[offs_f]^T)`` summed over the rows, [BLOCK_F] fp32."""
    # LOW: [N, rank]   W_OUT: [ffn, rank]   offs_f, f_ok: [BLOCK_F]
    offs_r = tl.arange(0, BLOCK_R)
    total = tl.zeros(offs_f.shape, dtype=tl.float32)
    for n0 in range(0, rows, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < rows
        acc = tl.zeros([BLOCK_N, offs_f.shape[0]], dtype=tl.float32)
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
    return total


@triton.jit
def _scores_kernel(
    LOW, W_OUT, SCORES, HIST, rows, ffn, rank,
    stride_ln, stride_lr, stride_wf, stride_wr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NUM_BINS: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_OFFSET: tl.constexpr,
):
    # Launch A. LOW: [N, rank]   W_OUT: [ffn, rank]   SCORES: [ffn] fp32   HIST: [NUM_BINS] int32, zero on entry
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < ffn
    total = _neuron_scores(LOW, W_OUT, offs_f, f_ok, rows, rank, stride_ln, stride_lr, stride_wf, stride_wr,
                           BLOCK_N, BLOCK_R, DOT_DTYPE, DOT_PRECISION)
    tl.store(SCORES + offs_f, total, mask=f_ok)
    _add_to_histogram(HIST, _score_key(total), f_ok, BLOCK_F, NUM_BINS, BIN_SHIFT, BIN_OFFSET)


@triton.jit
def _histogram_kernel(SCORES, HIST, ffn, BLOCK_F: tl.constexpr,
                      NUM_BINS: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_OFFSET: tl.constexpr):
    # Launch A on given scores (the selection alone: tests, and timing it apart). SCORES: [ffn] fp32
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < ffn
    key = _score_key(tl.load(SCORES + offs_f, mask=f_ok, other=0.0))
    _add_to_histogram(HIST, key, f_ok, BLOCK_F, NUM_BINS, BIN_SHIFT, BIN_OFFSET)


@triton.jit
def _boundary_kernel(SCORES, HIST, CAND_COUNT, COUNTS, META, CAND_KEY, CAND_IDX, ffn, k,
                     NUM_BINS: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_OFFSET: tl.constexpr,
                     CHUNK: tl.constexpr, CAPACITY: tl.constexpr):
    # Launch B. HIST: [NUM_BINS] int32, bin b at _slot(b)   CAND_COUNT: [] int32, zero on entry
    # COUNTS: [programs] int32   META: [2] int32 (boundary, above)   CAND_KEY, CAND_IDX: [CAPACITY] int32
    # at_or_above[b] = #{keys in bins >= b} is non-increasing, at_or_above[0] = ffn >= k
    pid = tl.program_id(0)
    n = pid * CHUNK + tl.arange(0, CHUNK)
    ok = n < ffn
    key = _score_key(tl.load(SCORES + n, mask=ok, other=0.0))
    hist = _histogram_in_bin_order(HIST, NUM_BINS)
    at_or_above = ffn - tl.cumsum(hist, axis=0) + hist  # every neuron has a bin: the histogram sums to ffn
    boundary = tl.sum((at_or_above >= k).to(tl.int32), axis=0) - 1
    above = tl.max(tl.where(at_or_above < k, at_or_above, 0), axis=0)  # < k <= above + hist[boundary]
    if pid == 0:
        tl.store(META, boundary)
        tl.store(META + 1, above)

    b = _bin(key, NUM_BINS, BIN_SHIFT, BIN_OFFSET)
    tl.store(COUNTS + pid, tl.sum((ok & (b > boundary)).to(tl.int32), axis=0))
    cand = ok & (b == boundary)
    local = tl.cumsum(cand.to(tl.int32), axis=0)
    start = tl.atomic_add(CAND_COUNT, tl.max(local, axis=0), sem="relaxed")
    slot = start + local - 1
    tl.store(CAND_KEY + slot, key, mask=cand & (slot < CAPACITY))
    tl.store(CAND_IDX + slot, n, mask=cand & (slot < CAPACITY))


@triton.jit
def _count_at_least(SCORES, end, boundary, least, NUM_BINS: tl.constexpr, BIN_SHIFT: tl.constexpr,
                    BIN_OFFSET: tl.constexpr, CHUNK: tl.constexpr):
    """#{n < end: key n in bin `boundary` and >= `least`}, reading the scores chunk by chunk (the overflow path)."""
    count = tl.zeros([], dtype=tl.int32)
    for start in range(0, end, CHUNK):
        n = start + tl.arange(0, CHUNK)
        key = _score_key(tl.load(SCORES + n, mask=n < end, other=0.0))
        in_bin = (n < end) & (_bin(key, NUM_BINS, BIN_SHIFT, BIN_OFFSET) == boundary)
        count += tl.sum((in_bin & (key >= least)).to(tl.int32), axis=0)
    return count


@triton.jit
def _threshold_of_candidates(CAND_KEY, CAND_IDX, cands, above, k, chunk_start, ffn, WIDTH: tl.constexpr,
                             PROBES: tl.constexpr, PACKED: tl.constexpr):
    """T = the k-th largest key: the largest key T with ``above`` + #{candidates >= T} >= k, by a (PROBES + 1)-way
    search between the smallest and the largest of the ``cands`` <= WIDTH candidates of bin b* held in registers;
    returns (T, #{keys > T}, #{candidates before the chunk > T}, #{... == T}).

    Each step counts the candidates at or above PROBES probes in one reduction (counts <= WIDTH < 2**16, in 16-bit
    fields of a PACKED integer: int32 for one probe, int64 for up to four): a bin spans 2**17 keys, so four probes
    take <= 8 dependent steps where a binary search (one probe) takes 17. Launch C on the H200 (OPT-6.7B B=1 / 64,
    OPT-66B B=1 / 64): binary everywhere 4.8 / 4.8 / 5.0 / 7.4 µs; five-way everywhere 4.3 / 4.8 / 4.5 / 8.5;
    five-way over SMALL and binary int32 over CAPACITY slots (as ``_write_kernel`` calls it) 4.5 / 4.7 / 4.8 /
    7.4."""
    c_offs = tl.arange(0, WIDTH)
    c_ok = c_offs < cands
    cand_key = tl.load(CAND_KEY + c_offs, mask=c_ok, other=-1)  # -1: below every key
    cand_before = tl.load(CAND_IDX + c_offs, mask=c_ok, other=ffn) < chunk_start
    lo = tl.min(tl.where(c_ok, cand_key, 0x7FFFFFFF), axis=0)  # #{keys >= lo} = above + cands >= k
    hi = tl.max(cand_key, axis=0) + 1  # #{keys >= hi} = above < k
    while hi - lo > 1:
        part = (hi - lo) // (PROBES + 1)
        rest = (hi - lo) % (PROBES + 1)  # probe i = lo + floor((hi - lo) * i / (PROBES + 1)), no int32 overflow
        packed = tl.zeros([WIDTH], dtype=PACKED)
        for i in tl.static_range(1, PROBES + 1):
            packed |= (cand_key >= lo + part * i + rest * i // (PROBES + 1)).to(PACKED) << (16 * (i - 1))
        packed = tl.sum(packed, axis=0)
        new_lo = lo
        new_hi = hi
        for i in tl.static_range(1, PROBES + 1):  # probes ascend, so "enough" holds for a prefix of them
            probe = lo + part * i + rest * i // (PROBES + 1)
            enough = above + ((packed >> (16 * (i - 1))) & 0xFFFF).to(tl.int32) >= k
            new_lo = tl.where(enough, tl.maximum(new_lo, probe), new_lo)
            new_hi = tl.where(enough, new_hi, tl.minimum(new_hi, probe))
        lo = new_lo
        hi = new_hi
    gt = cand_key > lo
    greater = above + tl.sum(gt.to(tl.int32), axis=0)
    bin_gt_before = tl.sum((cand_before & gt).to(tl.int32), axis=0)
    eq_before = tl.sum((cand_before & (cand_key == lo)).to(tl.int32), axis=0)
    return lo, greater, bin_gt_before, eq_before


@triton.jit
def _write_kernel(SCORES, CAND_COUNT, COUNTS, META, CAND_KEY, CAND_IDX, IDX, ffn, k,
                  NUM_BINS: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_OFFSET: tl.constexpr,
                  CHUNK: tl.constexpr, CAPACITY: tl.constexpr, SMALL: tl.constexpr, PROGRAMS: tl.constexpr):
    # Launch C. COUNTS: [programs] int32   IDX: [k] int64, ascending; the rest as launch B
    pid = tl.program_id(0)
    chunk_start = pid * CHUNK
    boundary = tl.load(META)
    above = tl.load(META + 1)
    q = tl.arange(0, PROGRAMS)
    gt_before = tl.sum(tl.load(COUNTS + q, mask=q < pid, other=0), axis=0)  # keys in bins > b* before the chunk
    cands = tl.load(CAND_COUNT)
    # T = the largest key with #{keys >= T} >= k, between the smallest and the largest key of bin b*;
    # then #{keys > T}, and #{keys of bin b* before the chunk} that are > T and == T
    if cands <= SMALL:  # the usual case: a boundary bin of a few keys, searched over a narrow vector
        lo, greater, bin_gt_before, eq_before = _threshold_of_candidates(
            CAND_KEY, CAND_IDX, cands, above, k, chunk_start, ffn, SMALL, 4, tl.int64)
    elif cands <= CAPACITY:
        lo, greater, bin_gt_before, eq_before = _threshold_of_candidates(
            CAND_KEY, CAND_IDX, cands, above, k, chunk_start, ffn, CAPACITY, 1, tl.int32)
    else:  # the buffer overflowed: the same over every key of bin b*, read from the scores
        lo = tl.full([], 0x7FFFFFFF, dtype=tl.int32)
        hi = tl.zeros([], dtype=tl.int32)
        for start in range(0, ffn, CHUNK):
            n = start + tl.arange(0, CHUNK)
            key = _score_key(tl.load(SCORES + n, mask=n < ffn, other=0.0))
            in_bin = (n < ffn) & (_bin(key, NUM_BINS, BIN_SHIFT, BIN_OFFSET) == boundary)
            lo = tl.minimum(lo, tl.min(tl.where(in_bin, key, 0x7FFFFFFF), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(in_bin, key, -1), axis=0) + 1)
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            count = _count_at_least(SCORES, ffn, boundary, mid, NUM_BINS, BIN_SHIFT, BIN_OFFSET, CHUNK)
            enough = above + count >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        greater = above + _count_at_least(SCORES, ffn, boundary, lo + 1, NUM_BINS, BIN_SHIFT, BIN_OFFSET, CHUNK)
        bin_gt_before = _count_at_least(SCORES, chunk_start, boundary, lo + 1, NUM_BINS, BIN_SHIFT, BIN_OFFSET, CHUNK)
        eq_before = _count_at_least(SCORES, chunk_start, boundary, lo, NUM_BINS, BIN_SHIFT, BIN_OFFSET,
                                    CHUNK) - bin_gt_before
    threshold = lo
    need = k - greater  # >= 1 keys equal to T to keep: the lowest indices
    gt_before += bin_gt_before

    # kept: key > T, or key == T with fewer than `need` equal keys before it; slot = #kept before it
    n = chunk_start + tl.arange(0, CHUNK)
    key = _score_key(tl.load(SCORES + n, mask=n < ffn, other=0.0))
    gt = ((n < ffn) & (key > threshold)).to(tl.int32)
    eq = ((n < ffn) & (key == threshold)).to(tl.int32)
    packed = tl.cumsum(gt | (eq << 16), axis=0)
    gt_at = gt_before + (packed & 0xFFFF) - gt  # #{keys > T before n}
    eq_at = eq_before + (packed >> 16) - eq  # #{keys == T before n}
    kept = (gt == 1) | ((eq == 1) & (eq_at < need))
    tl.store(IDX + gt_at + tl.minimum(eq_at, need), n.to(tl.int64), mask=kept)


def _workspace(device: torch.device, counters: int = 0) -> Tensor:
    """A zeroed int32 [NUM_BINS + 1 + counters] (the histogram, the candidate counter, then ``_low_kernel``'s
    arrival counters) for one call: one memset.
    A workspace cached across calls (kept zero by the launches) broke Inductor's CUDA-graph trees: first
    allocated during their warm-up run, it was a live tensor of the graphs' memory pool that no graph output
    tracked (H200, torch 2.11)."""
    return torch.zeros(_NUM_BINS + 1 + counters, dtype=torch.int32, device=device)


def _select(scores: Tensor, workspace: Tensor, idx: Tensor, k: int, chunk: int, capacity: int) -> None:
    """Launches B and C: ``idx`` [k] <- the k largest ``scores`` [ffn] in ascending index order, given their
    histogram (in ``workspace``, from launch A)."""
    ffn = scores.shape[0]
    programs = triton.cdiv(ffn, chunk)
    scratch = torch.empty(programs + 2 + 2 * capacity, dtype=torch.int32, device=scores.device)
    counts, meta = scratch[:programs], scratch[programs:programs + 2]
    cand_key, cand_idx = scratch[programs + 2:programs + 2 + capacity], scratch[programs + 2 + capacity:]
    cand_count = workspace[_NUM_BINS:_NUM_BINS + 1]
    bins = dict(NUM_BINS=_NUM_BINS, BIN_SHIFT=_BIN_SHIFT, BIN_OFFSET=_BIN_OFFSET, CHUNK=chunk, CAPACITY=capacity)
    wrap_triton(_boundary_kernel)[(programs,)](
        scores, workspace, cand_count, counts, meta, cand_key, cand_idx, ffn, k, **bins, num_warps=_NUM_WARPS)
    wrap_triton(_write_kernel)[(programs,)](
        scores, cand_count, counts, meta, cand_key, cand_idx, idx, ffn, k, **bins,
        SMALL=min(_SMALL, capacity), PROGRAMS=triton.next_power_of_2(programs), num_warps=_NUM_WARPS)


def top_k_ascending_triton(scores: Tensor, k: int, *, out: Tensor | None = None, capacity: int = _CAPACITY,
                           chunk: int = _CHUNK) -> Tensor:
    """The selection alone: the k largest fp32 ``scores`` [ffn] as int64 indices in ascending order, as
    ``ops._top_k_ascending``. ``capacity`` (candidate buffer) and ``chunk`` (keys per program), powers of two:
    tests shrink them."""
    ffn = scores.shape[0]
    assert scores.dtype == torch.float32 and ffn <= MAX_SELECT_NEURONS and 1 <= k <= ffn and chunk < 2**15
    idx = torch.empty(k, dtype=torch.int64, device=scores.device) if out is None else out
    workspace = _workspace(scores.device)
    wrap_triton(_histogram_kernel)[(triton.cdiv(ffn, _BLOCK_F),)](
        scores, workspace, ffn, BLOCK_F=_BLOCK_F, NUM_BINS=_NUM_BINS, BIN_SHIFT=_BIN_SHIFT, BIN_OFFSET=_BIN_OFFSET,
        num_warps=_NUM_WARPS)
    _select(scores, workspace, idx, k, chunk, capacity)
    return idx


def _low(rows: Tensor, w_in: Tensor, workspace: Tensor) -> Tensor:
    """``rows @ w_in^T`` [N <= LOW_SPLIT_ROWS, rank] in rows' dtype by ``_low_kernel``, its arrival counters the
    zeroed tail of ``workspace``."""
    n, hidden = rows.shape
    rank = w_in.shape[0]
    splits = min(_MAX_LOW_SPLITS, triton.cdiv(hidden, 2 * _BLOCK_H))  # >= 2 chunks a split
    split_len = triton.cdiv(triton.cdiv(hidden, splits), _BLOCK_H) * _BLOCK_H
    splits = triton.cdiv(hidden, split_len)  # every split non-empty
    part = torch.empty(splits, n, rank, dtype=torch.float32, device=rows.device)
    low = torch.empty(n, rank, dtype=rows.dtype, device=rows.device)
    dot_dtype, dot_precision = dot_types(rows.dtype, rows.device)
    wrap_triton(_low_kernel)[(triton.cdiv(rank, _BLOCK_RL), splits)](
        rows, w_in, part, workspace[_NUM_BINS + 1:], low, n, hidden, rank, split_len,
        rows.stride(0), rows.stride(1), w_in.stride(0), w_in.stride(1),
        SPLITS=splits, BLOCK_N=max(16, triton.next_power_of_2(n)), BLOCK_RL=_BLOCK_RL, BLOCK_H=_BLOCK_H,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision, num_warps=_NUM_WARPS)
    return low


def mlp_route_triton(x: Tensor, w_in: Tensor, w_out: Tensor, k: int, *, scores: Tensor | None = None) -> Tensor:
    """``polar::mlp_route`` on CUDA (fp16/bf16): ``x @ w_in^T`` (``_low_kernel`` up to LOW_SPLIT_ROWS rows, cuBLAS
    above), then launches A, B, C. ``scores`` (fp32 [ffn]), when given, receives the neurons' scores (tests)."""
    rows = x.reshape(-1, x.shape[-1])
    ffn, rank = w_out.shape
    assert ffn <= MAX_SELECT_NEURONS and 1 <= k <= ffn
    if scores is None:
        scores = torch.empty(ffn, dtype=torch.float32, device=x.device)
    idx = torch.empty(k, dtype=torch.int64, device=x.device)
    if rows.shape[0] <= LOW_SPLIT_ROWS:
        workspace = _workspace(x.device, triton.cdiv(rank, _BLOCK_RL))
        low = _low(rows, w_in, workspace)
    else:
        workspace = _workspace(x.device)
        low = torch.nn.functional.linear(rows, w_in)  # [N, rank] in x's dtype
    dot_dtype, dot_precision = dot_types(x.dtype, x.device)
    block_n = min(64, max(16, triton.next_power_of_2(low.shape[0])))
    wrap_triton(_scores_kernel)[(triton.cdiv(ffn, _BLOCK_F),)](
        low, w_out, scores, workspace, low.shape[0], ffn, rank,
        low.stride(0), low.stride(1), w_out.stride(0), w_out.stride(1),
        BLOCK_N=block_n, BLOCK_F=_BLOCK_F, BLOCK_R=_BLOCK_R, DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision,
        NUM_BINS=_NUM_BINS, BIN_SHIFT=_BIN_SHIFT, BIN_OFFSET=_BIN_OFFSET, num_warps=_NUM_WARPS,
    )
    _select(scores, workspace, idx, k, _CHUNK, _CAPACITY)
    return idx

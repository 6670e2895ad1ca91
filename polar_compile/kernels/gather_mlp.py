"""The whole sparse MLP of a small decode batch in one launch: gather_up (or gather_gated_up), then gather_down.

With idx [k] the neurons selected for the whole batch (N <= 64 tokens), in fp32:

    h[n, j]   = relu(x[n] . w[idx[j]] + b[idx[j]])                  (gated: times x[n] . w_up[idx[j]] + b_up[idx[j]])
    out[n, c] = sum_j round(h[n, j]) * w_t[idx[j], c] + b_down[c]   round: to x's dtype, as between the two ops

Why one launch: at decode each gather op costs a fixed ~5 us besides its bytes, and is two launches (split-K kernel
+ finish), so the fixed cost, not the bandwidth, is what the two-op path loses to. Algorithm, grid cdiv(k, BLOCK_J):

1. Program p owns the BLOCK_J neurons idx[p*BLOCK_J : (p+1)*BLOCK_J] and computes their h tile [BLOCK_N, BLOCK_J]
   (all N rows; rows past N are masked out below) streaming d in BLOCK_R chunks: each selected row of w (and w_up)
   is read once in all. Bias, ReLU (times up), cast to x's dtype.
2. It then walks the output columns in groups of GROUP_D (starting at group p mod groups, so that different
   programs finish different groups last), each group in BLOCK_D-column tiles:  part = h @ w_t[neurons, tile]
   (fp32), added with ``tl.atomic_add`` (relaxed) into a persistent fp32 workspace WS [N, d_out].
3. After a group's adds: a CTA barrier, then ``arrived = atomic_add(COUNT[g], 1)`` (acq_rel, gpu scope; done by one
   thread: the barrier before it makes the other threads' adds part of what it releases). The program that
   arrives last (arrived == programs - 1) has acquired every program's adds to the group: it reads WS over the
   group (``.cg``: from L2, where the atomics land), adds b_down, casts, stores out, writes zeros back into WS and
   resets COUNT[g] to 0. Nobody waits for anybody (no spin): no co-residency assumption, no deadlock.

So WS and COUNT are all-zero again after every call (self-cleaning: no memset launch). They are cached per (device,
d_out) in this module and reused by every call: calls must run one after another (decode runs layers in order on
one stream); two concurrent calls with the same d_out on two streams are not supported. When traced (fake or
functional tensors), or when a CUDA graph is being captured and no workspace exists yet, a call gets a fresh
zeroed workspace instead: its zero-fill becomes part of the traced graph / the CUDA graph (a memset node, replayed
before the kernel), and a workspace allocated in a graph's private memory pool is never cached for use elsewhere.

Not deterministic: the fp32 atomic adds land in arrival order, so results may differ run to run by fp32 rounding of
the sum before the final cast (the two-op path is deterministic). Grid and workspace depend on shapes only: no
host sync, CUDA-graph safe. Indices outside [0, ffn) read zero weights and bias (as in ``gather_gemm``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import dot_types
from .gather_gemm import _up_epilogue

__all__ = ["FUSED_MAX_ROWS", "GatherMlpConfig", "cached_workspace", "gather_mlp_config", "gather_mlp_triton"]

FUSED_MAX_ROWS = 64  # rows (tokens) the fused kernel takes; the ops use the two-op kernels above it
_FINISH_ELEMENTS = 4096  # elements of WS one finishing step reads: [FIN_N, FIN_D] with FIN_N * FIN_D <= this


@triton.jit
def _gather_mlp_kernel(
    X, W_GATE, B_GATE, W_UP, B_UP, W_T, B_DOWN, IDX, OUT, WS, COUNT,
    rows, d, ffn, k, d_out, group_d,
    stride_xn, stride_xd,
    stride_wgf, stride_wgd, stride_bg,
    stride_wuf, stride_wud, stride_bu,
    stride_tf, stride_tc, stride_bd,
    stride_idx, stride_on, stride_oc, stride_wsn,
    GATED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    FIN_N: tl.constexpr, FIN_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # X: [N, d]   W_GATE, W_UP: [ffn, d]   B_GATE, B_UP: [ffn]   W_T: [ffn, d_out]   B_DOWN: [d_out]   IDX: [k] int64
    # OUT: [N, d_out]   WS: [>= N, d_out] fp32, zero on entry and exit   COUNT: [>= groups] int32, zero on entry/exit
    pid = tl.program_id(0)
    last = tl.num_programs(0) - 1
    offs_n = tl.arange(0, BLOCK_N)  # rows of x
    offs_j = pid * BLOCK_J + tl.arange(0, BLOCK_J)  # slots of idx
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_n < rows
    j_ok = offs_j < k
    neurons = tl.load(IDX + offs_j * stride_idx, mask=j_ok, other=0)  # [BLOCK_J] int64
    neuron_ok = j_ok & (neurons >= 0) & (neurons < ffn)

    # 1. h = relu(x @ w[neurons]^T + b[neurons]) (* up), [BLOCK_N, BLOCK_J], rounded to x's dtype
    gate = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    for r0 in range(0, d, BLOCK_R):
        r = r0 + offs_r  # [BLOCK_R] input features
        r_ok = r < d
        x = tl.load(X + offs_n[:, None] * stride_xn + r[None, :] * stride_xd,
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        w_ok = neuron_ok[:, None] & r_ok[None, :]
        w = tl.load(W_GATE + neurons[:, None] * stride_wgf + r[None, :] * stride_wgd,
                    mask=w_ok, other=0.0)  # [BLOCK_J, BLOCK_R]: the neurons' rows, contiguous along d
        gate = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), gate, input_precision=DOT_PRECISION)
        if GATED:
            w = tl.load(W_UP + neurons[:, None] * stride_wuf + r[None, :] * stride_wud, mask=w_ok, other=0.0)
            up = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), up, input_precision=DOT_PRECISION)
    h = _up_epilogue(gate, up, B_GATE, B_UP, neurons, neuron_ok, stride_bg, stride_bu, GATED)
    h = h.to(OUT.dtype.element_ty).to(DOT_DTYPE)  # zero in columns of invalid neurons

    # 2./3. out columns group by group: atomic partial sums, arrival count, the last arrival finishes the group
    fin_n = tl.arange(0, FIN_N)
    fin_row_ok = fin_n < rows
    groups = tl.cdiv(d_out, group_d)
    for step in range(0, groups):
        g = (pid + step) % groups
        start = g * group_d
        stop = tl.minimum(start + group_d, d_out)
        for c0 in range(start, stop, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)  # output features
            col_ok = cols < stop
            w = tl.load(W_T + neurons[:, None] * stride_tf + cols[None, :] * stride_tc,
                        mask=neuron_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_J, BLOCK_D]: rows of w_t
            part = tl.dot(h, w.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D] fp32
            tl.atomic_add(WS + offs_n[:, None] * stride_wsn + cols[None, :], part,
                          mask=row_ok[:, None] & col_ok[None, :], sem="relaxed", scope="gpu")
        tl.debug_barrier()  # every thread's adds to the group come before the release below
        arrived = tl.atomic_add(COUNT + g, 1, sem="acq_rel", scope="gpu")
        if arrived == last:  # every program's adds to the group are done and visible: finish it
            for f0 in range(start, stop, FIN_D):
                fin_c = f0 + tl.arange(0, FIN_D)
                fin_col_ok = fin_c < stop
                fin_ok = fin_row_ok[:, None] & fin_col_ok[None, :]
                ws_ptrs = WS + fin_n[:, None] * stride_wsn + fin_c[None, :]
                acc = tl.load(ws_ptrs, mask=fin_ok, other=0.0, cache_modifier=".cg")  # from L2: the atomics' sums
                acc += tl.load(B_DOWN + fin_c * stride_bd, mask=fin_col_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(OUT + fin_n[:, None] * stride_on + fin_c[None, :] * stride_oc,
                         acc.to(OUT.dtype.element_ty), mask=fin_ok)
                tl.store(ws_ptrs, tl.zeros([FIN_N, FIN_D], dtype=tl.float32), mask=fin_ok)
            tl.store(COUNT + g, 0)


# ---------------------------------------------------------------------------------------------------------------
# Launch heuristic and workspace
# ---------------------------------------------------------------------------------------------------------------


class GatherMlpConfig(NamedTuple):
    """How one fused sparse-MLP call is launched."""

    block_n: int  # rows of x per program: >= 16 (tl.dot) and >= N (one row block: each weight row read once)
    block_j: int  # selected neurons per program (>= 16, tl.dot); the grid is cdiv(k, block_j)
    block_r: int  # input features per step of the up phase
    block_d: int  # output features per tile of the down phase
    group_d: int  # output features per arrival counter (a multiple of block_d): its last arrival finishes them
    num_warps: int = 4
    num_stages: int = 3


def gather_mlp_config(rows: int, d: int, d_out: int, k: int, gated: bool, dtype: torch.dtype,
                      device: torch.device) -> GatherMlpConfig:
    """Launch configuration of the fused sparse MLP from shapes alone (static, so CUDA-graph safe).

    16 neurons a program (k=1638: 103 programs), d in chunks of 256 (128 for N > 16) and 128 output features a
    down tile (256 B of each gathered bf16 row a step). Output groups of ~4096 WS elements (at least a down tile,
    at least a quarter of d_out): one group at N=1 for d_out <= 4096, so each program takes one arrival counter
    round trip, while a larger batch spreads the finishing over the programs. Not yet tuned on a GPU
    (benchmarks/mlp.py --fused measures it); ``k``, ``gated``, ``dtype`` and ``device`` are for that tuning.
    """
    del k, gated, dtype, device
    block_n = max(16, triton.next_power_of_2(rows))
    block_d = 128
    group_d = min(triton.next_power_of_2(max(d_out, 1)), _FINISH_ELEMENTS // triton.next_power_of_2(max(rows, 1)))
    group_d = max(block_d, group_d, triton.next_power_of_2(triton.cdiv(d_out, 4)))
    return GatherMlpConfig(block_n, 16, 256 if block_n <= 16 else 128, block_d, group_d)


_WORKSPACES: dict[tuple[torch.device, int], tuple[Tensor, Tensor]] = {}


def _new_workspace(device: torch.device, d_out: int) -> tuple[Tensor, Tensor]:
    """(WS [FUSED_MAX_ROWS, d_out] fp32, COUNT [d_out] int32), zero: enough counters for any group_d >= 1."""
    return (torch.zeros((FUSED_MAX_ROWS, d_out), dtype=torch.float32, device=device),
            torch.zeros((max(d_out, 1),), dtype=torch.int32, device=device))


def _workspace(x: Tensor, d_out: int) -> tuple[Tensor, Tensor]:
    """The cached workspace of (x's device, d_out), allocated at the first eager call; a fresh zeroed one while
    tracing (x not a plain tensor) or while capturing a CUDA graph before any eager call (the CUDA graph's own
    memory, zeroed by a memset node at every replay: not cached, as the graph's memory pool owns it)."""
    if type(x) is not torch.Tensor:
        return _new_workspace(x.device, d_out)
    key = (x.device, d_out)
    if key not in _WORKSPACES:
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return _new_workspace(x.device, d_out)
        _WORKSPACES[key] = _new_workspace(x.device, d_out)
    return _WORKSPACES[key]


def cached_workspace(device: torch.device | str, d_out: int) -> tuple[Tensor, Tensor] | None:
    """The cached (WS, COUNT) of ``device`` and ``d_out``, or None before the first call (tests check that calls
    leave them zero)."""
    return _WORKSPACES.get((torch.device(device), d_out))


def gather_mlp_triton(
    x: Tensor, w: Tensor, b: Tensor, w_t: Tensor, b_down: Tensor, idx: Tensor,
    w_up: Tensor | None = None, b_up: Tensor | None = None,
    *, config: GatherMlpConfig | None = None, out: Tensor | None = None,
) -> Tensor:
    """``polar::gather_mlp`` in one launch of the kernel above, or ``polar::gather_gated_mlp`` when ``w_up, b_up``
    are given (``w, b`` are then the gate's). N <= FUSED_MAX_ROWS. ``config`` forces the launch configuration
    (tests, benchmarks); ``out`` is a preallocated ``[N, d_out]`` output (tests poison it)."""
    # x: [N, d]   w, w_up: [ffn, d]   b, b_up: [ffn]   w_t: [ffn, d_out]   b_down: [d_out]   idx: [k] int64
    rows, d = x.shape
    ffn, d_out = w_t.shape
    k = idx.shape[0]
    gated = w_up is not None
    assert rows <= FUSED_MAX_ROWS, f"the fused sparse MLP takes N <= {FUSED_MAX_ROWS} rows, got {rows}"
    assert w.shape == (ffn, d) and b.shape == (ffn,) and b_down.shape == (d_out,) and idx.dtype == torch.int64
    assert not gated or (w_up.shape == w.shape and b_up is not None and b_up.shape == b.shape)
    if config is None:
        config = gather_mlp_config(rows, d, d_out, k, gated, x.dtype, x.device)
    assert config.group_d % config.block_d == 0 and config.block_n >= rows
    if out is None:
        out = torch.empty((rows, d_out), dtype=x.dtype, device=x.device)
    assert out.shape == (rows, d_out) and out.dtype == x.dtype
    if out.numel() == 0:
        return out
    if not gated:
        w_up, b_up = w, b  # not read by the kernel
    ws, count = _workspace(x, d_out)
    fin_n = triton.next_power_of_2(rows)
    fin_d = min(1 << (config.group_d.bit_length() - 1), max(1, _FINISH_ELEMENTS // fin_n))  # powers of 2
    dot_dtype, dot_precision = dot_types(x.dtype, x.device)
    wrap_triton(_gather_mlp_kernel)[(triton.cdiv(k, config.block_j),)](
        x, w, b, w_up, b_up, w_t, b_down, idx, out, ws, count,
        rows, d, ffn, k, d_out, config.group_d,
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1), b.stride(0),
        w_up.stride(0), w_up.stride(1), b_up.stride(0),
        w_t.stride(0), w_t.stride(1), b_down.stride(0),
        idx.stride(0), out.stride(0), out.stride(1), ws.stride(0),
        GATED=gated,
        BLOCK_N=config.block_n, BLOCK_J=config.block_j, BLOCK_R=config.block_r, BLOCK_D=config.block_d,
        FIN_N=fin_n, FIN_D=fin_d,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out

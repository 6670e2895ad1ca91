"""What the MLP router's histogram costs its scores launch (launch A of ``kernels/mlp_route.py``), by layout of the
4096 bins in memory, on one GPU.

    python benchmarks/mlp_histogram.py [--models opt-6.7b,opt-66b] [--batches 1,16,64]

Each variant computes the same scores (``_neuron_scores``) and differs only in where the block's per-bin atomics go:
  spread      the router's layout: consecutive bins 128 bytes apart (``_slot``), over all of the histogram's lines
  contiguous  bin b at slot b: a layer's scores crowd a few dozen adjacent bins, a handful of L2 lines
  copies-4    contiguous, program p adding to copy p % 4 (launch B would then sum the copies)
  none        no histogram: the floor

Times are in-graph µs per call, the workspace memset included (medians of CUDA-graph replays, eight fresh weight
sets rotated).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlp_profile import RANKS, per_call_us, rotating, router_sets

from polar_compile.kernels import dot_types
from polar_compile.kernels import mlp_route as route_kernels

LAYOUTS = {"spread": 0, "contiguous": 1, "copies-4": 2, "none": 3}


@triton.jit
def _scores_layout_kernel(LOW, W_OUT, SCORES, HIST, rows, ffn, rank, stride_ln, stride_lr, stride_wf, stride_wr,
                          BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr,
                          DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          NUM_BINS: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_OFFSET: tl.constexpr,
                          LAYOUT: tl.constexpr):
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < ffn
    total = route_kernels._neuron_scores(LOW, W_OUT, offs_f, f_ok, rows, rank, stride_ln, stride_lr, stride_wf,
                                         stride_wr, BLOCK_N, BLOCK_R, DOT_DTYPE, DOT_PRECISION)
    tl.store(SCORES + offs_f, total, mask=f_ok)
    if LAYOUT == 0:
        route_kernels._add_to_histogram(HIST, route_kernels._score_key(total), f_ok, BLOCK_F, NUM_BINS, BIN_SHIFT,
                                        BIN_OFFSET)
    if LAYOUT == 1 or LAYOUT == 2:
        b = tl.where(f_ok, route_kernels._bin(route_kernels._score_key(total), NUM_BINS, BIN_SHIFT, BIN_OFFSET), -1)
        same = b[:, None] == b[None, :]
        count = tl.sum(same.to(tl.int32), axis=1)
        earlier = tl.arange(0, BLOCK_F)[None, :] < tl.arange(0, BLOCK_F)[:, None]
        first = tl.sum((same & earlier).to(tl.int32), axis=1) == 0
        base = HIST
        if LAYOUT == 2:
            base += (tl.program_id(0) % 4) * NUM_BINS
        tl.atomic_add(base + tl.maximum(b, 0), count, mask=f_ok & first, sem="relaxed")


def scores(s: dict, layout: int) -> None:
    """One scores launch on ``s["low"]`` into a fresh zeroed histogram of the given layout."""
    low, w_out = s["low"], s["w_out"]
    ffn, rank = w_out.shape
    hist = torch.zeros(4 * route_kernels._NUM_BINS + 1, dtype=torch.int32, device=low.device)
    dot_dtype, dot_precision = dot_types(low.dtype, low.device)
    _scores_layout_kernel[(triton.cdiv(ffn, route_kernels._BLOCK_F),)](
        low, w_out, s["scores"], hist, low.shape[0], ffn, rank,
        low.stride(0), low.stride(1), w_out.stride(0), w_out.stride(1),
        BLOCK_N=min(64, max(16, triton.next_power_of_2(low.shape[0]))), BLOCK_F=route_kernels._BLOCK_F,
        BLOCK_R=route_kernels._BLOCK_R, DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision,
        NUM_BINS=route_kernels._NUM_BINS, BIN_SHIFT=route_kernels._BIN_SHIFT, BIN_OFFSET=route_kernels._BIN_OFFSET,
        LAYOUT=layout, num_warps=route_kernels._NUM_WARPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="opt-6.7b,opt-66b")
    parser.add_argument("--batches", default="1,16,64")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("mlp_histogram.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16")
    print("| model | B | rank | " + " | ".join(f"{name} µs" for name in LAYOUTS) + " |")
    print("|---|---|---|" + "---|" * len(LAYOUTS))
    for model, batch in itertools.product(args.models.split(","), map(int, args.batches.split(","))):
        sets = router_sets(model)
        for s in sets:
            s["low"] = F.linear(torch.randn(batch, s["w_in"].shape[1], device="cuda", dtype=torch.bfloat16), s["w_in"])
            s["scores"] = torch.empty(s["w_out"].shape[0], device="cuda")
        times = [per_call_us(rotating(sets, lambda s, layout=layout: scores(s, layout)), 40) for layout in
                 LAYOUTS.values()]
        print(f"| {model} | {batch} | {RANKS[model]} | " + " | ".join(f"{us:.2f}" for us in times) + " |", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

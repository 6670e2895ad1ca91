"""Where the sparse MLP's microseconds go on one GPU: the kernels of the MLP router and of the gather-GEMMs, each
call's CUDA-graph replay and its kernels' durations from the profiler, plus the fixed cost of a graph node and
launch-parameter sweeps of the router's launches.

    python benchmarks/mlp_profile.py [--parts nodes,route,low,scores,select,gathers] [--models opt-6.7b,opt-66b]
                                     [--batches 1,16,64]

Parts (each prints its own lines):
  nodes    per-node cost inside one CUDA graph: an empty Triton kernel (1 and 132 programs), a dependent
           load->store kernel, a 16 KB memset (``torch.zeros``)
  route    ``polar::mlp_route`` (k = 10% of ffn, rank 192 / 432 as calibrate_mlp.auto_rank gives these shapes) and
           its cuBLAS ``x @ w_in^T`` alone: in-graph µs per call and each kernel's µs
  low      the router's split-K Triton ``x @ w_in^T`` (``_low_kernel``: fp32 partials, the last-arriving program of a
           rank block sums them in split order) for splits 4 / 8 / 16 and hidden chunks 128 / 256, with its own
           counter memset
  scores   the router's scores launch over BLOCK_F x BLOCK_R x num_warps x num_stages: the six fastest
  select   the selection launches alone (``top_k_ascending_triton``) over CHUNK x num_warps, and their kernels
  gathers  ``gather_up`` + ``gather_down`` at 10% of the neurons: in-graph µs and each kernel's µs

Inputs are fresh N(0, 1) (scaled) weights, eight sets rotated through each graph so no call finds its weights in L2
from the call before; times are medians of ``triton.testing.do_bench`` over graph replays.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlp

from polar_compile.kernels import dot_types
from polar_compile.kernels import mlp_route as route_kernels

RANKS = {"opt-6.7b": 192, "opt-66b": 432}
SETS = 8


def graph_of(fn: Callable[[], None], calls: int) -> torch.cuda.CUDAGraph:
    """``calls`` calls of ``fn`` captured in one CUDA graph, after a warm-up off the capture stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def per_call_us(fn: Callable[[], None], calls: int = 50) -> float:
    """Median µs per call of ``fn`` replayed inside one CUDA graph."""
    ms = triton.testing.do_bench(graph_of(fn, calls).replay, warmup=25, rep=100, return_mode="median")
    return 1000 * ms / calls


def kernel_table(fn: Callable[[], None], label: str, calls: int = 20) -> None:
    """Prints ``fn``'s in-graph µs per call, then each CUDA kernel's µs per call from the profiler."""
    graph = graph_of(fn, calls)
    graph.replay()
    torch.cuda.synchronize()
    replays = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = sorted(((event.self_device_time_total / (replays * calls), event.count / (replays * calls), event.key)
                   for event in prof.key_averages() if event.self_device_time_total > 0), reverse=True)
    print(f"## {label}: per call, in-graph {per_call_us(fn):.1f} us")
    for us, count, name in rows:
        if us > 0.05:
            print(f"   {us:7.2f} us  x{count:.1f}  {name[:60]}")
    sys.stdout.flush()


def rotating(sets: list[dict], call: Callable[[dict], object]) -> Callable[[], None]:
    """A no-argument function that calls ``call`` on the next of ``sets`` each time (captured: each in turn)."""
    turn = itertools.count()

    def next_call() -> None:
        call(sets[next(turn) % len(sets)])

    return next_call


@triton.jit
def _empty_kernel(P):
    tl.store(P + tl.program_id(0), 1)


@triton.jit
def _dependent_kernel(P, Q):
    tl.store(Q + tl.program_id(0), tl.load(P + tl.program_id(0)) + 1)


def low_split(x: torch.Tensor, w: torch.Tensor, splits: int, block_h: int) -> torch.Tensor:
    """``x @ w^T`` in x's dtype by the router's ``_low_kernel`` with ``splits`` x ``block_h`` (the router itself takes
    16 x 128 at these widths), its arrival counters zeroed by a memset of their own."""
    rows, hidden = x.shape
    rank = w.shape[0]
    blocks = triton.cdiv(rank, route_kernels._BLOCK_RL)
    split_len = triton.cdiv(triton.cdiv(hidden, splits), block_h) * block_h
    splits = triton.cdiv(hidden, split_len)
    counter = torch.zeros(blocks, dtype=torch.int32, device=x.device)
    part = torch.empty(splits, rows, rank, dtype=torch.float32, device=x.device)
    low = torch.empty(rows, rank, dtype=x.dtype, device=x.device)
    dot_dtype, dot_precision = dot_types(x.dtype, x.device)
    route_kernels._low_kernel[(blocks, splits)](
        x, w, part, counter, low, rows, hidden, rank, split_len, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        SPLITS=splits, BLOCK_N=max(16, triton.next_power_of_2(rows)), BLOCK_RL=route_kernels._BLOCK_RL,
        BLOCK_H=block_h, DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision, num_warps=route_kernels._NUM_WARPS)
    return low


def scores_launch(s: dict, block_f: int, block_r: int, num_warps: int, num_stages: int) -> None:
    """The router's scores launch (launch A of kernels/mlp_route.py) on ``s["low"]`` with the given parameters."""
    low, w_out = s["low"], s["w_out"]
    ffn, rank = w_out.shape
    dot_dtype, dot_precision = dot_types(low.dtype, low.device)
    route_kernels._scores_kernel[(triton.cdiv(ffn, block_f),)](
        low, w_out, s["scores"], s["workspace"], low.shape[0], ffn, rank,
        low.stride(0), low.stride(1), w_out.stride(0), w_out.stride(1),
        BLOCK_N=min(64, max(16, triton.next_power_of_2(low.shape[0]))), BLOCK_F=block_f, BLOCK_R=block_r,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision, NUM_BINS=route_kernels._NUM_BINS,
        BIN_SHIFT=route_kernels._BIN_SHIFT, BIN_OFFSET=route_kernels._BIN_OFFSET,
        num_warps=num_warps, num_stages=num_stages)


def profile_nodes() -> None:
    flags, copy = (torch.zeros(4096, dtype=torch.int32, device="cuda") for _ in range(2))
    print(f"empty kernel, 1 program: {per_call_us(lambda: _empty_kernel[(1,)](flags), 200):.2f} us a node")
    print(f"empty kernel, 132 programs: {per_call_us(lambda: _empty_kernel[(132,)](flags), 200):.2f} us a node")

    def chain() -> None:
        _dependent_kernel[(1,)](flags, copy)
        _dependent_kernel[(1,)](copy, flags)

    print(f"dependent load->store kernel: {per_call_us(chain, 100) / 2:.2f} us a node")
    print(f"memset of 16 KB: {per_call_us(lambda: torch.zeros(4129, dtype=torch.int32, device='cuda'), 200):.2f} us "
          "a node")


def router_sets(model: str) -> list[dict]:
    d, ffn = mlp.MODELS[model]
    rank = RANKS[model]
    return [dict(w_in=torch.randn(rank, d, device="cuda", dtype=torch.bfloat16) / d**0.5,
                 w_out=torch.randn(ffn, rank, device="cuda", dtype=torch.bfloat16) / rank**0.5,
                 k=round(0.1 * ffn)) for _ in range(SETS)]


def profile_router(model: str, batch: int, parts: set[str]) -> None:
    d = mlp.MODELS[model][0]
    sets = router_sets(model)
    for s in sets:
        s["x"] = torch.randn(batch, d, device="cuda", dtype=torch.bfloat16)
        s["low"] = F.linear(s["x"], s["w_in"])
        s["scores"] = torch.relu(torch.mm(s["low"], s["w_out"].T, out_dtype=torch.float32)).sum(0)
        s["workspace"] = torch.zeros(route_kernels._NUM_BINS + 1, dtype=torch.int32, device="cuda")
    label = f"{model} B={batch} r={RANKS[model]}"
    if "route" in parts:
        kernel_table(rotating(sets, lambda s: torch.ops.polar.mlp_route(s["x"], s["w_in"], s["w_out"], s["k"])),
                     f"mlp_route {label}")
        kernel_table(rotating(sets, lambda s: F.linear(s["x"], s["w_in"])), f"F.linear {label}")
    if "low" in parts:
        expected = sets[0]["low"].float()
        for splits, block_h in itertools.product((4, 8, 16), (128, 256)):
            error = (low_split(sets[0]["x"], sets[0]["w_in"], splits, block_h).float() - expected).norm()
            us = per_call_us(rotating(sets, lambda s, sp=splits, bh=block_h: low_split(s["x"], s["w_in"], sp, bh)))
            print(f"  split-K x @ w_in^T {label} splits={splits} block_h={block_h}: {us:.2f} us "
                  f"(relative error against cuBLAS {(error / expected.norm()).item():.1e})")
    if "scores" in parts:
        times = []
        for config in itertools.product((32, 64, 128), (64, 128), (4, 8), (2, 3, 4, 5)):
            try:
                times.append((per_call_us(rotating(sets, lambda s, c=config: scores_launch(s, *c)), 40), config))
            except Exception as error:  # a configuration the GPU cannot run: recorded, not fatal
                print(f"  scores {config}: {type(error).__name__}")
        current = dict((config, us) for us, config in times).get((64, 64, 4, 3), float("nan"))
        print(f"scores {label}: (BLOCK_F, BLOCK_R, warps, stages) = (64, 64, 4, 3) {current:.2f} us; fastest: "
              + ", ".join(f"{us:.2f} {config}" for us, config in sorted(times)[:6]), flush=True)
    if "select" in parts:
        expected = route_kernels.top_k_ascending_triton(sets[0]["scores"], sets[0]["k"])
        default_warps = route_kernels._NUM_WARPS
        for chunk, warps in itertools.product((512, 1024, 2048, 4096), (4, 8, 16)):
            route_kernels._NUM_WARPS = warps
            same = torch.equal(route_kernels.top_k_ascending_triton(sets[0]["scores"], sets[0]["k"], chunk=chunk),
                               expected)
            us = per_call_us(rotating(sets, lambda s, c=chunk: route_kernels.top_k_ascending_triton(
                s["scores"], s["k"], chunk=c)), 40)
            print(f"select {label} chunk={chunk} warps={warps}: {us:.2f} us, same indices: {same}", flush=True)
        route_kernels._NUM_WARPS = default_warps
        kernel_table(rotating(sets, lambda s: route_kernels.top_k_ascending_triton(s["scores"], s["k"])),
                     f"select {label}")


def profile_gathers(model: str, batch: int) -> None:
    d, ffn = mlp.MODELS[model]
    k = round(0.1 * ffn)
    sets = mlp.make_sets(d, ffn, torch.bfloat16, SETS)
    for s in sets:
        s["x"] = torch.randn(batch, d, device="cuda", dtype=torch.bfloat16)
        s["idx"] = torch.randperm(ffn, device="cuda")[:k].sort().values
    kernel_table(rotating(sets, mlp.polar), f"gathers {model} B={batch} k={k}", calls=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="nodes,route,low,gathers")
    parser.add_argument("--models", default="opt-6.7b,opt-66b")
    parser.add_argument("--batches", default="1,16,64")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("mlp_profile.py needs a CUDA GPU")
    parts = set(args.parts.split(","))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16")
    if "nodes" in parts:
        profile_nodes()
    for model, batch in itertools.product(args.models.split(","), map(int, args.batches.split(","))):
        if parts & {"route", "low", "scores", "select"}:
            profile_router(model, batch, parts)
        if "gathers" in parts:
            profile_gathers(model, batch)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

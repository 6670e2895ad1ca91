"""Sparse MLP on one GPU: cuBLAS dense against polar's gather-GEMMs, side by side in one process.

    python benchmarks/mlp.py [--models opt-6.7b,opt-66b] [--dtypes bf16,fp16] [--batches 1,8,16,32,64,128]
                             [--densities 0.1,0.25,0.5,1.0] [--out mlp.md]

For each model shape (OPT-6.7B: d 4096, ffn 16384; OPT-66B: d 9216, ffn 36864), dtype, batch B and neuron
density, with k = round(density * ffn) neurons idx (random, sorted as polar::mlp_route returns them):

    dense: F.linear(F.relu(F.linear(x, W1, b1)), W2, b2)                       cuBLAS, bias in the GEMM epilogue
    polar: gather_down(gather_up(x, W1, b1, idx), W2^T, b2, idx)               torch.ops.polar (Triton on CUDA)
    routed: idx = mlp_route(x, W_in, W_out, k), then polar                   + the MLP router, rank r from
                                                                             calibrate_mlp.auto_rank (3% rule)

Check first: polar's output must match the dense math on the same neurons, F.linear(relu(F.linear(x, W1[idx],
b1[idx])), W2[:, idx], b2) -- at density 1.0 that is the dense MLP's own output -- or the script stops.

Timing (as benchmarks/attention.py): each method runs inside one CUDA graph that calls it once per input set; the
sets are fresh N(0, 1) weights, x and idx, enough of them that one replay of polar at the lowest density reads
>= 256 MB of weights (the L2 is 60 MB), and triton.testing.do_bench times the replays (median, L2 flushed before
each) and divides by the number of sets. TB/s counts the weight bytes each method reads (dense: all of W1 and W2;
polar: the k selected rows of W1 and of W2^T). Prints a Markdown table (and writes it to --out if given).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import polar_compile.ops  # noqa: F401  (registers polar::gather_up, polar::gather_down)
from polar_compile.calibrate_mlp import auto_rank
from polar_compile.instrument_mlp import MlpInfo

MODELS = {"opt-6.7b": (4096, 16384), "opt-66b": (9216, 36864)}  # (d, ffn)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ROTATE_BYTES = 256 * 2**20
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative Frobenius error against dense math


def make_sets(d, ffn, dtype, sets):
    """``sets`` MLPs with fresh N(0, 1) weights scaled to keep activations O(1); W2t is polar's transposed copy."""
    out = []
    for _ in range(sets):
        w1 = torch.randn(ffn, d, device="cuda", dtype=dtype) / math.sqrt(d)
        w2 = torch.randn(d, ffn, device="cuda", dtype=dtype) / math.sqrt(ffn)
        out.append(dict(w1=w1, b1=torch.randn(ffn, device="cuda", dtype=dtype) * 0.1, w2=w2,
                        b2=torch.randn(d, device="cuda", dtype=dtype) * 0.1, w2t=w2.T.contiguous()))
    return out


def dense(s):
    return F.linear(F.relu(F.linear(s["x"], s["w1"], s["b1"])), s["w2"], s["b2"])


def polar(s):
    h = torch.ops.polar.gather_up(s["x"], s["w1"], s["b1"], s["idx"])
    return torch.ops.polar.gather_down(h, s["w2t"], s["b2"], s["idx"])


def routed(s):
    idx = torch.ops.polar.mlp_route(s["x"], s["w_in"], s["w_out"], s["idx"].shape[0])
    h = torch.ops.polar.gather_up(s["x"], s["w1"], s["b1"], idx)
    return torch.ops.polar.gather_down(h, s["w2t"], s["b2"], idx)


def check(s, density):
    """polar against the dense math on the selected neurons; raises on a mismatch."""
    idx = s["idx"]
    if density == 1.0:
        expected = dense(s)
    else:
        expected = F.linear(F.relu(F.linear(s["x"], s["w1"][idx], s["b1"][idx])), s["w2"][:, idx], s["b2"])
    got = polar(s)
    error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    if not error < TOLERANCE[got.dtype] or got.shape != expected.shape:
        raise AssertionError(f"polar differs from dense math: relative error {error:.3g} (shape {tuple(got.shape)})")
    return error


def time_us(fn, sets):
    """Median microseconds per call of ``fn`` over ``sets`` (one call per set), all captured in one CUDA graph."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, cuBLAS workspaces) outside the capture
        for s in sets:
            fn(s)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in sets:
            fn(s)
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    del graph
    return 1000 * ms / len(sets)


def run(models, dtypes, batches, densities, log):
    header = ("| model | dtype | B | density | k | dense µs | polar µs | speedup | dense TB/s | polar TB/s | "
              "check rel err | routed µs | routed speedup |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for line in rows:
        log(line)
    for model in models:
        d, ffn = MODELS[model]
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            size = torch.finfo(dtype).bits // 8
            least_read = 2 * round(min(densities) * ffn) * d * size
            mlps = make_sets(d, ffn, dtype, max(1, min(16, math.ceil(ROTATE_BYTES / least_read))))
            rank = auto_rank(MlpInfo(0, d, ffn))
            for s in mlps:
                s["w_in"] = torch.randn(rank, d, device="cuda", dtype=dtype) / math.sqrt(d)
                s["w_out"] = torch.randn(ffn, rank, device="cuda", dtype=dtype) / math.sqrt(rank)
            for batch in batches:
                for s in mlps:
                    s["x"] = torch.randn(batch, d, device="cuda", dtype=dtype)
                dense_us = time_us(dense, mlps)
                for density in densities:
                    k = round(density * ffn)
                    for s in mlps:
                        s["idx"] = torch.randperm(ffn, device="cuda")[:k].sort().values
                    error = max(check(s, density) for s in mlps)
                    polar_us = time_us(polar, mlps)
                    routed_us = time_us(routed, mlps)
                    line = (f"| {model} | {dtype_name} | {batch} | {density} | {k} | {dense_us:.1f} | {polar_us:.1f} | "
                            f"{dense_us / polar_us:.2f}x | {2 * ffn * d * size / dense_us / 1e6:.2f} | "
                            f"{2 * k * d * size / polar_us / 1e6:.2f} | {error:.1e} | {routed_us:.1f} | "
                            f"{dense_us / routed_us:.2f}x |")
                    rows.append(line)
                    log(line)
            del mlps
            torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="opt-6.7b,opt-66b", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated, of bf16, fp16")
    parser.add_argument("--batches", default="1,8,16,32,64,128")
    parser.add_argument("--densities", default="0.1,0.25,0.5,1.0")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/mlp.py times CUDA kernels and needs a CUDA GPU; on a CPU the polar ops run their "
                 "PyTorch reference implementations (the tests check those and the kernels).")
    models, dtypes = args.models.split(","), args.dtypes.split(",")
    for name, known in ((models, MODELS), (dtypes, DTYPES)):
        unknown = set(name) - set(known)
        if unknown:
            sys.exit(f"unknown {sorted(unknown)}; choose from {sorted(known)}")
    batches = [int(b) for b in args.batches.split(",")]
    densities = [float(p) for p in args.densities.split(",")]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = run(models, dtypes, batches, densities, lambda line: print(line, flush=True))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()

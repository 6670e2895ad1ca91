"""Time of the MLP router (``polar::mlp_route``: rank-r GEMMs, ReLU, batch sum, top-k in ascending index order) on one
GPU, beside the gather-GEMMs' dense MLP it steers, as ``benchmarks/mlp.py`` times (CUDA-graph replay over rotating
fresh inputs, medians). Its parts: the cuBLAS GEMM ``x @ w_in^T`` alone (the router's own first GEMM above 16 rows;
up to 16 rows it runs a split-K Triton launch, which ``benchmarks/mlp_profile.py --parts route,low`` times), and the
selection alone (the histogram, boundary-bin and write launches of ``kernels/mlp_route.py`` on given scores,
``top_k_ascending_triton``); the scores launch costs about the whole minus those two. Also times cuBLAS +
``torch.topk(sorted=False)``, an unsorted top-k.

    python benchmarks/mlp_router.py [--models opt-6.7b,opt-66b] [--batches 1,16,64] [--ranks 128,256,512]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import mlp

from polar_compile.kernels.mlp_route import top_k_ascending_triton


def unsorted_scores(s):
    low = F.linear(s["x"], s["w_in"])
    return torch.relu(torch.mm(low, s["w_out"].T, out_dtype=torch.float32)).sum(0)


def unsorted_route(s):
    return torch.topk(unsorted_scores(s), s["k"], sorted=False).indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="opt-6.7b,opt-66b")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--ranks", default="128,256,512")
    parser.add_argument("--density", type=float, default=0.1)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("mlp_router.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, density {args.density}")
    print("| model | B | rank | router bytes / MLP bytes | mlp_route µs | cuBLAS x @ w_in^T µs | select µs "
          "| topk-unsorted µs |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        d, ffn = mlp.MODELS[model]
        k = round(args.density * ffn)
        for rank in map(int, args.ranks.split(",")):
            sets = [dict(w_in=torch.randn(rank, d, device="cuda", dtype=torch.bfloat16) / d**0.5,
                         w_out=torch.randn(ffn, rank, device="cuda", dtype=torch.bfloat16) / rank**0.5, k=k)
                    for _ in range(8)]
            for batch in map(int, args.batches.split(",")):
                for s in sets:
                    s["x"] = torch.randn(batch, d, device="cuda", dtype=torch.bfloat16)
                    s["scores"] = unsorted_scores(s)  # what the select part ranks: the router's own scores
                routed = mlp.time_us(lambda s: torch.ops.polar.mlp_route(s["x"], s["w_in"], s["w_out"], s["k"]), sets)
                gemm = mlp.time_us(lambda s: F.linear(s["x"], s["w_in"]), sets)
                select = mlp.time_us(lambda s: top_k_ascending_triton(s["scores"], s["k"]), sets)
                unsorted = mlp.time_us(unsorted_route, sets)
                share = rank * (d + ffn) / (2 * d * ffn)
                print(f"| {model} | {batch} | {rank} | {share:.3f} | {routed:.1f} | {gemm:.1f} | {select:.1f} "
                      f"| {unsorted:.1f} |", flush=True)


if __name__ == "__main__":
    main()

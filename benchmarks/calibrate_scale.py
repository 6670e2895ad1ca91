"""Calibration at scale (issue 13): attention and MLP routers for a random-weight model of a real shape (default
OPT-6.7B, all 32 layers, bf16) on one GPU, from ``--tokens`` random token ids. Prints the wall time of
``polar_compile.calibrate``, the peak GPU memory beside the model's own bytes, the MLP routers' rank and the k table.

    python benchmarks/calibrate_scale.py                                   # OPT-6.7B, 400k tokens, on the GPU
    python benchmarks/calibrate_scale.py --samples 100000 --cache-dir /tmp # attention features per layer (disk)
    python benchmarks/calibrate_scale.py --device cpu --layers 1 --tokens 4096 --samples 1024   # a smoke run

Random weights route nothing meaningful (the recall printed says so); the run measures time and memory. The
attention features are memory-mapped on disk: ``--samples`` x hidden x 2 bytes per routed layer (OPT-6.7B at
100,000 samples: 0.8 GB a layer, 25 GB for 31 layers).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

import polar_compile
from polar_compile.bench.shapes import SHAPES


def main() -> None:
    """Build the model, calibrate, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="opt-6.7b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="default: all of the shape's")
    parser.add_argument("--tokens", type=int, default=400_000)
    parser.add_argument("--samples", type=int, default=100_000, help="attention router samples per layer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mlp-rank", default="auto")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cache-dir", default=None, help="where the attention features are memory-mapped")
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = SHAPES[args.shape](args.layers) if args.layers else SHAPES[args.shape]()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
    mlp_rank = args.mlp_rank if args.mlp_rank == "auto" else int(args.mlp_rank)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    print(f"{args.shape}: {config.num_hidden_layers} layers, {model_bytes / 2**30:.2f} GiB of weights ({dtype}), "
          f"{args.tokens} tokens, {args.samples} attention samples per layer, on {args.device}", flush=True)
    if args.cache_dir:
        os.makedirs(args.cache_dir, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as cache_dir:
        bank = polar_compile.calibrate(model, ids, tokens=args.tokens, samples=args.samples, cache_dir=cache_dir,
                                       batch_size=args.batch_size, mlp_rank=mlp_rank, progress=True)
    seconds = time.perf_counter() - start
    print(f"calibrate: {seconds / 60:.1f} min ({seconds:.0f} s)")
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        print(f"peak GPU memory {peak / 2**30:.2f} GiB = the model's {model_bytes / 2**30:.2f} GiB + "
              f"{(peak - model_bytes) / 2**30:.2f} GiB")
    print(f"attention routers: layers {sorted(bank.weights)}; mean held-out recall "
          f"{sum(r['recall'] for r in bank.provenance['layers']) / max(1, len(bank.provenance['layers'])):.3f}")
    if bank.mlp is not None:
        print(f"MLP routers: rank {bank.mlp.rank}, layers {sorted(bank.mlp.w_in)}")
        for batch, row in sorted(bank.mlp.topk.items()):
            print(f"  k at B={batch}: {list(row)}")


if __name__ == "__main__":
    main()

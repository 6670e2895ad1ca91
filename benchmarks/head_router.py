"""The head router (``polar::route``'s Triton kernel) alone: in-graph µs per call at decode shapes, optionally side by
side with another version of ``polar_compile/kernels/route.py`` (a file, e.g. ``git show main:...`` saved), checking
that both pick the same heads.

    python benchmarks/head_router.py [--shapes 9216x72,4096x32,4096x8,5120x40] [--batches 1,16,64] [--against FILE]

Shapes are hidden x units (heads, or KV groups for GQA); k is half the units. Eight sets of fresh N(0, 1) weights are
rotated through each CUDA graph; times are medians of ``triton.testing.do_bench`` over graph replays.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlp_profile import per_call_us, rotating

from polar_compile.kernels.route import route_triton


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="9216x72,4096x32,4096x8,5120x40")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--against", default=None, help="another route.py to time in the same process")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("head_router.py needs a CUDA GPU")
    other = None
    if args.against:
        spec = importlib.util.spec_from_file_location("polar_compile.kernels.route_against", args.against)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    for shape in args.shapes.split(","):
        hidden, units = map(int, shape.split("x"))
        k = max(1, units // 2)
        sets = [dict(w=torch.randn(units, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5,
                     b=torch.randn(units, device="cuda", dtype=torch.bfloat16)) for _ in range(8)]
        for batch in map(int, args.batches.split(",")):
            for s in sets:
                s["x"] = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
            line = f"route hidden={hidden} units={units} k={k} B={batch}: "
            line += f"{per_call_us(rotating(sets, lambda s, k=k: route_triton(s['x'], s['w'], s['b'], k)), 40):.2f} us"
            if other is not None:
                us = per_call_us(rotating(sets, lambda s, k=k: other.route_triton(s["x"], s["w"], s["b"], k)), 40)
                same = all(torch.equal(route_triton(s["x"], s["w"], s["b"], k),
                                       other.route_triton(s["x"], s["w"], s["b"], k)) for s in sets)
                line += f", {args.against}: {us:.2f} us, same heads: {same}"
            print(line, flush=True)


if __name__ == "__main__":
    main()

"""Compile time of the decode step, dense Inductor (GQA-native SDPA, variant (3)) against polar 0.5, on CUDA.

    python benchmarks/compile_time.py --model llama2-7b --batch 64 --context 1024 --layers 8

Compiles each variant ``--rounds`` times, alternating, with the FX-graph and AOTAutograd caches off (every compile a
full one; Triton's kernel cache warms up in the first round), and prints each first call's seconds (trace, compile,
CUDA-graph capture) followed by ``torch._dynamo.utils.compile_times()``, Dynamo's per-phase breakdown.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from polar_compile.bench import SHAPES, DecodeStep, compile_variant, full_compiles, parse_models, require_cuda
from polar_compile.testing import random_routers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2-7b", type=lambda text: parse_models(text)[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    require_cuda()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(SHAPES[args.model](args.layers), dtype=torch.bfloat16).eval()
    step = DecodeStep(model, args.batch, args.context)
    bank = random_routers(model, seed=0)
    with full_compiles(), torch.no_grad():
        for round_ in range(args.rounds):
            for variant in ("inductor-gqa", "polar-0.5"):
                torch._dynamo.reset()
                fn = compile_variant(model, variant, bank)
                step.reset()
                start = time.perf_counter()
                fn(**step.inputs)
                torch.cuda.synchronize()
                print(f"round {round_} {variant}: first call {time.perf_counter() - start:.1f} s", flush=True)
                print(torch._dynamo.utils.compile_times())


if __name__ == "__main__":
    main()

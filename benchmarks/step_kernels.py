"""Per-kernel GPU time of one decode step as the benchmark compiles it (CUDA graphs included): dense Inductor with
GQA-native SDPA against polar attention + sparse MLP, each kernel's µs per step, calls per step and µs per call.

    python benchmarks/step_kernels.py --case opt-6.7b:1:1024 --layers 32

Unlike ``profile_decode.py`` (compiled without CUDA graphs), this profiles the graphs that ``polar-compile bench``
times, so kernel choices and fusions are the timed ones; the sum is GPU time, the step line wall time.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from polar_compile.bench import SHAPES, DecodeStep
from polar_compile.bench.shapes import attention_density, parse_cases
from polar_compile.bench.step import full_compiles
from polar_compile.bench.variants import case_routers, compile_variant

VARIANTS = ("inductor-gqa", "polar-both")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="opt-6.7b:1:1024", help="model:batch:context")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    (case,) = parse_cases(args.case)
    name, batch, context = case
    with torch.device("cuda"):
        config = SHAPES[name](args.layers) if args.layers else SHAPES[name]()
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    step = DecodeStep(model, batch, context, "cuda")
    bank = case_routers(model, name)
    with full_compiles():
        for variant in VARIANTS:
            torch._dynamo.reset()
            fn = compile_variant(model, variant, bank, attention_density(name))
            seconds = step.time(fn, 10)[0]
            with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step.reset()
                    fn(**step.inputs)
                torch.cuda.synchronize()
            rows = sorted(((e.self_device_time_total / args.steps, e.count / args.steps, e.key)
                           for e in prof.key_averages() if e.self_device_time_total > 0), reverse=True)
            print(f"## {name} B={batch} L={context} {variant}: {seconds * 1e3:.3f} ms/step, kernels "
                  f"{sum(r[0] for r in rows) / 1e3:.3f} ms")
            for us, count, key in rows[:args.top]:
                print(f"  {us:9.1f} us  x{count:5.1f}  {us / count:7.2f} us each  {key[:110]}", flush=True)


if __name__ == "__main__":
    main()

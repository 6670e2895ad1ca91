"""Where a decode step's GPU time goes: per-kernel CUDA time of dense Inductor vs polar, side by side.

    python benchmarks/profile_decode.py --model llama2-7b --batch 64 --context 4096 --layers 8

Compiled without CUDA graphs so the profiler sees every kernel; the totals are GPU time, not wall time.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, StaticCache

import polar_compile
from polar_compile.bench import SHAPES, DecodeStep
from polar_compile.testing import random_routers


def kernel_table(step: DecodeStep, fn, repeats: int = 5) -> list[tuple[str, float]]:
    """(kernel name, microseconds per step) sorted by time."""
    with torch.no_grad():
        for _ in range(3):
            step.reset()
            fn(**step.inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                step.reset()
                fn(**step.inputs)
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_time_total > 0:
            totals[event.key] = totals.get(event.key, 0.0) + event.device_time_total / repeats
    return sorted(totals.items(), key=lambda kv: -kv[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(SHAPES[args.model](args.layers), dtype=torch.bfloat16).eval()
    probe = StaticCache(config=model.config, max_cache_len=8)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device="cuda"), past_key_values=probe,
              cache_position=torch.tensor([0], device="cuda"))
    print("transformers marks the cache write counter static:",
          getattr(probe.layers[0].cumulative_length, "_dynamo_static_input_type", None))
    step = DecodeStep(model, args.batch, args.context)
    bank = random_routers(model)
    for name in ("inductor", "polar"):
        torch._dynamo.reset()
        if name == "polar":
            polar_compile.attach(model, bank, density=0.5)
        fn = torch.compile(model.forward, backend=name, fullgraph=True)
        rows = kernel_table(step, fn)
        total = sum(us for _, us in rows)
        print(f"\n== {name}: {total:.1f} us GPU time per step ==")
        for kernel, us in rows[:18]:
            print(f"{us:9.1f} us  {100 * us / total:5.1f}%  {kernel[:110]}")


if __name__ == "__main__":
    main()

"""The ``aoti`` export on a GPU: does the package run polar's Triton kernels, match the compiled model, and keep
its speed? Per case, the same decode step (:class:`~polar_compile.export.CacheStep`, random bf16 weights, random
routers at density 0.5, a full random cache) run two ways:

- ``torch.compile(step, backend="polar", options={"routers": bank, "density": 0.5})`` (Inductor, no CUDA graphs);
- the AOTInductor package that ``polar_compile.export`` builds from the same step (``export_decode`` +
  ``compile_aoti``; the prefill is not needed here: the cache is filled with random values).

Prints per case: compile times, ms/step of both (CUDA events, median of ``--repeats`` after warm-up), the logits'
max difference and greedy-token agreement on the same cache, and the package's CUDA kernels by time (profiler
names: the polar kernels are ``_select_attention_split_kernel``, ``_select_attention_merge_kernel`` and the route
kernel). One call on one H200:

    python benchmarks/export_aoti.py                     # llama3-8b:64:8192 and llama2-7b:64:4096, 3 layers
    python benchmarks/export_aoti.py --cases llama2-7b:64:4096 --layers 4 --repeats 50

The vocabulary is cut to 32000 (Llama-3's 128256 would put 2 GiB of embedding and head weights into the package
and time nothing of interest) and the layer count kept small so a package stays under 2 GiB of constants.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

import polar_compile
from polar_compile import PolarConfig
from polar_compile.bench.shapes import SHAPES
from polar_compile.export.aoti import compile_aoti
from polar_compile.export.decode_step import CacheStep, cache_shape
from polar_compile.export.program import export_decode
from polar_compile.testing import random_routers

DENSITY = 0.5


def build(shape: str, layers: int) -> torch.nn.Module:
    """Random bf16 weights of ``shape`` with ``layers`` layers and a 32000-token vocabulary, on the GPU."""
    config = SHAPES[shape](layers)
    config.vocab_size = 32000
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.02)
    return model


def decode_inputs(model: torch.nn.Module, batch: int, context: int) -> list[torch.Tensor]:
    """A decode step at the last slot of a cache full of random K/V, with left padding of up to 1/8 of the cache."""
    generator = torch.Generator(device="cuda").manual_seed(1)
    slot = context - 1
    mask = torch.ones(batch, context, dtype=torch.long, device="cuda")
    pads = torch.randint(0, context // 8, (batch,), generator=generator, device="cuda")
    mask[torch.arange(context, device="cuda")[None, :] < pads[:, None]] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, slot:slot + 1].contiguous()
    ids = torch.randint(1, model.config.vocab_size, (batch, 1), generator=generator, device="cuda")
    layers = model.config.num_hidden_layers
    cache = [torch.randn(cache_shape(model, batch, context), generator=generator, device="cuda",
                         dtype=torch.bfloat16) for _ in range(2 * layers)]
    return [ids, positions, mask, torch.tensor([slot], device="cuda"), *cache]


def time_steps(fn, inputs: list[torch.Tensor], repeats: int) -> float:
    """Median ms of ``fn(*inputs)`` over ``repeats`` calls after 5 warm-up calls."""
    times = []
    with torch.no_grad():
        for _ in range(5):
            fn(*inputs)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernels(fn, inputs: list[torch.Tensor], top: int = 12) -> list[tuple[str, float]]:
    """The ``top`` CUDA kernels of one call by time (name, us)."""
    with torch.no_grad():
        fn(*inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(*inputs)
            torch.cuda.synchronize()
    rows = [(event.key, event.device_time_total) for event in prof.key_averages() if event.device_time_total > 0]
    return sorted(rows, key=lambda row: -row[1])[:top]


def run_case(shape: str, batch: int, context: int, layers: int, repeats: int, folder: Path) -> None:
    """Compile both ways, compare logits, time, profile; print everything."""
    print(f"\n== {shape} B={batch} L={context}, {layers} layers, bf16, density {DENSITY}", flush=True)
    model = build(shape, layers)
    bank = random_routers(model)
    inputs = decode_inputs(model, batch, context)

    start = time.perf_counter()
    compiled = torch.compile(CacheStep(model), backend="polar", fullgraph=True,
                             options={"routers": bank, "density": DENSITY})
    with torch.no_grad():
        compiled(*[t.clone() for t in inputs])
    print(f"torch.compile(backend='polar'): first call {time.perf_counter() - start:.1f} s", flush=True)

    start = time.perf_counter()
    program, records = export_decode(model, inputs, PolarConfig(routers=bank, density=DENSITY))
    rewritten = [site.layer for site in records[0].sites if site.rewritten]
    print(f"exported and rewritten in {time.perf_counter() - start:.1f} s; AOTInductor compiling", flush=True)
    package = folder / f"{shape}-{batch}-{context}.pt2"
    compile_aoti(program, package)
    runner = torch._inductor.aoti_load_package(str(package))
    print(f"aoti: export + compile {time.perf_counter() - start:.1f} s, routed layers {rewritten}, "
          f"package {package.stat().st_size / 2**30:.2f} GiB", flush=True)

    with torch.no_grad():
        expected = compiled(*[t.clone() for t in inputs])
        actual = runner(*[t.clone() for t in inputs])
        actual = actual[0] if isinstance(actual, (list, tuple)) else actual
    difference = (actual.float() - expected.float()).abs().max().item()
    agreement = (actual.argmax(-1) == expected.argmax(-1)).float().mean().item()
    scale = expected.float().abs().max().item()
    verdict = "MATCH" if difference <= 0.05 * scale and agreement >= 0.95 else "MISMATCH"
    print(f"logits: max |aoti - compiled| {difference:.4f} (max |logit| {scale:.2f}), greedy tokens agree "
          f"{agreement:.1%}: {verdict}")

    compiled_ms = time_steps(compiled, inputs, repeats)
    aoti_ms = time_steps(runner, inputs, repeats)
    print(f"ms/step: compiled {compiled_ms:.3f}, aoti {aoti_ms:.3f} ({aoti_ms / compiled_ms:.2f}x of compiled)")
    print("aoti package, CUDA kernels of one step (us):")
    for name, micros in kernels(runner, inputs):
        print(f"  {micros:10.1f}  {name[:110]}")
    polar = [name for name, _ in kernels(runner, inputs, top=200) if "select_attention" in name or "route" in name]
    print(f"polar Triton kernels in the package: {sorted(set(polar)) or 'NONE'}", flush=True)
    del compiled, runner, model
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def main() -> None:
    """Run every case of ``--cases``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="llama3-8b:64:8192,llama2-7b:64:4096",
                        help=f"SHAPE:BATCH:CONTEXT,... (shapes: {', '.join(SHAPES)})")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, polar_compile {polar_compile.__file__}")
    with tempfile.TemporaryDirectory() as folder:
        for case in args.cases.split(","):
            shape, batch, context = case.split(":")
            run_case(shape, int(batch), int(context), args.layers, args.repeats, Path(folder))


if __name__ == "__main__":
    main()

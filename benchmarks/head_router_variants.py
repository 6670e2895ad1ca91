"""The head router (``polar::route``'s kernel) against edited copies of itself, side by side in one process: where
its microseconds go (no ranking at all, fewer or more hidden splits, other hidden chunks, pipeline stages, warps).

    python benchmarks/head_router_variants.py

Each variant is ``polar_compile/kernels/route.py`` with one or two source lines replaced (an edit that no longer
matches stops the script). ``nosort`` stores the units unranked, so it only times; every other variant must pick the
same heads as the file itself, or its time is flagged DIFF. Eight sets of fresh N(0, 1) weights are rotated through
each CUDA graph; in-graph medians; for B=1 the profiler's split of the file's own call into its kernels follows.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlp_profile import kernel_table, per_call_us, rotating

ROUTE_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "polar_compile", "kernels", "route.py")
WARPS = "num_warps=8 if block_u >= 32 else 4,"
VARIANTS = {
    "file": [],
    "nosort": [("ranked = tl.sort(packed, dim=1, descending=True)", "ranked = packed")],
    "splits8": [("_MAX_SPLITS = 16", "_MAX_SPLITS = 8")],
    "splits32": [("_MAX_SPLITS = 16", "_MAX_SPLITS = 32")],
    "k64": [("_BLOCK_K = 128", "_BLOCK_K = 64")],
    "k256": [("_BLOCK_K = 128", "_BLOCK_K = 256")],
    "stages2": [(WARPS, WARPS + " num_stages=2,")],
    "stages4": [(WARPS, WARPS + " num_stages=4,")],
    "warps16": [(WARPS, "num_warps=16 if block_u >= 64 else 8 if block_u >= 32 else 4,")],
}
SHAPES = ((9216, 72), (4096, 32), (8192, 64), (5120, 40))  # hidden x units: OPT-66B, OPT-6.7B, 64 heads, Llama-2-13B


def load_variants(directory: str) -> dict:
    """name -> the module of route.py with that variant's edits."""
    with open(ROUTE_PY) as file:
        source = file.read()
    modules = {}
    for name, edits in VARIANTS.items():
        text = source
        for old, new in edits:
            if old not in text:
                sys.exit(f"variant {name}: {old!r} is not in {ROUTE_PY} any more")
            text = text.replace(old, new)
        path = os.path.join(directory, f"route_{name}.py")
        with open(path, "w") as file:
            file.write(text)
        spec = importlib.util.spec_from_file_location(f"polar_compile.kernels.route_{name}", path)
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    return modules


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("head_router_variants.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    with tempfile.TemporaryDirectory() as directory:
        modules = load_variants(directory)
        for hidden, units in SHAPES:
            k = units // 2
            sets = [dict(w=torch.randn(units, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5,
                         b=torch.randn(units, device="cuda", dtype=torch.bfloat16)) for _ in range(8)]
            for batch in (1, 16, 64):
                for s in sets:
                    s["x"] = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
                expected = [modules["file"].route_triton(s["x"], s["w"], s["b"], k) for s in sets]
                line = f"{hidden}x{units} B={batch}:"
                for name, module in modules.items():
                    us = per_call_us(rotating(sets, lambda s, m=module, k=k: m.route_triton(s["x"], s["w"], s["b"], k)),
                                     40)
                    same = name == "nosort" or all(torch.equal(e, module.route_triton(s["x"], s["w"], s["b"], k))
                                                   for e, s in zip(expected, sets, strict=True))
                    line += f" {name} {us:.2f}{'' if same else ' (DIFF)'}"
                print(line, flush=True)
                if batch == 1:
                    kernel_table(rotating(sets, lambda s, k=k: modules["file"].route_triton(s["x"], s["w"], s["b"], k)),
                                 f"file {hidden}x{units} B=1")


if __name__ == "__main__":
    main()

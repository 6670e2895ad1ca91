"""Does loading an AOTInductor package work on this GPU stack at all? Compiles and loads one package of
``--which``: ``dense`` (a 2-layer Llama-2-7B-shaped prefill, no polar op), ``route`` (one ``polar::route``) or
``triton`` (one tiny ``triton_op`` unrelated to polar), printing "compiled" and "loaded" as it gets there. Run each in
its own process, with faulthandler, on a CUDA machine:

    for w in triton route dense; do python -X faulthandler benchmarks/aoti_load_probe.py --which $w; done
"""

import argparse
import os
import sys
import tempfile

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

import polar_compile  # noqa: F401  (registers the polar ops)
from polar_compile.export.aoti import compile_aoti
from polar_compile.export.program import export_prefill

sys.path.insert(0, os.path.dirname(__file__))
import export_aoti


@triton.jit
def _add_one_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, tl.load(X + offs) + 1)


@triton_op("probe::add_one", mutates_args=())
def add_one(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    wrap_triton(_add_one_kernel)[(1,)](x, y, N=x.numel())
    return y


class Route(torch.nn.Module):
    def forward(self, x, w, b):
        return torch.ops.polar.route(x, w, b, 4)


class AddOne(torch.nn.Module):
    def forward(self, x):
        return add_one(x)


def program(which: str):
    """(exported program, its inputs) of ``which``."""
    if which == "dense":
        model = export_aoti.build("llama2-7b", 2)
        inputs = export_aoti.decode_inputs(model, 8, 512)
        return export_prefill(model, inputs), inputs
    if which == "route":
        args = (torch.randn(8, 64, device="cuda", dtype=torch.bfloat16),
                torch.randn(8, 64, device="cuda", dtype=torch.bfloat16), torch.randn(8, device="cuda", dtype=torch.bfloat16))
        return torch.export.export(Route(), args), args
    args = (torch.randn(16, device="cuda"),)
    return torch.export.export(AddOne(), args), args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--which", choices=["dense", "route", "triton"], required=True)
    parser.add_argument("--device-index", type=int, default=-1, help="aoti_load_package's device_index")
    args = parser.parse_args()
    which = args.which
    exported, inputs = program(which)
    path = os.path.join(tempfile.mkdtemp(), f"{which}.pt2")
    compile_aoti(exported, path)
    print(which, "compiled", flush=True)
    runner = torch._inductor.aoti_load_package(path, device_index=args.device_index)
    print(which, "loaded", flush=True)
    with torch.no_grad():
        runner(*inputs)
    print(which, "ran", flush=True)


if __name__ == "__main__":
    main()

"""Does loading an AOTInductor package work on this GPU stack at all? Compiles and loads one package of
``--which``: ``linear`` (one ``nn.Linear``: no custom op, no Triton kernel), ``dense`` (a 2-layer
Llama-2-7B-shaped prefill, no polar op), ``route`` (one ``polar::route``) or ``triton`` (one tiny ``triton_op``
unrelated to polar), on ``--device``, printing "compiled", "loaded" and "ran" as it gets there. ``--fresh-process``
loads the package in a new interpreter (no Inductor state from the compile). Run each in its own process, with
faulthandler, on a CUDA machine:

    for w in linear triton route dense; do python -X faulthandler benchmarks/aoti_load_probe.py --which $w; done
"""

import argparse
import os
import subprocess
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


def program(which: str, device: str):
    """(exported program, its inputs) of ``which``."""
    if which == "linear":
        linear = torch.nn.Linear(64, 32, device=device)
        args = (torch.randn(8, 64, device=device),)
        return torch.export.export(linear, args), args
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
    parser.add_argument("--which", choices=["linear", "dense", "route", "triton"], required=True)
    parser.add_argument("--device", default="cuda", help="linear only: where the Linear lives")
    parser.add_argument("--device-index", type=int, default=-1, help="aoti_load_package's device_index")
    parser.add_argument("--fresh-process", action="store_true", help="load and run in a new interpreter")
    args = parser.parse_args()
    which = args.which
    exported, inputs = program(which, args.device)
    path = os.path.join(tempfile.mkdtemp(), f"{which}.pt2")
    compile_aoti(exported, path)
    print(which, "compiled", flush=True)
    if args.fresh_process:
        torch.save(inputs, path + ".inputs")
        code = (f"import torch, polar_compile; r = torch._inductor.aoti_load_package({path!r}, "
                f"device_index={args.device_index}); print('loaded', flush=True); "
                f"r(*torch.load({path + '.inputs'!r})); print('ran', flush=True)")
        sys.exit(subprocess.run([sys.executable, "-X", "faulthandler", "-c", code]).returncode)
    runner = torch._inductor.aoti_load_package(path, device_index=args.device_index)
    print(which, "loaded", flush=True)
    with torch.no_grad():
        runner(*inputs)
    print(which, "ran", flush=True)


if __name__ == "__main__":
    main()

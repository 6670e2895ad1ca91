"""``aoti``: the programs compiled ahead of time by AOTInductor into packages that run without Python.

``torch._inductor.aoti_compile_and_package`` compiles the whole program; the ``polar::`` ``triton_op``s are traced
into (``decompose_custom_triton_ops``, which the polar backend turns off to keep them opaque): on CUDA their Triton
kernels are compiled into the package (the kernels' autotune configs have no ``pre_hook``, which AOTInductor
rejects), elsewhere their reference path becomes ordinary ATen code. ``polar::mlp_route`` is a plain custom op
(cuBLAS + Triton launched from Python): the package calls it through PyTorch's dispatcher, so a package with sparse
MLP sites needs ``polar_compile`` imported in the process that runs it. Loaded with
``torch._inductor.aoti_load_package`` (Python) or ``torch::inductor::AOTIModelPackageLoader`` (C++,
``examples/aoti_runner.cpp``), a package keeps its writes into the cache tensors it is given.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.export import ExportedProgram

__all__ = ["compile_aoti"]


def compile_aoti(program: ExportedProgram, path: Path) -> None:
    """Compile ``program`` into the AOTInductor package ``path`` (for the device its tensors are on)."""
    with torch._functorch.config.patch(decompose_custom_triton_ops=True):
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))

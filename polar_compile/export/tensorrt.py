"""``tensorrt`` (untested: TensorRT cannot be installed on the machines this package is tested on).

The torch-tensorrt dynamo path: each ``polar::`` op the decode step calls gets a plugin generated from the op
itself (``torch_tensorrt.dynamo.conversion.plugins.custom_op``, TensorRT >= 10.7: a JIT plugin that calls the op,
and so its Triton kernel, on TensorRT's stream), then ``torch_tensorrt.dynamo.compile`` builds the engine around
them and ``torch_tensorrt.save`` writes it as an ``ExportedProgram``. The cache travels in and out (TensorRT
engines do not write into their inputs). Without ``torch_tensorrt`` it raises :class:`ExportError` naming the
package. Ahead-of-time Triton plugins (no Python at run time) need the kernels' arguments ordered inputs, scalars,
outputs, int32 scalars and one kernel per plugin (the split-K attention kernel and its merge become two): not done.
The ONNX artifact is the TensorRT route that is tested here (TensorRT's ONNX parser reads it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.export import ExportedProgram

from .errors import ExportError

__all__ = ["MISSING_TENSORRT", "compile_tensorrt", "require_tensorrt"]

MISSING_TENSORRT = ("format='tensorrt' needs the torch_tensorrt package (and TensorRT >= 10.7), which is not "
                    "installed: pip install 'polar-compile[tensorrt]' on a machine with TensorRT, or export "
                    "format='onnx' for TensorRT's ONNX parser")


def require_tensorrt() -> object:
    """The ``torch_tensorrt`` module; :class:`ExportError` naming the package when it is not installed."""
    try:
        import torch_tensorrt
    except ImportError:
        raise ExportError(MISSING_TENSORRT) from None
    return torch_tensorrt


def compile_tensorrt(program: ExportedProgram, inputs: Sequence[Tensor], path: Path) -> None:
    """Build a TensorRT engine of ``program`` (cache in, cache out) with a plugin per ``polar::`` op it calls, and
    save it to ``path``."""
    torch_tensorrt = require_tensorrt()
    for name in sorted({str(node.target.name()) for node in program.graph.nodes
                        if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "polar"}):
        torch_tensorrt.dynamo.conversion.plugins.custom_op(name.removesuffix(".default"),
                                                           supports_dynamic_shapes=False)
    engine = torch_tensorrt.dynamo.compile(program, arg_inputs=list(inputs), min_block_size=1)
    torch_tensorrt.save(engine, str(path), output_format="exported_program", arg_inputs=list(inputs))

"""Triton kernels of the ``polar::`` ops, with their launch heuristics."""

from __future__ import annotations

import functools

import torch
import triton.language as tl

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 132 (an H200) in the Triton CPU interpreter, so launch
    heuristics take the GPU's path in CPU tests."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_types(dtype: torch.dtype, device: torch.device) -> tuple[tl.dtype, str]:
    """(operand dtype, input_precision) of ``tl.dot`` for inputs of ``dtype`` on ``device``.

    fp32 dots run in IEEE precision (Triton's default is tf32). bf16 in the CPU interpreter runs in fp32: triton
    3.9's interpreter multiplies the uint16 storage of bf16 operands in tl.dot (interpreter.py create_dot).
    """
    if dtype == torch.float32 or (device.type == "cpu" and dtype == torch.bfloat16):
        return tl.float32, "ieee"
    return _TL_DTYPES[dtype], "tf32"

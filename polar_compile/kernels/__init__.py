"""Triton kernels of the ``polar::`` ops, with their launch heuristics."""

from __future__ import annotations

import functools
import os

import torch
import triton
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


def dependent_launch(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for launching a kernel that takes a ``PDL`` constexpr: programmatic dependent launch on
    Hopper and later (the launch overlaps the end of the kernel before it, which the kernel awaits with
    :func:`wait_for_previous_kernel` before its first memory access). Off elsewhere, in the Triton interpreter and
    while the kernel is traced (Inductor and AOTInductor launch traced kernels themselves, without the option), and
    when the environment sets ``POLAR_PDL=0``."""
    from torch._library.triton import is_wrap_triton_enabled

    on = (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
          and not is_wrap_triton_enabled() and os.environ.get("POLAR_PDL", "1") != "0")
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Under programmatic dependent launch, block until the previous kernel has finished and its writes are visible:
    before this, a kernel may neither read what it wrote nor overwrite what it reads."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def let_next_kernel_launch(PDL: tl.constexpr):
    """Under programmatic dependent launch, let the next kernel start launching (it waits for this one to finish)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()

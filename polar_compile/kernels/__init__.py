"""Triton kernels of the ``polar::`` ops, with their launch heuristics."""

from __future__ import annotations

import functools

import torch


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 132 (an H200) in the Triton CPU interpreter, so launch
    heuristics take the GPU's path in CPU tests."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count

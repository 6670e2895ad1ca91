"""Tensors a rewrite adds to a graph: stored on the graph module, where AOTAutograd and Inductor find them."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx
from torch._dynamo.source import ConstantSource

__all__ = ["TransposedWeight", "graph_constant", "refreshing", "transposed"]


@dataclass(eq=False)
class TransposedWeight:
    """A contiguous ``weight.T`` that compiled graphs read in place of ``weight``, and the weight's version (its
    in-place update count) when it was copied."""

    source: weakref.ref
    version: int
    copy: Tensor

    def refresh(self) -> None:
        """Copy the weight again, into the same memory (captured CUDA graphs keep reading it), if it changed in
        place since (``load_state_dict``, an optimizer step, a user's ``mul_``)."""
        weight = self.source()
        if weight is not None and weight._version != self.version:
            with torch.no_grad():
                self.copy.copy_(weight.detach().t())
            self.version = weight._version


# (id(weight), dtype, device) -> its transposed copy
_TRANSPOSED: dict[tuple[int, torch.dtype, torch.device], TransposedWeight] = {}


def graph_constant(gm: fx.GraphModule, name: str, tensor: Tensor, like: Tensor) -> fx.Node:
    """A ``get_attr`` node of ``tensor`` (in ``like``'s dtype and device; no copy when it already is), stored on
    ``gm`` as a buffer.

    Dynamo's graph modules map every parameter and buffer to a source (``_param_name_to_source``); AOTAutograd
    asserts on that map and uses it to find the static inputs (the KV cache) that let Inductor keep CUDA graphs,
    so the new buffer gets an entry too.
    """
    gm.register_buffer(name, tensor.detach().to(device=like.device, dtype=like.dtype).contiguous())
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources[name] = ConstantSource(name)
    return gm.graph.get_attr(name)


def transposed(weight: Tensor, like: Tensor) -> TransposedWeight:
    """``weight.T`` as a contiguous copy in ``like``'s dtype and device, made once per weight and shared by every
    graph that asks (each batch size of a model compiles its own graph; one copy of the weights serves them all),
    brought up to date if the weight changed in place since."""
    key = (id(weight), like.dtype, like.device)
    entry = _TRANSPOSED.get(key)
    if entry is not None and entry.source() is weight:
        entry.refresh()
        return entry
    with torch.no_grad():
        copy = weight.detach().t().to(device=like.device, dtype=like.dtype).contiguous()
    entry = TransposedWeight(weakref.ref(weight, lambda _, key=key: _TRANSPOSED.pop(key, None)), weight._version,
                             copy)
    _TRANSPOSED[key] = entry
    return entry


def refreshing(compiled: Callable[..., Any], copies: Sequence[TransposedWeight]) -> Callable[..., Any]:
    """``compiled`` refreshing ``copies`` before every call: a few host-side integer compares per call, and a copy
    only after the weight changed, so a graph never reads a stale transposed weight."""
    if not copies:
        return compiled

    @functools.wraps(compiled)  # keeps attributes such as Inductor's `_boxed_call`
    def call(*args: Any, **kwargs: Any) -> Any:
        for copy in copies:
            copy.refresh()
        return compiled(*args, **kwargs)

    return call

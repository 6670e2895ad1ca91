"""Tensors a rewrite adds to a graph: stored on the graph module, where AOTAutograd and Inductor find them."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, fx
from torch._dynamo.source import ConstantSource

__all__ = ["graph_constant", "transposed"]

# id(weight) -> (the weight, its version when copied, weight.T contiguous)
_TRANSPOSED: dict[int, tuple[weakref.ref, int, Tensor]] = {}


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


def transposed(weight: Tensor) -> Tensor:
    """``weight.T`` as a contiguous copy, made once per weight tensor and version and shared by every graph that
    asks (each batch size of a model compiles its own graph; one copy of the weights serves them all)."""
    key = id(weight)
    entry = _TRANSPOSED.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == weight._version:
        return entry[2]
    with torch.no_grad():
        copy = weight.detach().t().contiguous()
    _TRANSPOSED[key] = (weakref.ref(weight, lambda _, key=key: _TRANSPOSED.pop(key, None)), weight._version, copy)
    return copy

"""Routers as model state: :func:`attach` puts each layer's router on the model, where compiled graphs read it.

Each decoder layer with a router gets, on the layer module itself:
- buffers ``polar_router_weight [units, hidden]`` and ``polar_router_bias [units]`` (non-persistent: never in a
  ``state_dict`` or a saved checkpoint), in the layer's dtype and device, moving with the model;
- attributes ``polar_router_layer``, ``polar_router_k`` (units kept per sequence) and ``polar_min_saved_bytes``
  (-1: the device's default);
- a new class: a subclass of the layer's own, made once per class, whose ``forward`` first passes the layer's input
  through ``polar::layer_router`` with all of the above at a decode step (one query token), then runs the original.

Dynamo traces that ``forward`` like the rest of the model: the buffers become inputs of *this* model's graph
(another model's are other inputs) and the ints guarded constants (a new density recompiles). Dynamo guards the
type of every module it inlines, so a model whose layers are of the original class (never attached, or detached)
never runs a graph traced with routers, nor the reverse. Forward hooks would not do: Dynamo does not guard module
hooks by default (``torch._dynamo.config.skip_nnmodule_hook_guards``; measured: a hook attached after the first
compile was never traced). The polar backend reads the markers; any other backend runs them as a copy of one row
per layer and step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import ops  # noqa: F401  (registers polar::layer_router)
from .config import PolarConfig
from .routers import ModelShape, RouterBank, RouterBankError, kept_units

__all__ = ["attach", "decoder_layers", "detach"]

WEIGHT, BIAS = "polar_router_weight", "polar_router_bias"
LAYER, K, MIN_SAVED = "polar_router_layer", "polar_router_k", "polar_min_saved_bytes"
_ROUTED_CLASSES: dict[type, type] = {}  # layer class -> its routed subclass


def attach(model: nn.Module, routers: RouterBank | str | Path | None, *,
           density: float | Sequence[float] | None = None, min_saved_mib: float | None = None) -> nn.Module:
    """Put ``routers`` on ``model`` so that ``backend="polar"`` routes it, with or without ``options``.

    ``density`` and ``min_saved_mib`` are as in :class:`~polar_compile.PolarConfig` (``density=None``: each layer's
    density from the bank). Checks the bank against the model and raises :class:`RouterBankError` naming the first
    mismatch. Attaching again replaces the routers (in place where shapes agree, so captured CUDA graphs stay
    valid); ``routers=None`` removes them. Compiled graphs see every change: they recompile or read the new values.
    Returns ``model``.
    """
    if routers is None:
        detach(model)
        return model
    bank = routers if isinstance(routers, RouterBank) else RouterBank.load(routers)
    bank.check_model(model)
    config = PolarConfig(routers=bank, density=density, min_saved_mib=min_saved_mib)
    min_saved_bytes = -1 if min_saved_mib is None else round(min_saved_mib * 2**20)
    for index, layer in enumerate(decoder_layers(model, bank.shape)):
        if index not in bank.weights:
            _remove(layer)
            continue
        like = next((p for p in layer.parameters() if p.is_floating_point()), bank.weights[index])
        _set_buffer(layer, WEIGHT, bank.weights[index].to(device=like.device, dtype=like.dtype))
        _set_buffer(layer, BIAS, bank.biases[index].to(device=like.device, dtype=like.dtype))
        setattr(layer, LAYER, index)
        setattr(layer, K, kept_units(config.layer_density(index), bank.shape.num_kv_heads))
        setattr(layer, MIN_SAVED, min_saved_bytes)
        layer.__class__ = _routed_class(type(layer))
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove what :func:`attach` put on ``model``; returns ``model``."""
    for module in model.modules():
        _remove(module)
    return model


def decoder_layers(model: nn.Module, shape: ModelShape | None = None) -> nn.ModuleList:
    """The decoder's layer list of an HF model: the ``ModuleList`` of ``shape.num_layers`` items under
    ``model.get_decoder()`` (the decoder of encoder-decoder and multimodal models) holding the most weights."""
    shape = shape or ModelShape.of(model)
    root = model.get_decoder() if hasattr(model, "get_decoder") else model
    lists = [module for module in root.modules()
             if isinstance(module, nn.ModuleList) and len(module) == shape.num_layers]
    if not lists:
        raise RouterBankError(
            f"{type(model).__name__}: found no module list of {shape.num_layers} layers (the config's layer count) "
            f"under its decoder {type(root).__name__}, so routers cannot be attached"
        )
    return max(lists, key=lambda layers: sum(p.numel() for p in layers.parameters()))


def _routed_class(base: type) -> type:
    """The subclass of ``base`` whose forward marks the layer's router (``base`` itself if already routed)."""
    if base in _ROUTED_CLASSES.values():
        return base
    if base not in _ROUTED_CLASSES:
        _ROUTED_CLASSES[base] = type(f"Routed{base.__name__}", (base,), {
            "forward": _routed_forward, "__reduce_ex__": _reduce_routed, "__module__": __name__})
    return _ROUTED_CLASSES[base]


def _reduce_routed(self: nn.Module, protocol: int) -> tuple:
    """Pickle a routed layer by its original class, which pickle can import (``torch.save(model)``, deepcopy); it
    comes back routed, with its routers."""
    _, _, *rest = object.__reduce_ex__(self, protocol)  # (copyreg.__newobj__, (cls,), state, ...)
    return (_new_routed, (type(self).__mro__[1],), *rest)


def _new_routed(base: type) -> nn.Module:
    routed = _routed_class(base)
    return routed.__new__(routed)


def _routed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The layer's own forward, its input first passed through ``polar::layer_router`` at a decode step."""
    if args:
        args = (_marked(self, args[0]), *args[1:])
    elif "hidden_states" in kwargs:
        kwargs = {**kwargs, "hidden_states": _marked(self, kwargs["hidden_states"])}
    return type(self).__mro__[1].forward(self, *args, **kwargs)


def _marked(layer: nn.Module, hidden: Any) -> Any:
    # hidden: [B, T, hidden]; prefill (T > 1) or another layout has nothing to route
    if not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.shape[1] != 1:
        return hidden
    return torch.ops.polar.layer_router.default(hidden, getattr(layer, WEIGHT), getattr(layer, BIAS),
                                                getattr(layer, LAYER), getattr(layer, K), getattr(layer, MIN_SAVED))


def _set_buffer(module: nn.Module, name: str, value: Tensor) -> None:
    """Copy into the existing buffer when it has ``value``'s shape, dtype and device, else register anew."""
    current = module._buffers.get(name)
    if current is not None and (current.shape, current.dtype, current.device) == (value.shape, value.dtype,
                                                                                   value.device):
        with torch.no_grad():
            current.copy_(value)
    else:
        module.register_buffer(name, value.detach().clone().contiguous(), persistent=False)


def _remove(module: nn.Module) -> None:
    if type(module) not in _ROUTED_CLASSES.values():
        return
    module.__class__ = type(module).__mro__[1]
    for name in (WEIGHT, BIAS):
        module._buffers.pop(name, None)
    for name in (LAYER, K, MIN_SAVED):
        module.__dict__.pop(name, None)

"""Routers as model state: :func:`attach` puts each layer's router on the model, where compiled graphs read it.

Each decoder layer with a router gets, on the layer module itself:
- buffers ``polar_router_weight [units, hidden]`` and ``polar_router_bias [units]`` (non-persistent: never in a
  ``state_dict`` or a saved checkpoint), in the layer's dtype and device, moving with the model;
- attributes ``polar_router_layer``, ``polar_router_k`` (units kept per sequence) and ``polar_min_saved_bytes``
  (-1: the device's default);
- with an MLP router: buffers ``polar_mlp_in [rank, hidden]``, ``polar_mlp_out [ffn, rank]`` and the layer's row of
  the bank's k table, ``polar_mlp_topk`` (``((batch size, k or None), ...)``);
- a new class: a subclass of the layer's own, made once per class, whose ``forward`` first passes the layer's input
  through ``polar::layer_router`` (and ``polar::layer_mlp_router``, with the k of the batch size it sees) with all of
  the above at a decode step (one query token), then runs the original.

Dynamo traces that ``forward`` like the rest of the model: the buffers become inputs of *this* model's graph
(another model's are other inputs) and the ints guarded constants (a new density, k table or batch size
recompiles). Dynamo guards the
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
from .distributed import model_shard
from .mlp_routers import table_k
from .routers import ModelShape, RouterBank, RouterBankError, kept_units

__all__ = ["attach", "decoder_layers", "detach"]

WEIGHT, BIAS = "polar_router_weight", "polar_router_bias"
LAYER, K, MIN_SAVED = "polar_router_layer", "polar_router_k", "polar_min_saved_bytes"
MLP_IN, MLP_OUT, MLP_TOPK = "polar_mlp_in", "polar_mlp_out", "polar_mlp_topk"
_BUFFERS, _ATTRIBUTES = (WEIGHT, BIAS, MLP_IN, MLP_OUT), (LAYER, K, MIN_SAVED, MLP_TOPK)
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
    mlp = bank.mlp
    layers = decoder_layers(model, bank.shape)
    shard = model_shard(layers)  # tensor parallel: each rank routes its own units (distributed.py)
    units = bank.shape.num_kv_heads
    if shard is not None:
        units = shard.local_units(units, f"{type(model).__name__}, tensor-parallel rank {shard.rank} of {shard.size}")
    for index, layer in enumerate(layers):
        routed_mlp = mlp is not None and index in mlp.w_in
        if index not in bank.weights and not routed_mlp:
            _remove(layer)
            continue
        like = next((p for p in layer.parameters() if p.is_floating_point()), None)
        setattr(layer, LAYER, index)
        if index in bank.weights:
            weight, bias = bank.weights[index], bank.biases[index]
            if shard is not None:
                weight, bias = shard.rows(weight, f"layer {index}"), shard.rows(bias, f"layer {index}")
            _set_buffer(layer, WEIGHT, weight, like)
            _set_buffer(layer, BIAS, bias, like)
            setattr(layer, K, kept_units(config.layer_density(index), units))
            setattr(layer, MIN_SAVED, min_saved_bytes)
        else:
            _clear(layer, (WEIGHT, BIAS), (K, MIN_SAVED))
        if routed_mlp:
            _set_buffer(layer, MLP_IN, mlp.w_in[index], like)
            _set_buffer(layer, MLP_OUT, mlp.w_out[index], like)
            setattr(layer, MLP_TOPK, tuple((batch, mlp.topk[batch][index]) for batch in sorted(mlp.topk)))
        else:
            _clear(layer, (MLP_IN, MLP_OUT), (MLP_TOPK,))
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
    index = getattr(layer, LAYER)
    if WEIGHT in layer._buffers:
        hidden = torch.ops.polar.layer_router.default(hidden, getattr(layer, WEIGHT), getattr(layer, BIAS), index,
                                                      getattr(layer, K), getattr(layer, MIN_SAVED))
    if MLP_IN in layer._buffers:
        # Dynamo guards the table and the batch size it read, so another batch size or table recompiles
        k = table_k(getattr(layer, MLP_TOPK), hidden.shape[0])
        hidden = torch.ops.polar.layer_mlp_router.default(hidden, getattr(layer, MLP_IN), getattr(layer, MLP_OUT),
                                                          index, k or 0)
    return hidden


def _set_buffer(module: nn.Module, name: str, value: Tensor, like: Tensor | None) -> None:
    """Put ``value``, in ``like``'s dtype and device, in buffer ``name``: a copy into the existing buffer when
    shape, dtype and device agree (captured CUDA graphs keep its address), else a new non-persistent buffer."""
    if like is not None:
        value = value.to(device=like.device, dtype=like.dtype)
    current = module._buffers.get(name)
    if current is not None and (current.shape, current.dtype, current.device) == (value.shape, value.dtype,
                                                                                   value.device):
        with torch.no_grad():
            current.copy_(value)
    else:
        module.register_buffer(name, value.detach().clone().contiguous(), persistent=False)


def _clear(module: nn.Module, buffers: Sequence[str] = _BUFFERS, attributes: Sequence[str] = _ATTRIBUTES) -> None:
    """Remove routing buffers and attributes from ``module`` (its class stays)."""
    for name in buffers:
        module._buffers.pop(name, None)
    for name in attributes:
        module.__dict__.pop(name, None)


def _remove(module: nn.Module) -> None:
    if type(module) not in _ROUTED_CLASSES.values():
        return
    module.__class__ = type(module).__mro__[1]
    _clear(module)

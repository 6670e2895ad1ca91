"""Helpers for tests and demos: random routers shaped for a model."""

from __future__ import annotations

import torch
from torch import nn

from .bank_format import describe, is_int
from .instrument import attention_layers
from .routers import ModelShape, RouterBank, RouterBankError

__all__ = ["random_routers"]


def random_routers(model: nn.Module, seed: int = 0, *, first_layer: int = 1) -> RouterBank:
    """A bank of random routers for the attention layers ``first_layer..`` of ``model`` (layer 0 stays dense by
    default; a hybrid model's non-attention layers, as its config's ``layer_types`` marks them, get none).

    The scores depend strongly on the input, so different sequences pick different units; useful for speed and
    plumbing, meaningless for accuracy. Raises :class:`RouterBankError` for a model without attention heads in
    its config (as :meth:`ModelShape.of`) and for a ``first_layer`` that is not a layer index of the model.
    """
    shape = ModelShape.of(model)
    if not is_int(first_layer) or not 0 <= first_layer <= shape.num_layers:
        raise RouterBankError(
            f"first_layer must be an int in 0..{shape.num_layers} (the model has {shape.num_layers} layers), "
            f"got {describe(first_layer)}"
        )
    generator = torch.Generator().manual_seed(seed)
    units, hidden = shape.num_kv_heads, shape.hidden_size
    weights, biases = {}, {}
    attention = attention_layers(model)
    for layer in range(first_layer, shape.num_layers):
        if attention is not None and layer not in attention:
            continue
        weights[layer] = torch.randn(units, hidden, generator=generator) / hidden**0.5
        biases[layer] = 0.1 * torch.randn(units, generator=generator)
    return RouterBank(shape, weights, biases, provenance={"kind": "random", "seed": seed})

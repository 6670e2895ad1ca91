"""Helpers for tests and demos: random routers shaped for a model."""

from __future__ import annotations

import torch
from torch import nn

from .routers import ModelShape, RouterBank

__all__ = ["random_routers"]


def random_routers(model: nn.Module, seed: int = 0, *, first_layer: int = 1) -> RouterBank:
    """A bank of random routers for layers ``first_layer..`` of ``model`` (layer 0 stays dense by default).

    The scores depend strongly on the input, so different sequences pick different units; useful for speed and
    plumbing, meaningless for accuracy.
    """
    shape = ModelShape.of(model)
    generator = torch.Generator().manual_seed(seed)
    units, hidden = shape.num_kv_heads, shape.hidden_size
    weights, biases = {}, {}
    for layer in range(first_layer, shape.num_layers):
        weights[layer] = torch.randn(units, hidden, generator=generator) / hidden**0.5
        biases[layer] = 0.1 * torch.randn(units, generator=generator)
    return RouterBank(shape, weights, biases, provenance={"kind": "random", "seed": seed})

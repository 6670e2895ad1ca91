"""Helpers for tests and demos: random routers shaped for a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .bank_format import describe, is_density, is_int
from .instrument import attention_layers
from .mlp_routers import MlpRouters, mlp_width
from .routers import ModelShape, RouterBank, RouterBankError

__all__ = ["random_routers"]


def random_routers(
    model: nn.Module,
    seed: int = 0,
    *,
    first_layer: int = 1,
    mlp_rank: int | None = None,
    mlp_topk: Mapping[int, float | Sequence[int | None]] | None = None,
) -> RouterBank:
    """A bank of random routers for the attention layers ``first_layer..`` of ``model`` (layer 0 stays dense by
    default; a hybrid model's non-attention layers, as its config's ``layer_types`` marks them, get none).

    With ``mlp_rank``, also random rank-``mlp_rank`` MLP routers for every layer ``first_layer..`` (the caller
    decides which MLPs are ReLU ones and compiles accordingly) and their k table: ``mlp_topk`` maps a batch size to
    a density (k = ``max(1, round(density * ffn))`` for every routed layer) or to an explicit k-or-None per layer;
    ``{1: 0.5}`` when not given. The MLP width ``ffn`` comes from the config (:func:`mlp_width`).

    The scores depend strongly on the input, so different sequences pick different units; useful for speed and
    plumbing, meaningless for accuracy. Raises :class:`RouterBankError` (a ``ValueError``) for a model without
    attention heads in its config (as :meth:`ModelShape.of`), for a ``first_layer`` that is not a layer index of
    the model, for MLP arguments that are malformed, and for ``mlp_rank`` on a model whose config names no MLP width.
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
    mlp = None
    if mlp_rank is not None:
        mlp = _random_mlp(model, shape, range(first_layer, shape.num_layers), mlp_rank, mlp_topk, generator)
    return RouterBank(shape, weights, biases, provenance={"kind": "random", "seed": seed}, mlp=mlp)


def _random_mlp(model: nn.Module, shape: ModelShape, layers: range, rank: int,
                topk: Mapping[int, float | Sequence[int | None]] | None, generator: torch.Generator) -> MlpRouters | None:
    """Random MLP routers for ``layers`` (normal init scaled 1/sqrt(fan_in)) and their k table; None if no layers."""
    if not is_int(rank) or rank < 1:
        raise RouterBankError(f"mlp_rank must be a positive int, got {describe(rank)}")
    ffn = mlp_width(model)
    if ffn is None:
        raise RouterBankError(
            f"{type(model).__name__}: its config names no MLP width (intermediate_size, ffn_dim, ...), so random "
            "MLP routers cannot be shaped; give the model a config with one"
        )
    if not layers:
        return None
    w_in = {layer: torch.randn(rank, shape.hidden_size, generator=generator) / shape.hidden_size**0.5
            for layer in layers}
    w_out = {layer: torch.randn(ffn, rank, generator=generator) / rank**0.5 for layer in layers}
    if topk is None:
        topk = {1: 0.5}
    if not isinstance(topk, Mapping):
        raise RouterBankError(f"mlp_topk must be a dict of batch size -> density or k per layer, got {describe(topk)}")
    table = {}
    for size, entry in topk.items():
        if is_density(entry):
            k = max(1, min(ffn, round(float(entry) * ffn)))
            table[size] = tuple(k if layer in w_in else None for layer in range(shape.num_layers))
        elif isinstance(entry, Sequence) and not isinstance(entry, str):
            table[size] = tuple(entry)
        else:
            raise RouterBankError(
                f"mlp_topk[{size!r}] must be a density in (0, 1] or a sequence of k or None per layer, got "
                f"{describe(entry)}"
            )
    return MlpRouters(rank, w_in, w_out, table)

"""Model shapes, their per-shape sparsity settings (attention density, MLP union densities, MLP router rank), the
benchmark cases and their command-line parsing, and how many layers fit in GPU memory."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..mlp_routers import MLP_BATCH_SIZES, MLP_K_TILE, mlp_width
from ..routers import ModelShape, check_density

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def _llama2_7b(layers: int = 32) -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=16384)


def _llama2_13b(layers: int = 40) -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                       num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=16384)


def _llama3_8b(layers: int = 32) -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=16384,
                       rope_theta=500000.0)


def _opt_6_7b(layers: int = 32) -> PretrainedConfig:
    from transformers import OPTConfig

    return OPTConfig(hidden_size=4096, ffn_dim=16384, num_attention_heads=32, num_hidden_layers=layers,
                     vocab_size=50272, word_embed_proj_dim=4096, max_position_embeddings=16384)


def _opt_66b(layers: int = 64) -> PretrainedConfig:
    from transformers import OPTConfig

    return OPTConfig(hidden_size=9216, ffn_dim=36864, num_attention_heads=72, num_hidden_layers=layers,
                     vocab_size=50272, word_embed_proj_dim=9216, max_position_embeddings=16384)


SHAPES: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama2-7b": _llama2_7b,  # MHA, SiLU MLP
    "llama2-13b": _llama2_13b,  # MHA, 40 heads, SiLU MLP
    "llama3-8b": _llama3_8b,  # GQA 32/8, SiLU MLP
    "opt-6.7b": _opt_6_7b,  # MHA, ReLU MLP
    "opt-66b": _opt_66b,  # MHA, ReLU MLP
}
"""Model shapes by name: each maps a layer count (default: the real model's) to a ``transformers`` config with the
real model's sizes (OPT's learned positions widened to 16384 so long contexts fit)."""

ATTENTION_DENSITY: dict[str, float] = {"opt-66b": 0.3}
"""Attention density of the ``polar-attn`` / ``polar-both`` variants by shape, where not 0.5 (the Polar Sparsity
paper's settings: 0.3 for OPT-66B, 0.5 otherwise); ``--attn-density`` overrides it."""

MLP_UNION_DENSITIES: dict[str, dict[int, float]] = {
    "opt-6.7b": {1: .095, 2: .153, 4: .206, 8: .290, 16: .398, 32: .517, 64: .623, 128: .707, 256: .772},
    "opt-66b": {1: .075, 8: .175, 16: .263, 32: .374, 64: .490, 128: .582, 256: .641},
}
"""The Polar Sparsity authors' mean union densities by batch size (mean k / ffn over layers; issue 13): what the
MLP k tables of the random-weight shapes are built from. Shapes listed here have ReLU MLPs and run the MLP variants."""

MLP_ROUTER_SHARE = 0.03
"""The MLP router's weight bytes r * (hidden + ffn) are kept at most this share of the MLP's 2 * hidden * ffn."""


def attention_density(name: str) -> float:
    """The attention density of shape ``name`` for ``polar-attn`` / ``polar-both`` (:data:`ATTENTION_DENSITY`)."""
    return ATTENTION_DENSITY.get(name, 0.5)


def union_densities(name: str) -> dict[int, float]:
    """Mean MLP union density of shape ``name`` for every batch size of :data:`MLP_BATCH_SIZES`.

    Batch sizes the authors did not list (OPT-66B's 2 and 4) are interpolated linearly in log2 B between the
    nearest listed ones. ``KeyError`` for a shape without ReLU MLP densities.
    """
    listed = MLP_UNION_DENSITIES[name]
    sizes = sorted(listed)
    out = {}
    for batch in MLP_BATCH_SIZES:
        if batch in listed:
            out[batch] = listed[batch]
            continue
        low = max((b for b in sizes if b < batch), default=sizes[0])
        high = min((b for b in sizes if b > batch), default=sizes[-1])
        t = 0.0 if high == low else (math.log2(batch) - math.log2(low)) / (math.log2(high) - math.log2(low))
        out[batch] = listed[low] + t * (listed[high] - listed[low])
    return out


def mlp_topk(densities: dict[int, float], ffn: int, num_layers: int, first_layer: int = 1
             ) -> dict[int, list[int | None]]:
    """The k table ``{B: [k or None per layer]}`` for ``densities`` (batch size -> neuron density): every layer from
    ``first_layer`` on keeps ``k = density * ffn`` rounded up to a multiple of :data:`MLP_K_TILE` (at most ffn);
    earlier layers are dense (None)."""
    table = {}
    for batch, density in densities.items():
        k = min(ffn, MLP_K_TILE * math.ceil(check_density(density) * ffn / MLP_K_TILE))
        table[batch] = [None if layer < first_layer else k for layer in range(num_layers)]
    return table


def mlp_router_rank(hidden: int, ffn: int, share: float = MLP_ROUTER_SHARE) -> int:
    """The MLP router rank: the largest multiple of 64 whose weight bytes r * (hidden + ffn) stay within ``share``
    of the MLP's 2 * hidden * ffn (at least 64). OPT-6.7B: 192, OPT-66B: 384."""
    return max(64, 64 * math.floor(share * 2 * hidden * ffn / (hidden + ffn) / 64))


class Case(NamedTuple):
    """One benchmark case: a model shape (a key of :data:`SHAPES`), a batch size and a context (cache) length."""

    model: str
    batch: int
    context: int


def parse_positive(text: str, what: str, where: str | None = None) -> int:
    """Parse one positive integer; the ``ValueError`` names ``what`` it is (and ``where``, if given)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{where + ': ' if where else ''}{what} {text.strip()!r} is not a positive integer")
    return value


def parse_density(text: str, what: str = "density") -> float:
    """Parse one density in (0, 1]; the ``ValueError`` names ``what`` it is."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} {text.strip()!r} is not a number") from None
    return check_density(value, what)


def _model_name(text: str, where: str | None = None) -> str:
    name = text.strip()
    if name not in SHAPES:
        raise ValueError(f"{where + ': ' if where else ''}model {name!r} is not one of {', '.join(SHAPES)}")
    return name


def _items(spec: str, what: str) -> list[str]:
    items = [item for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError(f"no {what} given in {spec!r}")
    return items


def parse_cases(spec: str) -> list[Case]:
    """Parse ``MODEL:BATCH:CONTEXT,...`` (the ``--cases`` option) into cases, in order.

    Raises ``ValueError`` naming the bad case and field (model, batch or context) on malformed input.
    """
    cases = []
    for item in _items(spec, "cases"):
        fields = item.split(":")
        where = f"case {item.strip()!r}"
        if len(fields) != 3:
            raise ValueError(f"{where}: expected MODEL:BATCH:CONTEXT (3 fields), got {len(fields)}")
        model, batch, context = fields
        cases.append(Case(_model_name(model, where), parse_positive(batch, "batch", where),
                          parse_positive(context, "context", where)))
    return cases


def parse_models(spec: str) -> list[str]:
    """Parse a comma-separated list of model shape names (keys of :data:`SHAPES`); ``ValueError`` names a bad one."""
    return [_model_name(item) for item in _items(spec, "models")]


def parse_sizes(spec: str, what: str = "size") -> list[int]:
    """Parse a comma-separated list of positive integers; ``ValueError`` names the bad entry as ``what``."""
    return [parse_positive(item, what) for item in _items(spec, what)]


def grid(models: Sequence[str], batches: Sequence[int], contexts: Sequence[int]) -> list[Case]:
    """The models x contexts x batches grid, batch varying fastest (the order ``--models/--batch/--context`` run)."""
    return [Case(m, b, c) for m in models for c in contexts for b in batches]


MEMORY_MARGIN = 4 * 2**30
"""Bytes :func:`layers_that_fit` leaves free besides weights, cache and repeated K/V (CUDA graph pools, cuBLAS
workspaces, logits, the allocator's slack)."""


def layers_that_fit(name: str, batch: int, context: int, free_bytes: int, max_layers: int | None = None,
                    sparse_mlp: bool = False) -> int:
    """The most decoder layers of model shape ``name``, up to its real count (or ``max_layers``), whose bf16
    weights and bf16 StaticCache of ``batch`` x ``context`` fit in ``free_bytes``, leaving room for one layer's K/V
    repeated to every head (HF's ``repeat_kv`` in the SDPA variants of GQA models) and :data:`MEMORY_MARGIN`.
    With ``sparse_mlp`` (the MLP variants run), each layer also holds its MLP router (:func:`mlp_router_rank` x
    (hidden + ffn)) and the transposed copy of its down projection that the sparse-MLP graph keeps (ffn x hidden).

    Raises ``ValueError`` naming the case when not even one layer fits.
    """
    from transformers import AutoModelForCausalLM

    config = SHAPES[name]()
    with torch.device("meta"):  # sizes only, nothing allocated
        one_layer, two_layers = (AutoModelForCausalLM.from_config(SHAPES[name](n)) for n in (1, 2))
    one, two = (sum(p.numel() for p in model.parameters()) for model in (one_layer, two_layers))
    bf16 = 2
    shape = ModelShape.of(one_layer)
    heads, kv_heads = shape.num_heads, shape.num_kv_heads
    head_dim = shape.hidden_size // heads
    layer_bytes = (two - one) * bf16 + 2 * batch * context * kv_heads * head_dim * bf16  # weights + K and V
    ffn = mlp_width(one_layer)
    if sparse_mlp and ffn is not None:
        rank = mlp_router_rank(shape.hidden_size, ffn)
        layer_bytes += (ffn * shape.hidden_size + rank * (shape.hidden_size + ffn)) * bf16
    repeated = 2 * batch * context * heads * head_dim * bf16 if kv_heads != heads else 0
    room = free_bytes - (2 * one - two) * bf16 - repeated - MEMORY_MARGIN  # minus embeddings, final norm, head
    fit = min(config.num_hidden_layers, max_layers or config.num_hidden_layers, max(0, room) // layer_bytes)
    if fit < 1:
        raise ValueError(f"{name} B={batch} L={context}: one layer needs {layer_bytes / 2**30:.1f} GiB besides "
                         f"{(free_bytes - room) / 2**30:.1f} GiB of fixed needs, but only "
                         f"{free_bytes / 2**30:.1f} GiB of GPU memory is free")
    return int(fit)

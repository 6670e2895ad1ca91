"""The timed variants: which run for a shape, the routers of a case, what each compiles to, and which layers the
product's own thresholds actually route (the densities the ideal speedup is computed from)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PolarConfig
from ..mlp_routers import mlp_width
from ..routers import ModelShape, RouterBank, kept_units
from ..state import attach
from ..testing import random_routers
from .shapes import MLP_UNION_DENSITIES, mlp_router_rank, mlp_topk, union_densities

VARIANTS = ("eager", "inductor", "inductor-gqa", "polar-1.0", "polar-0.5")
"""The variants every shape runs, in order: (1) eager HF, (2) dense Inductor (HF ``repeat_kv`` + SDPA),
(3) dense Inductor with GQA-native SDPA (the baseline), (4) polar attention at density 1.0, (5) at density 0.5."""

MLP_VARIANTS = ("polar-attn", "polar-mlp", "polar-both")
"""The variants of shapes with ReLU MLPs (:data:`~.shapes.MLP_UNION_DENSITIES`), after :data:`VARIANTS`: polar
attention only at the shape's attention density, the sparse MLP only (k table from the union densities), both."""

BASELINE = "inductor-gqa"
"""The variant every speedup and ideal is measured against; it always runs."""

GQA_ATTENTION = "sdpa_gqa"
"""Name under which :func:`register_gqa_attention` registers :func:`sdpa_gqa_attention` with transformers."""


def variants_for(name: str, selected: Sequence[str] | None = None) -> tuple[str, ...]:
    """The variants shape ``name`` runs, in order: :data:`VARIANTS`, then :data:`MLP_VARIANTS` for a shape with
    ReLU MLPs; only those in ``selected`` when given (an MLP variant selected for a shape without one is skipped)."""
    every = VARIANTS + (MLP_VARIANTS if name in MLP_UNION_DENSITIES else ())
    return tuple(v for v in every if selected is None or v in selected)


def parse_variants(spec: str) -> list[str]:
    """Parse a comma-separated list of variants (of :data:`VARIANTS` and :data:`MLP_VARIANTS`); ``ValueError``
    names a bad one, or the missing baseline :data:`BASELINE` (every ratio divides by it)."""
    names = [item.strip() for item in spec.split(",") if item.strip()]
    if not names:
        raise ValueError(f"no variants given in {spec!r}")
    every = VARIANTS + MLP_VARIANTS
    for name in names:
        if name not in every:
            raise ValueError(f"variant {name!r} is not one of {', '.join(every)}")
    if BASELINE not in names:
        raise ValueError(f"variants must include {BASELINE} (the baseline every speedup is measured against)")
    return names


def sdpa_gqa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                       dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """HF attention function: SDPA on the un-repeated cache (``enable_gqa=True``) with HF's decode mask.

    Same contract as transformers' ``sdpa_attention_forward`` (inputs ``[B, H, S, D]``, output ``[B, S, H, D]``)
    but without materialising ``repeat_kv``; dropout is ignored (inference only).
    """
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_gqa_attention() -> str:
    """Register :func:`sdpa_gqa_attention` (with HF's SDPA mask) as attention implementation ``"sdpa_gqa"``.

    Idempotent. Returns the name to pass to ``model.set_attn_implementation``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_ATTENTION, sdpa_gqa_attention)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    return GQA_ATTENTION


def case_routers(model: nn.Module, name: str, seed: int = 0) -> RouterBank:
    """Random routers for a case: attention routers for layers 1.., and for a shape with ReLU MLPs also MLP
    routers of rank :func:`~.shapes.mlp_router_rank` with the k table :func:`~.shapes.mlp_topk` of the shape's
    :func:`~.shapes.union_densities` (layer 0 dense)."""
    if name not in MLP_UNION_DENSITIES:
        return random_routers(model, seed=seed)
    shape, ffn = ModelShape.of(model), mlp_width(model)
    topk = mlp_topk(union_densities(name), ffn, shape.num_layers)
    return random_routers(model, seed=seed, mlp_rank=mlp_router_rank(shape.hidden_size, ffn), mlp_topk=topk)


def attention_only(bank: RouterBank) -> RouterBank:
    """``bank`` without its MLP routers."""
    return RouterBank(bank.shape, bank.weights, bank.biases, bank.densities, bank.provenance)


def mlp_only(bank: RouterBank) -> RouterBank:
    """``bank``'s MLP routers alone (attention stays dense); ``ValueError`` if it has none."""
    if bank.mlp is None:
        raise ValueError("the MLP variants need a bank with MLP routers (a shape with ReLU MLPs)")
    return RouterBank(bank.shape, {}, {}, provenance=bank.provenance, mlp=bank.mlp)


def compile_variant(model: nn.Module, variant: str, bank: RouterBank, attn_density: float = 0.5
                    ) -> Callable[..., Any]:
    """Set ``model``'s attention implementation for ``variant`` (of :data:`VARIANTS` and :data:`MLP_VARIANTS`)
    and return its step.

    ``eager``: ``model.forward``; ``inductor``/``inductor-gqa``: ``torch.compile(backend="inductor")`` with SDPA or
    GQA-native SDPA; ``polar-D``: attaches ``bank``'s attention routers at density D and compiles with
    ``backend="polar"`` (at D = 1 with ``min_saved_mib=0``, so the selective kernel runs rather than the dense path
    it would pick); ``polar-attn``: its attention routers at ``attn_density``; ``polar-mlp``: its MLP routers only;
    ``polar-both``: both. Compiled steps use ``mode="reduce-overhead", fullgraph=True``; compiling happens on the
    first call.
    """
    if variant not in VARIANTS + MLP_VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS + MLP_VARIANTS)}")
    model.set_attn_implementation(register_gqa_attention() if variant == BASELINE else "sdpa")
    if variant == "eager":
        return model.forward
    if variant in ("inductor", BASELINE):
        return torch.compile(model.forward, backend="inductor", mode="reduce-overhead", fullgraph=True)
    if variant == "polar-attn":
        attach(model, attention_only(bank), density=attn_density)
    elif variant == "polar-mlp":
        attach(model, mlp_only(bank))
    elif variant == "polar-both":
        attach(model, bank, density=attn_density)
    else:
        density = float(variant.split("-")[1])
        # density 1.0 forces the kernel (min_saved_mib=0): by default such a site saves nothing and stays dense
        attach(model, attention_only(bank), density=density, min_saved_mib=0.0 if density == 1.0 else None)
    return torch.compile(model.forward, backend="polar", mode="reduce-overhead", fullgraph=True)


def attention_density_run(bank: RouterBank, density: float, batch: int, context: int, thresholds: bool = True
                          ) -> float:
    """The mean attention density over all layers that a polar step at ``density`` runs on CUDA (bf16): layers
    without a router (layer 0) count as 1, and so, with ``thresholds``, do sites the pass keeps dense
    (:attr:`PolarConfig.CUDA_MIN_SAVED_MIB`: too few K/V bytes saved)."""
    shape = bank.shape
    units, head_dim = shape.num_kv_heads, shape.hidden_size // shape.num_heads
    k = kept_units(density, units)
    saved = (units - k) * batch * context * head_dim * 2 * 2  # K and V, bf16
    routed = not thresholds or saved > PolarConfig().saved_bytes_threshold("cuda")
    kept = [k / units if routed and layer in bank.weights else 1.0 for layer in range(shape.num_layers)]
    return sum(kept) / len(kept)


def mlp_ks_run(bank: RouterBank, batch: int) -> list[int | None]:
    """Per layer, the k a sparse-MLP step of ``batch`` sequences runs on CUDA, or None where the MLP stays dense:
    no router, no table row that large, or k past the break-even (:attr:`PolarConfig.CUDA_MLP_BREAK_EVEN`)."""
    mlp = bank.mlp
    if mlp is None:
        return [None] * bank.shape.num_layers
    ffn = mlp.ffn_size
    weight_bytes = 2 * bank.shape.hidden_size * ffn * 2  # the bench's ReLU MLPs: plain, bf16
    break_even = PolarConfig().mlp_break_even("cuda", batch, weight_bytes)
    ks = [mlp.k_for(layer, batch) for layer in range(bank.shape.num_layers)]
    return [k if k is not None and k <= break_even * ffn else None for k in ks]


def mlp_density(ks: Sequence[int | None], ffn: int) -> float:
    """Mean k / ffn over all layers, a dense layer (None) counting as 1."""
    return sum(1.0 if k is None else k / ffn for k in ks) / len(ks)


def mlp_table_ks(bank: RouterBank, batch: int) -> list[int | None]:
    """Per layer, the k of ``bank``'s table at ``batch`` (None: dense), before any break-even."""
    mlp = bank.mlp
    if mlp is None:
        return [None] * bank.shape.num_layers
    return [mlp.k_for(layer, batch) for layer in range(bank.shape.num_layers)]

"""Where a step's GPU time goes (kernel categories from the profiler) and the ideal (Amdahl) speedups computed from
the dense baseline's attention and MLP time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..mlp_routers import mlp_width
from .step import DecodeStep

Row = dict[str, Any]

PROFILED = ("inductor-gqa", "polar-0.5", "polar-attn", "polar-mlp", "polar-both")
"""The variants whose step the benchmark breaks down by kernel category (:func:`kernel_breakdown`) when they run:
the baseline and the sparse steps."""

KERNEL_CATEGORIES = ("attention", "GEMMs", "router", "mlp", "other")
"""The categories of :func:`kernel_breakdown`, in the order tables list them."""

MLP_KERNELS = ("_gather_up_kernel", "_gather_down_kernel", "_finish_kernel")
"""The sparse MLP's Triton kernels (``kernels/gather_gemm.py``): the gather-GEMMs and the split-summing finish."""

ROUTER_KERNELS = ("_route_kernel", "_low_kernel", "_scores_kernel", "_histogram_kernel", "_boundary_kernel",
                  "_write_kernel")
"""The routers' Triton kernels: attention (``kernels/route.py``) and the MLP's ``x @ w_in^T`` (up to 16 rows),
scores and top-k (``kernels/mlp_route.py``)."""


def is_attention_kernel(name: str) -> bool:
    """Whether a CUDA kernel name is dense SDPA's attention kernel (cuDNN, flash or memory-efficient), not a
    fused Inductor kernel named after the ops it feeds."""
    return not name.startswith("triton_") and any(tag in name for tag in ("sdpa", "fmha", "flash"))


def kernel_category(name: str) -> str:
    """The category (one of :data:`KERNEL_CATEGORIES`) of a CUDA kernel by its name.

    ``attention``: dense SDPA or our selective attention kernels; ``GEMMs``: cuBLAS/CUTLASS GEMMs and Inductor's
    Triton GEMM templates; ``router``: the routers' Triton kernels (:data:`ROUTER_KERNELS`) and the sorts and
    fp32 batch sums of the MLP router's reference path (layers wider than ``MAX_SELECT_NEURONS``); the MLP router's
    cuBLAS GEMM (batches above 16 rows) looks like any other GEMM and counts as ``GEMMs``
    (:func:`~.step.mlp_router_seconds` times the whole router on its own); ``mlp``: the sparse MLP's gather-GEMMs
    and their finish (:data:`MLP_KERNELS`); ``other``: anything else (Inductor's fused kernels, copies, memsets,
    the cache write).
    """
    if name in ROUTER_KERNELS:
        return "router"
    if name.startswith(MLP_KERNELS):
        return "mlp"
    if is_attention_kernel(name) or name.startswith("_select_attention"):
        return "attention"
    if name.startswith("triton_tem_fused_") and "mm" in name:  # Inductor's Triton GEMM templates (max-autotune)
        return "GEMMs"
    if not name.startswith("triton_") and any(tag in name.lower() for tag in ("gemm", "nvjet", "cutlass", "xmma")):
        return "GEMMs"
    if not name.startswith("triton_") and ("sort" in name.lower() or "sum_functor" in name):  # only polar::mlp_route
        return "router"  # sorts or reduces eagerly in a compiled decode step (its reference path)
    return "other"


def kernel_breakdown(step: DecodeStep, fn: Callable[..., Any], steps: int = 5, *,
                     category: Callable[[str], str] = kernel_category,
                     categories: tuple[str, ...] = KERNEL_CATEGORIES) -> dict[str, float]:
    """GPU seconds per step in each of ``categories`` (by ``category`` of the kernel's name; a name outside them
    counts as ``other``), while ``fn`` runs ``steps`` back-to-back decode steps under the profiler (kernels inside
    CUDA graphs included)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step.reset()
            fn(**step.inputs)
        torch.cuda.synchronize()
    seconds = dict.fromkeys(categories, 0.0)
    for event in prof.key_averages():
        name = category(event.key)
        seconds[name if name in seconds else "other"] += event.self_device_time_total / 1e6 / steps
    return seconds


def mlp_gemm_fraction(model: nn.Module) -> float:
    """The MLP's share of the weight elements that a decode step's GEMMs read: weights of ``nn.Linear`` modules
    with the MLP width (ffn) on either side (the LM head aside), over those of all ``nn.Linear`` modules (LM head
    included).

    The baseline's MLP time T_mlp is estimated as its profiled GEMM time times this share: a decode step's GEMMs
    are weight-read bound, and CUDA graphs hide which op launched which cuBLAS kernel.
    """
    ffn, head = mlp_width(model), model.get_output_embeddings()
    mlp = total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel()
            if module is not head and ffn in (module.in_features, module.out_features):
                mlp += module.weight.numel()
    return mlp / total if total else 0.0


def ideal_speedup(step_seconds: float, attn_seconds: float, density: float, routed_share: float = 1.0) -> float:
    """Amdahl's bound on the sparse step's speedup: T / (T - (1 - d) * r * min(T_attn, T)).

    ``step_seconds`` is the dense step T, ``attn_seconds`` its attention time T_attn (capped at T),
    ``density`` the kept fraction d and ``routed_share`` r the share of the attention that is routed (layers with
    a router over all layers; layer 0 stays dense).
    """
    return step_seconds / (step_seconds - (1 - density) * routed_share * min(attn_seconds, step_seconds))


def amdahl(step_seconds: float, parts: Sequence[tuple[float, float]]) -> float:
    """Amdahl's bound with several sped-up parts: T / (T - sum (1 - d_i) * T_i) for ``parts`` of (T_i, d_i).

    The bench uses (T_attn, d_attn) and (T_mlp, d_mlp), each d the mean density over all layers (dense layers
    count as 1). The saving is capped at T (infinite speedup).
    """
    saved = min(step_seconds, sum((1 - density) * seconds for seconds, density in parts))
    return float("inf") if saved >= step_seconds else step_seconds / (step_seconds - saved)


def add_ideals(row: Row, attn_seconds: float, routed_share: float) -> Row:
    """Add ``attention-share``, ``ideal-0.5`` and ``ideal-0.5-layer0-dense`` to ``row`` (in place; returned).

    The baseline T is ``row["inductor-gqa"]`` (dense Inductor, GQA-native SDPA); ``attn_seconds`` is T_attn
    for all layers; ``routed_share`` is the fraction of layers with a router.
    """
    base = row["inductor-gqa"]
    row["attention-share"] = attn_seconds / base
    row["ideal-0.5"] = ideal_speedup(base, attn_seconds, 0.5)
    row["ideal-0.5-layer0-dense"] = ideal_speedup(base, attn_seconds, 0.5, routed_share)
    return row


def add_mlp_ideals(row: Row, attn_seconds: float, mlp_seconds: float) -> Row:
    """Add the ideals of the MLP variants to ``row`` (in place; returned), from the baseline T =
    ``row["inductor-gqa"]``, T_attn, T_mlp and the row's densities:

    ``ideal-polar-attn`` (attention term only), ``ideal-polar-mlp`` (MLP term only), ``ideal-polar-both`` (both),
    each with the densities the step runs (``d-attn-run``, ``d-mlp-run``: layers the pass keeps dense count as 1),
    and ``ideal-polar-both-table`` with the nominal ones (``d-attn-table``, ``d-mlp-table``: the attention density
    on every layer with a router and the k table, whatever the pass's thresholds keep dense). All four densities
    are means over all layers, layer 0 (no router) counting as 1, since T_attn and T_mlp cover all layers.
    """
    base = row["inductor-gqa"]
    attn, mlp = (attn_seconds, row["d-attn-run"]), (mlp_seconds, row["d-mlp-run"])
    row["attention-seconds"], row["mlp-seconds"] = attn_seconds, mlp_seconds
    row["ideal-polar-attn"] = amdahl(base, [attn])
    row["ideal-polar-mlp"] = amdahl(base, [mlp])
    row["ideal-polar-both"] = amdahl(base, [attn, mlp])
    row["ideal-polar-both-table"] = amdahl(base, [(attn_seconds, row["d-attn-table"]),
                                                  (mlp_seconds, row["d-mlp-table"])])
    return row

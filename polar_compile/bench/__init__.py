"""Decode-throughput benchmark (``polar-compile bench``): steady-state batched decode, side by side in one process.

For each case (model shape, batch B, context L) it times one decode step of: eager HF, dense Inductor as
transformers ships it, dense Inductor with GQA-native SDPA (the baseline, (3)), and polar attention at densities 1.0
and 0.5; for shapes with ReLU MLPs (OPT) also polar attention only at the shape's attention density (0.3 for
OPT-66B, 0.5 otherwise, or --attn-density), the sparse MLP only, and both (all compiled with
``mode="reduce-overhead"``, CUDA graphs). Random bf16 weights and random routers: speed does not depend on which
heads or neurons are chosen. The MLP k tables come from the Polar Sparsity authors' mean union densities per batch
size (OPT-66B's B=2 and 4 interpolated in log2 B), k rounded up to the gather kernels' tile of 64, layer 0 dense;
the MLP router rank is the largest multiple of 64 whose weights stay within 3% of the MLP's bytes. The cache of
length L is filled with random K/V and every step attends to all L positions (the write counter is reset before each
step with one launch). Steps are timed back to back (the main numbers) and host-synced one by one
(see :meth:`DecodeStep.time`).

The ideal speedup is Amdahl's, T / (T - (1 - d_attn) * T_attn - (1 - d_mlp) * T_mlp), with T the baseline step,
T_attn the GPU time of its attention kernels (profiled), T_mlp its GEMM time times the MLP's share of the GEMM
weights (an estimate: decode GEMMs are weight-read bound, and CUDA graphs hide which op launched a cuBLAS kernel),
and d the mean densities over all layers that the step runs (layer 0 and sites the pass keeps dense count as 1).
The MLP routers are also timed on their own (their GEMMs cannot be told apart in the step's profile).

Needs a CUDA GPU (CUDA events, CUDA graphs). ``transformers`` and ``matplotlib`` are imported inside the functions
that use them, so importing this package stays cheap. Files: ``shapes`` (shapes, densities, cases, parsing),
``step`` (the decode step, timing), ``variants`` (what each variant compiles, its routers), ``profile`` (kernel
categories, ideals), ``run`` (a case, a benchmark), ``report`` (tables, plot, results files).
"""

from __future__ import annotations

from .profile import (
    KERNEL_CATEGORIES,
    MLP_KERNELS,
    PROFILED,
    add_ideals,
    add_mlp_ideals,
    amdahl,
    ideal_speedup,
    is_attention_kernel,
    kernel_breakdown,
    kernel_category,
    mlp_gemm_fraction,
)
from .report import (
    breakdown_markdown,
    markdown,
    merge_results,
    mlp_markdown,
    plot,
    report,
    tables,
    write_results,
)
from .run import run_benchmark, run_case
from .shapes import (
    ATTENTION_DENSITY,
    MEMORY_MARGIN,
    MLP_ROUTER_SHARE,
    MLP_UNION_DENSITIES,
    SHAPES,
    Case,
    attention_density,
    grid,
    layers_that_fit,
    mlp_router_rank,
    mlp_topk,
    parse_cases,
    parse_density,
    parse_models,
    parse_positive,
    parse_sizes,
    union_densities,
)
from .step import CudaUnavailableError, DecodeStep, full_compiles, mlp_router_seconds, require_cuda
from .variants import (
    BASELINE,
    GQA_ATTENTION,
    MLP_VARIANTS,
    VARIANTS,
    case_routers,
    compile_variant,
    parse_variants,
    register_gqa_attention,
    sdpa_gqa_attention,
    variants_for,
)

__all__ = [
    # shapes, cases, sparsity settings
    "SHAPES",
    "VARIANTS",
    "MLP_VARIANTS",
    "BASELINE",
    "Case",
    "parse_cases",
    "parse_models",
    "parse_sizes",
    "parse_positive",
    "parse_density",
    "parse_variants",
    "grid",
    "layers_that_fit",
    "MEMORY_MARGIN",
    "variants_for",
    "ATTENTION_DENSITY",
    "attention_density",
    "MLP_UNION_DENSITIES",
    "union_densities",
    "mlp_topk",
    "MLP_ROUTER_SHARE",
    "mlp_router_rank",
    "case_routers",
    # GQA-native dense attention
    "GQA_ATTENTION",
    "sdpa_gqa_attention",
    "register_gqa_attention",
    # measuring
    "CudaUnavailableError",
    "require_cuda",
    "DecodeStep",
    "compile_variant",
    "full_compiles",
    "mlp_router_seconds",
    "is_attention_kernel",
    "KERNEL_CATEGORIES",
    "MLP_KERNELS",
    "PROFILED",
    "kernel_category",
    "kernel_breakdown",
    "mlp_gemm_fraction",
    "ideal_speedup",
    "amdahl",
    "add_ideals",
    "add_mlp_ideals",
    "run_case",
    "run_benchmark",
    # writing
    "markdown",
    "mlp_markdown",
    "breakdown_markdown",
    "tables",
    "write_results",
    "plot",
    "report",
    "merge_results",
]

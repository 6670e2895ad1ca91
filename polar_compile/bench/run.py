"""Running the benchmark on CUDA: one case (every variant of one model shape, B and L) and a list of cases."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .profile import PROFILED, Row, add_ideals, add_mlp_ideals, kernel_breakdown, mlp_gemm_fraction
from .report import report, write_results
from .shapes import SHAPES, Case, attention_density, layers_that_fit
from .step import DecodeStep, full_compiles, mlp_router_seconds
from .variants import (
    BASELINE,
    MLP_VARIANTS,
    attention_density_run,
    case_routers,
    compile_variant,
    mlp_density,
    mlp_ks_run,
    mlp_table_ks,
    variants_for,
)


def _release_memory() -> None:
    # CUDA-graph pools are private: memory the caching allocator holds for other uses can't serve them, and at
    # large B x L (Llama-3.1-8B B=128 L=8192) that slack is the 8 GiB a variant's repeat_kv needs
    gc.collect()
    torch.cuda.empty_cache()


def run_case(name: str, batch: int, context: int, repeats: int, max_layers: int | None = None,
             variants: Sequence[str] | None = None, attn_density: float | None = None, device: str = "cuda") -> Row:
    """Time the variants of one case on CUDA (:func:`~.variants.variants_for`, those in ``variants`` if given; the
    baseline ``inductor-gqa`` always) and return its row (seconds, ratios).

    The model has all its layers, or ``max_layers``, or fewer when memory forces it (:func:`layers_that_fit`).
    The row holds ``model, layers, batch, context, variants``, per variant its step seconds (back to back,
    ``<variant>-synced``, ``<variant>-first-call``: compile + capture), ``<variant>-gpu`` for the :data:`PROFILED`
    variants (:func:`kernel_breakdown`), ``router-share`` (the router kernel's share of the polar 0.5 step) and the
    :func:`add_ideals` fields, with T_attn = the GPU time of the attention kernels of the baseline.

    For a shape with ReLU MLPs running an MLP variant, also ``attn-density`` (``attn_density``, default the shape's
    :func:`~.shapes.attention_density`), ``mlp-rank``, the densities ``d-attn-table``, ``d-attn-run``,
    ``d-mlp-table``, ``d-mlp-run`` (means over all layers; see :func:`add_mlp_ideals`), ``mlp-k-run`` (k per layer,
    None: dense), ``mlp-gemm-fraction`` and T_mlp = the baseline's GEMM time times it (:func:`mlp_gemm_fraction`),
    ``mlp-router`` (:func:`~.step.mlp_router_seconds`) and the :func:`add_mlp_ideals` fields.
    Every compile is a full one (:func:`full_compiles`). Prints a line per variant. ``device`` is for tests (the
    row's bookkeeping on the CPU, with the timing replaced).
    """
    from transformers import AutoModelForCausalLM

    chosen = variants_for(name, None if variants is None else {*variants, BASELINE})
    sparse_mlp = any(v in MLP_VARIANTS for v in chosen)
    _release_memory()
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 2**62
    layers = layers_that_fit(name, batch, context, free, max_layers, sparse_mlp=sparse_mlp)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(SHAPES[name](layers), dtype=torch.bfloat16).eval()
    step = DecodeStep(model, batch, context, device)
    bank = case_routers(model, name)
    row: Row = {"model": name, "layers": layers, "batch": batch, "context": context, "variants": list(chosen)}
    density = attention_density(name) if attn_density is None else attn_density
    if sparse_mlp:
        table, run = mlp_table_ks(bank, batch), mlp_ks_run(bank, batch)
        ffn = bank.mlp.ffn_size
        row.update({"attn-density": density, "mlp-rank": bank.mlp.rank, "mlp-k-run": run,
                    "d-attn-table": attention_density_run(bank, density, batch, context, thresholds=False),
                    "d-attn-run": attention_density_run(bank, density, batch, context),
                    "d-mlp-table": mlp_density(table, ffn), "d-mlp-run": mlp_density(run, ffn)})
        print(f"  {name} ({layers} layers) B={batch} L={context}: attention density {density:g} "
              f"(mean over layers {row['d-attn-table']:.3f}, runs {row['d-attn-run']:.3f}); MLP router rank "
              f"{bank.mlp.rank}, k {max((k for k in table if k), default=ffn)} of {ffn} (mean density "
              f"{row['d-mlp-table']:.3f}, runs {row['d-mlp-run']:.3f}: "
              f"{sum(k is None for k in run)} of {layers} layers dense)", flush=True)
    with full_compiles():
        for variant in chosen:
            torch._dynamo.reset()  # also frees the previous variant's CUDA-graph pool
            _release_memory()
            fn = compile_variant(model, variant, bank, density)
            seconds, synced, first = step.time(fn, repeats)
            row[variant], row[f"{variant}-synced"], row[f"{variant}-first-call"] = seconds, synced, first
            print(f"  {name} ({layers} layers) B={batch} L={context} {variant:>13}: {seconds * 1e3:8.3f} ms/step "
                  f"back to back, {synced * 1e3:8.3f} host-synced, first call {first:6.1f} s", flush=True)
            if variant in PROFILED:
                row[f"{variant}-gpu"] = kernel_breakdown(step, fn)
    torch._dynamo.reset()
    _release_memory()
    if "polar-0.5-gpu" in row:
        row["router-share"] = row["polar-0.5-gpu"]["router"] / row["polar-0.5"]
    t_attn = row[f"{BASELINE}-gpu"]["attention"]
    add_ideals(row, t_attn, len(bank.weights) / layers)  # layer 0 stays dense by design
    if sparse_mlp:
        row["mlp-gemm-fraction"] = mlp_gemm_fraction(model)
        add_mlp_ideals(row, t_attn, row[f"{BASELINE}-gpu"]["GEMMs"] * row["mlp-gemm-fraction"])
        routers = [(bank.mlp.w_in[layer], bank.mlp.w_out[layer], k) for layer, k in enumerate(row["mlp-k-run"])
                   if k is not None]
        row["mlp-router"] = mlp_router_seconds(routers, batch)
    return row


def run_benchmark(cases: Iterable[Case | tuple[str, int, int]], repeats: int, out: str | Path,
                  max_layers: int | None = None, variants: Sequence[str] | None = None,
                  attn_density: float | None = None) -> list[Row]:
    """Run :func:`run_case` for each case on CUDA (at most ``max_layers`` layers each, default all that fit; the
    ``variants`` given, default all of each shape's; ``attn_density`` for the MLP shapes' attention, default each
    shape's), rewriting ``out/decode.json`` and ``decode.md`` after each.

    Then writes the report (:func:`~.report.report`). Call :func:`~.step.require_cuda` first for a readable error
    on machines without a GPU. Returns the rows.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, batch, context in cases:
        rows.append(run_case(name, batch, context, repeats, max_layers, variants, attn_density))
        write_results(rows, out)
    report(rows, out)
    return rows

"""``polar-compile bench --tp N``: tensor-parallel decode on N GPUs of one host, launched with ``torchrun``.

    torchrun --nproc-per-node 2 -m polar_compile.cli bench --tp 2 --cases llama3-8b:64:8192 --layers 8 --out out/

Each rank builds the same random bf16 model, shards it with :func:`polar_compile.distributed.parallelize` (q/k/v
and MLP up column-wise, output and MLP down row-wise; every rank holds H/N heads and its slice of the cache) and
times, side by side in one job, :data:`TP_VARIANTS`: dense Inductor with GQA-native SDPA (the baseline), polar
attention at density 1.0 (the selective kernel on every unit) and at 0.5 (each rank keeps its own top half of its
units), all ``mode="reduce-overhead"`` (CUDA graphs with the all-reduces inside). MLPs stay dense under TP. Rank 0
writes ``decode-tp.json`` and ``decode-tp.md``: per variant ms/step, tokens/s, the profile of one step (attention,
GEMMs, collectives, router, other), the Amdahl ideal of polar 0.5 from the baseline's attention time, and which
attention sites each polar variant routes (:func:`tp_sites`; printed before it is timed, with a warning when none).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import parallelize
from ..testing import random_routers
from .profile import Row, ideal_speedup, kernel_breakdown, kernel_category
from .shapes import SHAPES, Case, layers_that_fit
from .step import DecodeStep, full_compiles
from .variants import BASELINE, compile_variant

TP_VARIANTS = (BASELINE, "polar-1.0", "polar-0.5")
"""What ``bench --tp`` times per case: dense TP Inductor (GQA-native SDPA), polar 1.0, polar 0.5."""

TP_CATEGORIES = ("attention", "GEMMs", "collectives", "router", "other")


def tp_mesh(tp: int) -> Any:
    """The 1-D CUDA device mesh of this ``torchrun`` job (NCCL), which must have ``tp`` ranks; sets this rank's GPU.

    Raises ``RuntimeError`` outside ``torchrun`` and ``ValueError`` when the job's world size is not ``tp``.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError(f"bench --tp {tp} runs one process per GPU under torchrun: torchrun --nproc-per-node {tp} "
                           f"-m polar_compile.cli bench --tp {tp} ...")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    if dist.get_world_size() != tp:
        raise ValueError(f"bench --tp {tp}, but torchrun started {dist.get_world_size()} processes")
    return init_device_mesh("cuda", (tp,))


def tp_breakdown(step: DecodeStep, fn: Callable[..., Any], steps: int = 5) -> dict[str, float]:
    """GPU seconds per step by :data:`TP_CATEGORIES` on this rank: :func:`~.profile.kernel_breakdown`, with NCCL
    kernels as ``collectives`` (they count as ``other`` there)."""
    return kernel_breakdown(step, fn, steps, category=_tp_category, categories=TP_CATEGORIES)


def _tp_category(name: str) -> str:
    return "collectives" if "nccl" in name.lower() else kernel_category(name)


def tp_sites(step: DecodeStep, model: Any) -> dict[str, Any]:
    """What ``backend="polar"`` does to the attention sites of ``model``'s decode step on this rank, with the routers
    attached (:func:`polar_compile.explain`: one traced step, no Inductor; every rank must call it, the step runs
    the all-reduces): ``routed`` of ``sites`` attention sites, ``gqa`` dense sites that read the un-repeated cache,
    and ``dense``: each reason with its layers."""
    from ..explain import explain

    step.reset()
    report = explain(model, **step.inputs)
    dense: dict[str, list[int | None]] = {}
    for site in report.dense:
        dense.setdefault(site.reason, []).append(site.layer)
    return {"routed": len(report.rewritten), "sites": len(report.sites),
            "gqa": sum(site.rewritten for site in report.sites_of("gqa")), "dense": dense}


def run_tp_case(name: str, batch: int, context: int, repeats: int, mesh: Any, max_layers: int | None = None) -> Row:
    """Time :data:`TP_VARIANTS` of one case on this rank of ``mesh``; every rank must call it. Returns the row
    (rank 0's times; ranks wait for each other in every all-reduce)."""
    from transformers import AutoModelForCausalLM

    tp = mesh.size()
    free = torch.tensor(torch.cuda.mem_get_info()[0], device="cuda")
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    # weights and cache split over the ranks (embeddings and LM head are not; the memory margin covers them)
    layers = layers_that_fit(name, batch, context, int(free.item()) * tp, max_layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(SHAPES[name](layers), dtype=torch.bfloat16).eval()
    parallelize(model, mesh)
    step = DecodeStep(model, batch, context, "cuda")
    bank = random_routers(model)  # attention routers, layers 1..; attach slices each rank's rows
    row: Row = {"model": name, "layers": layers, "batch": batch, "context": context, "tp": tp,
                "variants": list(TP_VARIANTS)}
    with full_compiles():
        for variant in TP_VARIANTS:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            fn = compile_variant(model, variant, bank)
            if variant != BASELINE:  # say what the polar step routes before timing it (a dense one is no polar)
                sites = row[f"{variant}-sites"] = tp_sites(step, model)
                if mesh.get_rank() == 0:
                    print(f"  TP={tp} {name} {variant}: {sites['routed']} of {sites['sites']} attention sites routed, "
                          f"{sites['gqa']} dense ones GQA-native; dense: {sites['dense']}", flush=True)
                    if not sites["routed"]:
                        print(f"  WARNING: {variant} routes no attention site: its time is that of a dense step",
                              flush=True)
            seconds, synced, first = step.time(fn, repeats)
            row[variant], row[f"{variant}-synced"], row[f"{variant}-first-call"] = seconds, synced, first
            row[f"{variant}-tokens/s"] = batch / seconds
            row[f"{variant}-gpu"] = tp_breakdown(step, fn)
            if mesh.get_rank() == 0:
                print(f"  TP={tp} {name} ({layers} layers) B={batch} L={context} {variant:>13}: "
                      f"{seconds * 1e3:8.3f} ms/step, {batch / seconds:9.0f} tokens/s, first call {first:6.1f} s",
                      flush=True)
    torch._dynamo.reset()
    base = row[BASELINE]
    ideal = ideal_speedup(base, row[f"{BASELINE}-gpu"]["attention"], 0.5, len(bank.weights) / layers)
    row.update({"speedup-0.5": base / row["polar-0.5"], "ideal-0.5-layer0-dense": ideal,
                "of-ideal-0.5": base / row["polar-0.5"] / ideal, "polar-1.0-vs-dense": row["polar-1.0"] / base})
    return row


def tp_markdown(rows: list[Row]) -> str:
    """The table of ``decode-tp.md``: per case, ms/step and tokens/s of each variant, speedup vs ideal, profile."""
    lines = ["| case | TP | layers | dense TP ms (tok/s) | polar 1.0 ms (vs dense) | polar 0.5 ms | speedup | ideal | "
             "of ideal |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} B={r['batch']} L={r['context']} | {r['tp']} | {r['layers']} | {r[BASELINE] * 1e3:.3f} "
            f"({r[f'{BASELINE}-tokens/s']:.0f}) | {r['polar-1.0'] * 1e3:.3f} ({r['polar-1.0-vs-dense']:.3f}x) | "
            f"{r['polar-0.5'] * 1e3:.3f} | {r['speedup-0.5']:.3f}x | {r['ideal-0.5-layer0-dense']:.3f}x | "
            f"{r['of-ideal-0.5']:.1%} |")
    lines += ["", "GPU ms per step on rank 0, by kernel category:", "",
              "| case | variant | " + " | ".join(TP_CATEGORIES) + " |", "|---|---|" + "---|" * len(TP_CATEGORIES)]
    for r in rows:
        for variant in r["variants"]:
            cells = " | ".join(f"{r[f'{variant}-gpu'][c] * 1e3:.3f}" for c in TP_CATEGORIES)
            lines.append(f"| {r['model']} B={r['batch']} L={r['context']} | {variant} | {cells} |")
    sited = [(r, variant) for r in rows for variant in r["variants"] if f"{variant}-sites" in r]
    if sited:
        lines += ["", "Attention sites of the decode step on rank 0 (polar_compile.explain):", "",
                  "| case | variant | routed | GQA-native (dense) | dense: why (layers) |", "|---|---|---|---|---|"]
        for r, variant in sited:
            sites = r[f"{variant}-sites"]
            why = "; ".join(f"{reason} ({', '.join(map(str, layers))})" for reason, layers in sites["dense"].items())
            lines.append(f"| {r['model']} B={r['batch']} L={r['context']} | {variant} | {sites['routed']} of "
                         f"{sites['sites']} | {sites['gqa']} | {why or '-'} |")
    return "\n".join(lines) + "\n"


def run_tp_benchmark(cases: Iterable[Case | tuple[str, int, int]], tp: int, repeats: int, out: str | Path,
                     max_layers: int | None = None) -> list[Row]:
    """Run :func:`run_tp_case` for each case on this ``torchrun`` job of ``tp`` ranks; rank 0 rewrites
    ``out/decode-tp.json`` and ``decode-tp.md`` after each case. Returns the rows."""
    mesh = tp_mesh(tp)
    out = Path(out)
    rows = []
    for name, batch, context in cases:
        rows.append(run_tp_case(name, batch, context, repeats, mesh, max_layers))
        if mesh.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "decode-tp.json").write_text(json.dumps(rows, indent=2) + "\n")
            (out / "decode-tp.md").write_text(tp_markdown(rows))
    dist.barrier()
    return rows

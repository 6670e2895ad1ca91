"""Decode-throughput benchmark (``polar-compile bench``): steady-state batched decode, side by side in one process.

For each case (model shape, batch B, context L) it times one decode step of: eager HF, dense Inductor as
transformers ships it, dense Inductor with GQA-native SDPA, and polar at densities 1.0 and 0.5 (all compiled with
``mode="reduce-overhead"``, CUDA graphs). Random bf16 weights and random routers: speed does not depend on which
heads are chosen. The cache of length L is filled with random K/V and every step attends to all L positions (the
write counter is reset before each step with one launch). Steps are timed back to back (the main numbers) and
host-synced one by one (see :meth:`DecodeStep.time`). The ideal polar speedup is Amdahl's,
T / (T - (1 - d) * T_attn), with T the GQA-native dense step and T_attn the GPU time of its attention kernels in
that step (profiled).

Needs a CUDA GPU (CUDA events, CUDA graphs). ``transformers`` and ``matplotlib`` are imported inside the functions
that use them, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .routers import ModelShape, RouterBank
from .state import attach
from .testing import random_routers

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    # shapes, cases
    "SHAPES",
    "VARIANTS",
    "Case",
    "parse_cases",
    "parse_models",
    "parse_sizes",
    "parse_positive",
    "grid",
    "layers_that_fit",
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
    "is_attention_kernel",
    "KERNEL_CATEGORIES",
    "PROFILED",
    "kernel_category",
    "kernel_breakdown",
    "ideal_speedup",
    "add_ideals",
    "run_case",
    "run_benchmark",
    # writing
    "markdown",
    "breakdown_markdown",
    "tables",
    "write_results",
    "plot",
    "report",
    "merge_results",
]

Row = dict[str, Any]


def _llama2_7b(layers: int = 32) -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
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


SHAPES: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama2-7b": _llama2_7b,  # MHA
    "llama3-8b": _llama3_8b,  # GQA 32/8
    "opt-6.7b": _opt_6_7b,  # MHA
}
"""Model shapes by name: each maps a layer count (default: the real model's) to a ``transformers`` config with the
real model's sizes."""

VARIANTS = ("eager", "inductor", "inductor-gqa", "polar-1.0", "polar-0.5")
"""The timed variants, in the order they run: (1) eager HF, (2) dense Inductor (HF ``repeat_kv`` + SDPA),
(3) dense Inductor with GQA-native SDPA, (4) polar at density 1.0, (5) polar at density 0.5."""

PROFILED = ("inductor-gqa", "polar-0.5")
"""The variants whose step :func:`run_case` breaks down by kernel category (the baseline and the sparse step)."""

GQA_ATTENTION = "sdpa_gqa"
"""Name under which :func:`register_gqa_attention` registers :func:`sdpa_gqa_attention` with transformers."""


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


def layers_that_fit(name: str, batch: int, context: int, free_bytes: int, max_layers: int | None = None) -> int:
    """The most decoder layers of model shape ``name``, up to its real count (or ``max_layers``), whose bf16
    weights and bf16 StaticCache of ``batch`` x ``context`` fit in ``free_bytes``, leaving room for one layer's K/V
    repeated to every head (HF's ``repeat_kv`` in the SDPA variants of GQA models) and :data:`MEMORY_MARGIN`.

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
    repeated = 2 * batch * context * heads * head_dim * bf16 if kv_heads != heads else 0
    room = free_bytes - (2 * one - two) * bf16 - repeated - MEMORY_MARGIN  # minus embeddings, final norm, head
    fit = min(config.num_hidden_layers, max_layers or config.num_hidden_layers, max(0, room) // layer_bytes)
    if fit < 1:
        raise ValueError(f"{name} B={batch} L={context}: one layer needs {layer_bytes / 2**30:.1f} GiB besides "
                         f"{(free_bytes - room) / 2**30:.1f} GiB of fixed needs, but only "
                         f"{free_bytes / 2**30:.1f} GiB of GPU memory is free")
    return int(fit)


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


class CudaUnavailableError(RuntimeError):
    """Raised by :func:`require_cuda` when no CUDA GPU is usable."""


def require_cuda() -> None:
    """Raise :class:`CudaUnavailableError` with a readable reason unless ``torch.cuda.is_available()``."""
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda}" if torch.version.cuda
                                                  else "built without CUDA")
        raise CudaUnavailableError(
            "the decode benchmark needs a CUDA GPU (it times with CUDA events and runs CUDA graphs), but "
            f"torch.cuda.is_available() is False ({build})")


class DecodeStep:
    """A model, a StaticCache of length L filled with random K/V, and the inputs of the step at position L-1.

    ``reset()`` rewinds the cache write counter so every step attends to all L positions; ``time(step, repeats)``
    times ``step(**inputs)`` with CUDA events. ``device`` is for tests; the benchmark uses CUDA.
    """

    def __init__(self, model: nn.Module, batch: int, context: int, device: str | torch.device = "cuda") -> None:
        from transformers import StaticCache

        self.model, self.batch, self.context = model, batch, context
        self._rewind: list[Tensor] = []  # L-1 per counter, the source of reset()'s one copy
        self.cache = StaticCache(config=model.config, max_cache_len=context)
        self.inputs = dict(
            input_ids=torch.randint(0, model.config.vocab_size, (batch, 1), device=device),
            past_key_values=self.cache, use_cache=True,
            cache_position=torch.tensor([context - 1], device=device),
            position_ids=torch.full((batch, 1), context - 1, device=device),
            # explicit: without it OPT sizes its own mask from the cache length, a data-dependent size
            attention_mask=torch.ones(batch, context, dtype=torch.long, device=device),
        )
        with torch.no_grad():
            self.reset()
            model(**self.inputs)  # allocates the cache tensors
        for layer in self.cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
            # mark it whether or not this transformers version does: an unmarked counter makes Inductor skip CUDA graphs
            torch._dynamo.mark_static_address(layer.cumulative_length)

    def reset(self) -> None:
        """Set every initialised cache layer's write counter back to L-1 (the step writes position L-1 again)."""
        counters = [layer.cumulative_length for layer in self.cache.layers if getattr(layer, "is_initialized", False)]
        if len(counters) != len(self._rewind):  # the counters exist once the first step has run
            self._rewind = [torch.full_like(c, self.context - 1) for c in counters]
        if counters:  # one launch for all layers, so back-to-back timing adds almost nothing between steps
            torch._foreach_copy_(counters, self._rewind)

    def time(self, step: Callable[..., Any], repeats: int, runs: int = 3) -> tuple[float, float, float]:
        """Seconds per step: (back to back, host-synced, first call = compile + capture for compiled steps).

        Back to back: ``runs`` runs of ``repeats`` steps between two CUDA events with no host sync in between,
        so the host's work for the next step overlaps the GPU's (a decode loop that does not wait on every token);
        the median run's time per step. Host-synced: ``repeats`` single steps, each timed with CUDA events and
        followed by a sync (a loop that reads every token before the next step); the median. Three warm-up steps
        come first.
        """
        synced = []
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(repeats + 3):
                self.reset()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                step(**self.inputs)
                end.record()
                torch.cuda.synchronize()
                if i == 0:
                    first = time.perf_counter() - start
                if i >= 3:
                    synced.append(begin.elapsed_time(end) / 1e3)
            back_to_back = []
            for _ in range(runs):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(repeats):
                    self.reset()
                    step(**self.inputs)
                end.record()
                torch.cuda.synchronize()
                back_to_back.append(begin.elapsed_time(end) / 1e3 / repeats)
        return statistics.median(back_to_back), statistics.median(synced), first


def compile_variant(model: nn.Module, variant: str, bank: RouterBank) -> Callable[..., Any]:
    """Set ``model``'s attention implementation for ``variant`` (one of :data:`VARIANTS`) and return its step.

    ``eager``: ``model.forward``; ``inductor``/``inductor-gqa``: ``torch.compile(backend="inductor")`` with SDPA or
    GQA-native SDPA; ``polar-D``: attaches ``bank`` at density D and compiles with ``backend="polar"`` (at D = 1
    with ``min_saved_mib=0``, so the selective kernel runs rather than the dense path it would pick). Compiled
    steps use ``mode="reduce-overhead", fullgraph=True``; compiling happens on the first call.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    model.set_attn_implementation(register_gqa_attention() if variant == "inductor-gqa" else "sdpa")
    if variant == "eager":
        return model.forward
    if variant.startswith("polar"):
        density = float(variant.split("-")[1])
        # density 1.0 forces the kernel (min_saved_mib=0): by default such a site saves nothing and stays dense
        attach(model, bank, density=density, min_saved_mib=0.0 if density == 1.0 else None)
        return torch.compile(model.forward, backend="polar", mode="reduce-overhead", fullgraph=True)
    return torch.compile(model.forward, backend="inductor", mode="reduce-overhead", fullgraph=True)


@contextlib.contextmanager
def full_compiles() -> Iterator[None]:
    """Inside, every compile is a full one: FX-graph and AOTAutograd caches are off, so variants whose graphs match
    ((2) and (3) for MHA models) do not share one; Triton's kernel cache stays on and serves all alike."""
    with (torch._inductor.config.patch(fx_graph_cache=False),
          torch._functorch.config.patch(enable_autograd_cache=False)):
        yield


def is_attention_kernel(name: str) -> bool:
    """Whether a CUDA kernel name is dense SDPA's attention kernel (cuDNN, flash or memory-efficient), not a
    fused Inductor kernel named after the ops it feeds."""
    return not name.startswith("triton_") and any(tag in name for tag in ("sdpa", "fmha", "flash"))


KERNEL_CATEGORIES = ("attention", "GEMMs", "router", "other")
"""The categories of :func:`kernel_breakdown`, in the order tables list them."""


def kernel_category(name: str) -> str:
    """The category (one of :data:`KERNEL_CATEGORIES`) of a CUDA kernel by its name: dense SDPA or our selective
    attention kernels, cuBLAS/CUTLASS GEMMs, the router kernel, or anything else (Inductor's fused kernels,
    copies, the cache write)."""
    if name == "_route_kernel":
        return "router"
    if is_attention_kernel(name) or name.startswith("_select_attention"):
        return "attention"
    if name.startswith("triton_tem_fused_") and "mm" in name:  # Inductor's Triton GEMM templates (max-autotune)
        return "GEMMs"
    if not name.startswith("triton_") and any(tag in name.lower() for tag in ("gemm", "nvjet", "cutlass", "xmma")):
        return "GEMMs"
    return "other"


def kernel_breakdown(step: DecodeStep, fn: Callable[..., Any], steps: int = 5) -> dict[str, float]:
    """GPU seconds per step in each of :data:`KERNEL_CATEGORIES` (:func:`kernel_category`), while ``fn`` runs
    ``steps`` back-to-back decode steps under the profiler (kernels inside CUDA graphs included)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step.reset()
            fn(**step.inputs)
        torch.cuda.synchronize()
    seconds = dict.fromkeys(KERNEL_CATEGORIES, 0.0)
    for event in prof.key_averages():
        seconds[kernel_category(event.key)] += event.self_device_time_total / 1e6 / steps
    return seconds


def ideal_speedup(step_seconds: float, attn_seconds: float, density: float, routed_share: float = 1.0) -> float:
    """Amdahl's bound on the sparse step's speedup: T / (T - (1 - d) * r * min(T_attn, T)).

    ``step_seconds`` is the dense step T, ``attn_seconds`` its attention time T_attn (capped at T),
    ``density`` the kept fraction d and ``routed_share`` r the share of the attention that is routed (layers with
    a router over all layers; layer 0 stays dense).
    """
    return step_seconds / (step_seconds - (1 - density) * routed_share * min(attn_seconds, step_seconds))


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


def _release_memory() -> None:
    # CUDA-graph pools are private: memory the caching allocator holds for other uses can't serve them, and at
    # large B x L (Llama-3.1-8B B=128 L=8192) that slack is the 8 GiB a variant's repeat_kv needs
    gc.collect()
    torch.cuda.empty_cache()


def run_case(name: str, batch: int, context: int, repeats: int, max_layers: int | None = None) -> Row:
    """Time every variant of :data:`VARIANTS` for one case on CUDA and return its row (seconds, ratios).

    The model has all its layers, or ``max_layers``, or fewer when memory forces it (:func:`layers_that_fit`).
    The row holds ``model, layers, batch, context``, per variant its step seconds (back to back,
    ``<variant>-synced``, ``<variant>-first-call``), ``router-share`` (the router kernel's share of the polar 0.5
    step), ``<variant>-gpu`` for the :data:`PROFILED` variants (:func:`kernel_breakdown`) and the
    :func:`add_ideals` fields, with T_attn = the GPU time of the attention kernels in step (3).
    Every compile is a full one (:func:`full_compiles`). Prints a line per variant.
    """
    from transformers import AutoModelForCausalLM

    _release_memory()
    layers = layers_that_fit(name, batch, context, torch.cuda.mem_get_info()[0], max_layers)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(SHAPES[name](layers), dtype=torch.bfloat16).eval()
    step = DecodeStep(model, batch, context)
    bank = random_routers(model, seed=0)
    row: Row = {"model": name, "layers": layers, "batch": batch, "context": context}
    with full_compiles():
        for variant in VARIANTS:
            torch._dynamo.reset()  # also frees the previous variant's CUDA-graph pool
            _release_memory()
            fn = compile_variant(model, variant, bank)
            seconds, synced, first = step.time(fn, repeats)
            row[variant], row[f"{variant}-synced"], row[f"{variant}-first-call"] = seconds, synced, first
            print(f"  {name} ({layers} layers) B={batch} L={context} {variant:>13}: {seconds * 1e3:8.3f} ms/step "
                  f"back to back, {synced * 1e3:8.3f} host-synced, first call {first:6.1f} s", flush=True)
            if variant in PROFILED:
                row[f"{variant}-gpu"] = kernel_breakdown(step, fn)
    row["router-share"] = row["polar-0.5-gpu"]["router"] / row["polar-0.5"]
    torch._dynamo.reset()
    routed = len(bank.layers) / layers  # layer 0 stays dense by design
    return add_ideals(row, row["inductor-gqa-gpu"]["attention"], routed)


def markdown(rows: Iterable[Row]) -> str:
    """The results table as Markdown, one line per row: ms per step back to back per variant, then ratios."""
    head = ("| model | B | L | eager | inductor (2) | inductor GQA-native (3) | polar 1.0 | polar 0.5 | "
            "0.5 vs (3) | ideal | % of ideal | ideal, layer 0 dense | % of it | 0.5 vs (2) | 1.0 vs (3) | "
            "attn share of (3) | router share of 0.5 | compile 0.5 / (3) | 0.5 vs (3), host-synced |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms = {v: r[v] * 1e3 for v in VARIANTS}
        speed3 = r["inductor-gqa"] / r["polar-0.5"]
        synced_speedup = (f"{r['inductor-gqa-synced'] / r['polar-0.5-synced']:.2f}x" if "polar-0.5-synced" in r
                          else "—")  # rows measured before host-synced timing was split out
        lines.append(
            f"| {r['model']} ({r['layers']} layers) | {r['batch']} | {r['context']} | {ms['eager']:.3f} | "
            f"{ms['inductor']:.3f} | {ms['inductor-gqa']:.3f} | {ms['polar-1.0']:.3f} | {ms['polar-0.5']:.3f} | "
            f"{speed3:.2f}x | {r['ideal-0.5']:.2f}x | {100 * speed3 / r['ideal-0.5']:.1f}% | "
            f"{r['ideal-0.5-layer0-dense']:.2f}x | {100 * speed3 / r['ideal-0.5-layer0-dense']:.1f}% | "
            f"{r['inductor'] / r['polar-0.5']:.2f}x | {r['polar-1.0'] / r['inductor-gqa']:.3f} | "
            f"{r['attention-share']:.0%} | {r['router-share']:.1%} | "
            f"{r['polar-0.5-first-call'] / r['inductor-gqa-first-call']:.2f} | "
            f"{synced_speedup} |")
    return "\n".join(lines)


def breakdown_markdown(rows: Iterable[Row]) -> str:
    """Where each step's GPU time goes, as Markdown: ms per step per :data:`KERNEL_CATEGORIES` for (3) and polar
    0.5, one line per row that has the breakdown (rows measured before it was added have none); empty when no row
    has it."""
    head = "| model | B | L | " + " | ".join(f"{variant} {category}" for variant in ("(3)", "0.5")
                                           for category in KERNEL_CATEGORIES) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if all(f"{variant}-gpu" in r for variant in PROFILED):
            ms = [f"{r[f'{variant}-gpu'][category] * 1e3:.3f}"
                  for variant in PROFILED for category in KERNEL_CATEGORIES]
            lines.append(f"| {r['model']} ({r['layers']} layers) | {r['batch']} | {r['context']} | {' | '.join(ms)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def tables(rows: Sequence[Row]) -> str:
    """The report's Markdown: :func:`markdown`, then :func:`breakdown_markdown` if any row has a breakdown."""
    return "\n\n".join(table for table in (markdown(rows), breakdown_markdown(rows)) if table)


def write_results(rows: Sequence[Row], out: str | Path) -> tuple[Path, Path]:
    """Write ``out/decode.json`` (the raw rows) and ``out/decode.md`` (:func:`tables`); returns both paths."""
    out = Path(out)
    json_path, md_path = out / "decode.json", out / "decode.md"
    json_path.write_text(json.dumps(list(rows), indent=1))
    md_path.write_text(tables(rows) + "\n")
    return json_path, md_path


def plot(rows: Sequence[Row], path: str | Path) -> None:
    """Speedup of polar 0.5 over dense Inductor (2) against batch size: one panel a model, one line per context;
    a point with fewer layers than the panel's most is labelled with its layer count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    colors = {context: f"C{i}" for i, context in enumerate(sorted({r["context"] for r in rows}))}  # same in all panels
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        model_rows = [r for r in rows if r["model"] == name]
        most_layers = max(r["layers"] for r in model_rows)
        for context in sorted({r["context"] for r in model_rows}):
            points = sorted((r["batch"], r["inductor"] / r["polar-0.5"], r["layers"]) for r in model_rows
                            if r["context"] == context)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[context],
                    label=f"L={context}")
            for batch, speedup, count in points:
                if count < most_layers:
                    ax.annotate(f"{count} layers", (batch, speedup), textcoords="offset points", xytext=(4, -10),
                                fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="batch size", ylabel="speedup over dense Inductor",
               title=f"{name} ({most_layers} layers unless marked)")
        ax.legend()
    fig.suptitle("polar (density 0.5) decode step vs dense Inductor, H200, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_benchmark(cases: Iterable[Case | tuple[str, int, int]], repeats: int, out: str | Path,
                  max_layers: int | None = None) -> list[Row]:
    """Run :func:`run_case` for each case on CUDA (at most ``max_layers`` layers each, default all that fit),
    rewriting ``out/decode.json`` and ``decode.md`` after each.

    Then writes the report (:func:`report`). Call :func:`require_cuda` first for a readable error on machines
    without a GPU. Returns the rows.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, batch, context in cases:
        rows.append(run_case(name, batch, context, repeats, max_layers))
        write_results(rows, out)
    report(rows, out)
    return rows


def report(rows: Sequence[Row], out: str | Path) -> None:
    """Write ``out/decode.json``, ``decode.md`` (:func:`write_results`) and ``decode.png`` (:func:`plot`), and print
    the Markdown tables."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(rows, out)
    plot(rows, out / "decode.png")
    print(tables(rows))


def merge_results(paths: Sequence[str | Path]) -> list[Row]:
    """The rows of several ``decode.json`` files as one table, one row per model, B and L, ordered by model, context
    and batch.

    Runs split over several processes (or machines) become one report. Of the rows for one model, B and L it keeps
    the one with the most layers (a run with all layers supersedes a shorter one); among rows with as many layers,
    the later file's. Raises ``ValueError`` naming a file that holds no list of rows.
    """
    merged: dict[tuple[str, int, int], Row] = {}
    for path in paths:
        rows = json.loads(Path(path).read_text())
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "model" in r for r in rows):
            raise ValueError(f"{path}: expected a list of benchmark rows as written by `polar-compile bench`")
        for r in rows:
            key = (r["model"], r["context"], r["batch"])
            if key not in merged or r["layers"] >= merged[key]["layers"]:
                merged[key] = r
    return [merged[key] for key in sorted(merged)]

"""Perplexity and greedy-generation agreement of a model under head and neuron sparsity: dense, oracle, routers.

The sparse path uses the same matcher as the backend (through :mod:`.instrument`): at every routed site, per
token, ``keep[b, t]`` marks the top-k units by router score ``linear(router_input, W, b)`` (``polar::route``, the
op ``passes/attention.py`` inserts for a decode token) or by the true per-unit output norms (oracle); the SDPA output
becomes ``out * keep`` expanded to the unit's heads, so a dropped unit's heads give exactly zero. Layers without a
router (layer 0 by default, and the layers of a hybrid model that have no attention) stay dense.

MLP sparsity (a bank with MLP routers, ReLU MLPs): per token, the neurons outside the top-k of the router's scores
(:func:`.instrument_mlp.neuron_scores`, k from the bank's table row for batch size 1) are zeroed in the down
projection's input: what a decode step of batch 1 computes. Method 'mlp' routes the MLPs only, 'routers+mlp' both
halves. Union recall by batch size: on a bounded sample of the dense pass's tokens, batches of B tokens from
different windows, the mean share of the union of their active neurons that the router's top-k (the table's k for
B, scores summed over the batch) covers; the same measure calibration builds the table from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .calibrate_mlp import table_recall
from .instrument import InstrumentedModel, SiteInfo, check_routable, instrument, unit_norms
from .instrument_mlp import MlpGate, TokenSample
from .routers import ModelShape, RouterBank, RouterBankError, kept_units

__all__ = [
    "METHODS",
    "EvalReport",
    "Evaluator",
    "Sparsity",
    "decode_token_nll",
    "evaluate",
    "format_report",
    "plot_report",
]

METHODS = ("dense", "oracle", "routers", "mlp", "routers+mlp")
MLP_METHODS = ("mlp", "routers+mlp")  # need a bank with MLP routers
TP_METHODS = ("oracle", "routers")  # evaluate(tp=N) adds their per-rank selection as "<method> tp=N"


@dataclass(frozen=True)
class Sparsity:
    """Which units each layer keeps: ``method`` ranks them ('dense', 'oracle' or 'routers'), ``kept[layer]`` = k;
    ``mlp_batch``: the MLPs keep the bank's k for this batch size per token (None: MLPs dense). ``tp``: the
    tensor-parallel selection of ``tp`` ranks, simulated on one device: the units split into ``tp`` contiguous
    blocks (each rank's), each keeping its own top ``k`` (then ``k`` is per block, of ``units / tp``)."""

    method: str = "dense"
    kept: tuple[tuple[int, int], ...] = ()  # ((layer, k), ...) for the gated layers
    mlp_batch: int | None = None
    tp: int = 1

    @classmethod
    def at_density(cls, method: str, density: float, layers: Sequence[int], units: int, tp: int = 1) -> Sparsity:
        """``method`` keeping ``kept_units(density, units / tp)`` units (per TP block) in each of ``layers`` (dense:
        none gated); 'mlp' routes the MLPs only (the bank's batch-size-1 row), 'routers+mlp' attention and MLPs.
        ``ValueError`` when ``tp`` does not divide ``units``."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        if units % tp:
            raise ValueError(f"{units} units (KV groups, or heads for MHA) per layer are not divisible by the "
                             f"tensor-parallel size {tp}")
        if method in ("dense", "mlp"):
            return cls(mlp_batch=1 if method == "mlp" else None)
        attention = "routers" if method == "routers+mlp" else method
        mlp_batch = 1 if method == "routers+mlp" else None
        return cls(attention, tuple((layer, kept_units(density, units // tp)) for layer in layers), mlp_batch, tp)

    def key(self, units: int) -> tuple:
        """Equal for specs that compute the same thing (a layer keeping every unit is dense)."""
        gated = tuple((layer, k) for layer, k in self.kept if k < units // self.tp)
        return (self.method if gated else "dense", gated, self.mlp_batch, self.tp if gated else 1)


class _Gate:
    """The site hook: zeroes the heads of each token's units outside the top-k of the current :class:`Sparsity`."""

    def __init__(self, bank: RouterBank | None) -> None:
        self.bank = bank
        self.sparsity = Sparsity()

    def __call__(self, site: SiteInfo, x: Tensor, out: Tensor) -> Tensor:
        # x: [B, T, hidden]   out: [B, H, T, D]
        k, tp = dict(self.sparsity.kept).get(site.layer), self.sparsity.tp
        local = site.units // tp  # units per tensor-parallel rank (all of them at tp = 1)
        if k is None or k >= local:
            return out
        if self.sparsity.method == "oracle":
            norms = unit_norms(out, site.units)  # [B, T, units]
            ranked = [torch.topk(norms[..., r * local : (r + 1) * local], k, dim=-1).indices for r in range(tp)]
        else:
            weight, bias = self.bank.weights[site.layer].to(x), self.bank.biases[site.layer].to(x)
            # the backend's router, on each rank's rows: [B, T, k] local indices per rank
            ranked = [torch.ops.polar.route(x, weight[r * local : (r + 1) * local], bias[r * local : (r + 1) * local], k)
                      for r in range(tp)]
        top = torch.cat([indices + r * local for r, indices in enumerate(ranked)], dim=-1)  # [B, T, tp * k]
        keep = torch.zeros(*top.shape[:-1], site.units, dtype=torch.bool, device=top.device)
        keep = keep.scatter(-1, top, True)  # [B, T, units]
        keep = keep.transpose(1, 2).repeat_interleave(site.group, dim=1)  # [B, H, T]
        return out * keep[..., None].to(out.dtype)


class Evaluator:
    """One model instrumented once; measures token NLL and greedy generations under any :class:`Sparsity`.

    Raises :class:`~.instrument.InstrumentError` for models :func:`~.instrument.check_routable` refuses, and
    :class:`RouterBankError` for a bank of another model, or (at the first run) one that routes a layer without
    attention.
    """

    def __init__(self, model: nn.Module, bank: RouterBank | None = None, *, batch_size: int = 8,
                 progress: bool = True) -> None:
        self.attention_layers = check_routable(model, "evaluate")  # None: the config does not say
        if bank is not None:
            bank.check_model(model)
        self.shape = ModelShape.of(model)
        self.bank = bank
        self.batch_size = batch_size
        self.progress = progress
        self.device = next(model.parameters()).device
        self._gate = _Gate(bank)
        self._mlp_gate = MlpGate(bank.mlp) if bank is not None and bank.mlp is not None else None
        self._model: InstrumentedModel = instrument(model, self._gate, mlp_hook=self._mlp_gate)
        self._bank_checked = bank is None
        self._samples: dict[int, TokenSample] | None = None

    def routed_layers(self) -> list[int]:
        """The gated layers: the bank's, or without a bank every attention layer but layer 0 (the oracle protocol;
        every layer but 0 where the config does not say which layers have attention)."""
        if self.bank is not None:
            return self.bank.layers
        layers = self.attention_layers if self.attention_layers is not None else range(self.shape.num_layers)
        return [layer for layer in layers if layer != 0]

    def sparsity(self, method: str, density: float, tp: int = 1) -> Sparsity:
        """``method`` at one density for every routed layer, each of ``tp`` ranks keeping its own top-k."""
        return Sparsity.at_density(method, density, self.routed_layers(), self.shape.num_kv_heads, tp)

    def token_nll(self, windows: Tensor, sparsity: Sparsity, desc: str = "", *, sample_mlp: int = 0) -> Tensor:
        """Per-token NLL ``[n, T]`` of windows ``[n, T + 1]`` (inputs ``w[:, :-1]``, targets ``w[:, 1:]``).

        ``sample_mlp``: keep up to this many tokens per MLP layer (spread over the windows) for
        :meth:`union_recall`; only with dense MLPs (the active sets must be the dense model's).
        """
        if sparsity.method == "routers" and self.bank is None:
            raise ValueError("method 'routers' needs a router bank")
        if sparsity.mlp_batch is not None and self._mlp_gate is None:
            raise ValueError("MLP sparsity needs a router bank with MLP routers")
        if sample_mlp and (self._mlp_gate is None or sparsity.mlp_batch is not None):
            raise ValueError("sample_mlp needs a bank with MLP routers and a pass with dense MLPs")
        self._apply(sparsity)
        if self._mlp_gate is not None:
            self._mlp_gate.samples = {} if sample_mlp else None
            self._mlp_gate.capacity = sample_mlp
            self._mlp_gate.per_window = max(1, math.ceil(sample_mlp / len(windows)))
        losses = []
        batches = range(0, len(windows), self.batch_size)
        try:
            for start in tqdm(batches, desc=desc or sparsity.method, disable=not self.progress, leave=False):
                batch = windows[start : start + self.batch_size].to(self.device)
                if self._mlp_gate is not None:
                    self._mlp_gate.rows = torch.arange(start, start + len(batch))
                logits = self._run(batch[:, :-1])  # [B, T, vocab]
                nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
                losses.append(nll.view(len(batch), -1).cpu())
        finally:
            if self._mlp_gate is not None:
                self._samples, self._mlp_gate.samples = self._mlp_gate.samples, None
        return torch.cat(losses)

    def union_recall(self, draws: int = 256, seed: int = 0) -> tuple[dict[int, float], dict[int, float]]:
        """Per tabulated batch size B (up to the sampled tokens): the mean over MLP-routed layers of the union recall
        at the table's k (:func:`.calibrate_mlp.table_recall`), and of the share of neurons kept. Uses the tokens
        sampled by the last ``token_nll(..., sample_mlp=N)``."""
        if not self._samples:
            raise ValueError("union_recall needs a dense pass first: token_nll(windows, dense, sample_mlp=N)")
        return table_recall(self._samples, self.bank.mlp, draws=draws, seed=seed)

    def greedy(self, prompts: Tensor, new_tokens: int, sparsity: Sparsity) -> Tensor:
        """Greedy continuations ``[P, new_tokens]`` of prompts ``[P, T0]``, recomputing the full sequence each step."""
        self._apply(sparsity)
        tokens = prompts.to(self.device)
        for _ in range(new_tokens):
            next_token = self._run(tokens)[:, -1].argmax(-1)  # [P]
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        return tokens[:, prompts.shape[1] :].cpu()

    def _apply(self, sparsity: Sparsity) -> None:
        self._gate.sparsity = sparsity
        if self._mlp_gate is not None:
            self._mlp_gate.batch_size = sparsity.mlp_batch

    def _run(self, input_ids: Tensor) -> Tensor:
        """Logits ``[B, T, vocab]`` of the instrumented model; the first run checks the bank's layers."""
        logits = self._model(input_ids)
        if not self._bank_checked:
            extra = sorted(set(self.bank.layers) - set(self._model.layers))
            if extra:
                raise RouterBankError(
                    f"router bank has routers for layers {extra}, where the model has no attention site to route "
                    f"(its attention layers: {self._model.layers}); a bank for this model routes attention layers only"
                )
            if self.bank.mlp is not None:
                self._model.require_mlp()
                extra = sorted(set(self.bank.mlp.layers) - set(self._model.mlp_layers))
                if extra:
                    raise RouterBankError(
                        f"router bank has MLP routers for layers {extra}, where the model has no ReLU MLP to route "
                        f"(its ReLU MLP layers: {self._model.mlp_layers})"
                    )
            self._bank_checked = True
        return logits


@dataclass
class EvalReport:
    """Perplexity (and greedy agreement with dense) per (method, density); ``tokens`` predicted per entry."""

    tokens: int
    perplexity: dict[tuple[str, float], float] = field(default_factory=dict)
    agreement: dict[tuple[str, float], float] = field(default_factory=dict)
    union_recall: dict[int, float] = field(default_factory=dict)  # batch size -> mean MLP union recall at its k
    union_kept: dict[int, float] = field(default_factory=dict)  # batch size -> mean share of neurons kept

    def to_json(self) -> dict:
        """A JSON-ready dict: ``tokens``, one row per (method, density), and (with MLP routers) one ``mlp_union``
        row per batch size."""
        rows = [{"method": m, "density": d, "perplexity": p, "agreement": self.agreement.get((m, d))}
                for (m, d), p in self.perplexity.items()]
        union = [{"batch_size": b, "recall": r, "kept": self.union_kept.get(b)} for b, r in self.union_recall.items()]
        return {"tokens": self.tokens, "rows": rows, **({"mlp_union": union} if union else {})}

    @classmethod
    def from_json(cls, data: dict) -> EvalReport:
        """The report :meth:`to_json` wrote."""
        report = cls(tokens=data["tokens"])
        for row in data["rows"]:
            report.perplexity[row["method"], row["density"]] = row["perplexity"]
            if row["agreement"] is not None:
                report.agreement[row["method"], row["density"]] = row["agreement"]
        for row in data.get("mlp_union", []):
            report.union_recall[row["batch_size"]] = row["recall"]
            if row["kept"] is not None:
                report.union_kept[row["batch_size"]] = row["kept"]
        return report


def evaluate(
    model: nn.Module,
    windows: Tensor,
    densities: Sequence[float],
    bank: RouterBank | None = None,
    *,
    methods: Sequence[str] = METHODS,
    batch_size: int = 8,
    prompts: int = 8,
    prompt_len: int = 32,
    new_tokens: int = 32,
    mlp_sample: int = 4096,
    tp: int = 1,
    progress: bool = True,
) -> EvalReport:
    """Perplexity of ``windows`` ``[n, T + 1]`` for each method at each density, plus greedy-token agreement.

    Agreement: greedy continuations of ``prompts`` prompts (the first ``prompt_len`` tokens of the first
    windows), position by position, the share equal to dense's. Equal configurations run once. 'routers' needs a
    bank, 'mlp' and 'routers+mlp' one with MLP routers; with those, the dense pass also samples up to
    ``mlp_sample`` tokens per MLP layer for the union recall by batch size.

    ``tp`` > 1 adds rows ``"oracle tp=N"`` and ``"routers tp=N"`` beside the single-device ones: the selection of
    N tensor-parallel ranks, each keeping its own top-k of its block of units (:class:`Sparsity`), what
    ``backend="polar"`` runs on a TP-sharded model.
    """
    has_mlp = bank is not None and bank.mlp is not None
    methods = [m for m in methods if (m != "routers" or bank is not None) and (m not in MLP_METHODS or has_mlp)]
    evaluator = Evaluator(model, bank, batch_size=batch_size, progress=progress)
    units = evaluator.shape.num_kv_heads
    prompt_ids = windows[:prompts, :prompt_len]
    report = EvalReport(tokens=windows[:, 1:].numel())
    done: dict[tuple, tuple[float, Tensor]] = {}
    if has_mlp or "dense" in methods or prompts:  # dense first: the agreement's reference, the MLPs' truth
        nll = evaluator.token_nll(windows, Sparsity(), desc="dense", sample_mlp=mlp_sample if has_mlp else 0)
        generated = evaluator.greedy(prompt_ids, new_tokens, Sparsity()) if prompts else None
        done[Sparsity().key(units)] = (math.exp(nll.double().mean().item()), generated)
    if has_mlp:
        report.union_recall, report.union_kept = evaluator.union_recall()
    runs = [(method, 1) for method in methods] + [(m, tp) for m in methods if tp > 1 and m in TP_METHODS]
    for method, ranks in runs:
        name = method if ranks == 1 else f"{method} tp={ranks}"
        for density in densities:
            sparsity = evaluator.sparsity(method, density, ranks)
            key = sparsity.key(units)
            if key not in done:
                nll = evaluator.token_nll(windows, sparsity, desc=f"{name} {density:g}")
                generated = evaluator.greedy(prompt_ids, new_tokens, sparsity) if prompts else None
                done[key] = (math.exp(nll.double().mean().item()), generated)
            report.perplexity[name, density] = done[key][0]
            if prompts:
                reference = done[Sparsity().key(units)][1]
                report.agreement[name, density] = (done[key][1] == reference).float().mean().item()
    return report


def format_report(report: EvalReport) -> str:
    """A Markdown table: one row per method, perplexity (greedy agreement) per density."""
    densities = sorted({d for _, d in report.perplexity}, reverse=True)
    methods = sorted({m for m, _ in report.perplexity}, key=_method_order)
    lines = [
        "| method | " + " | ".join(f"density {d:g}" for d in densities) + " |",
        "|---|" + "---|" * len(densities),
    ]
    for method in methods:
        cells = []
        for d in densities:
            ppl = report.perplexity.get((method, d))
            agree = report.agreement.get((method, d))
            cells.append("" if ppl is None else f"{ppl:.2f}" + ("" if agree is None else f" ({agree:.0%})"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append(f"\nperplexity over {report.tokens} predicted tokens (greedy-token agreement with dense); "
                 "mlp: the MLP router's top-k per token at the batch-size-1 row, attention dense")
    if any(" tp=" in m for m in methods):
        lines.append("tp=N: each of N tensor-parallel ranks keeps its own top-k of its 1/N of the units (density x "
                     "units/N), as backend='polar' does on a TP-sharded model")
    if report.union_recall:
        sizes = sorted(report.union_recall)
        lines += ["", "| MLP, batch size | " + " | ".join(map(str, sizes)) + " |", "|---|" + "---|" * len(sizes),
                  "| union recall | " + " | ".join(f"{report.union_recall[b]:.4f}" for b in sizes) + " |",
                  "| neurons kept | " + " | ".join(f"{report.union_kept.get(b, 1.0):.0%}" for b in sizes) + " |",
                  "\nunion recall: mean over MLP-routed layers of the share of a batch's active neurons (union over "
                  "its tokens) in the router's top-k at the table's k; a layer dense at B counts 1"]
    return "\n".join(lines)


def plot_report(reports: dict[str, EvalReport], path: str | Path) -> Path:
    """A PNG of perplexity vs density, one panel per named report (e.g. per model); below, where a report has
    MLP routers, the union recall and the neurons kept by batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if any(r.union_recall for r in reports.values()) else 1
    fig, axes = plt.subplots(rows, len(reports), figsize=(5 * len(reports), 4 * rows), squeeze=False)
    for column, (name, report) in enumerate(reports.items()):
        ax = axes[0][column]
        styles = dict(zip(METHODS, ("k--", "g-o", "b-s", "m:", "r-^"), strict=True))
        for method in sorted({m for m, _ in report.perplexity}, key=_method_order):
            points = sorted((d, p) for (m, d), p in report.perplexity.items() if m == method)
            base = method.split(" tp=")[0]
            style = styles.get(base, "c-") if base == method else styles.get(base, "c-")[0] + ":x"  # TP: dotted
            ax.plot(*zip(*points, strict=True), style, label=method)
        ax.set(title=name, xlabel="density (fraction of heads / KV groups kept)", ylabel="perplexity")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
        if rows == 2:
            _plot_union(axes[1][column], report)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _method_order(name: str) -> tuple[int, str]:
    """Report order: :data:`METHODS`, each followed by its per-rank (``tp=N``) rows; unknown names last."""
    base = name.split(" tp=")[0]
    return (METHODS.index(base) if base in METHODS else len(METHODS), name)


def _plot_union(ax: Any, report: EvalReport) -> None:
    sizes = sorted(report.union_recall)
    if sizes:
        ax.plot(sizes, [report.union_recall[b] for b in sizes], "r-o", label="union recall")
        ax.plot(sizes, [report.union_kept.get(b, 1.0) for b in sizes], "b-s", label="neurons kept")
        ax.set_xscale("log", base=2)
        ax.legend()
    ax.set(xlabel="batch size (MLP k table row)", ylabel="share", ylim=(0, 1.05))
    ax.grid(alpha=0.3)


def decode_token_nll(step: Callable[..., Any], model: nn.Module, windows: Tensor) -> Tensor:
    """Per-token NLL ``[n, T]`` of ``windows [n, T + 1]`` decoded one token at a time by ``step`` (``model``'s
    forward, e.g. compiled with ``backend="polar"``) on a StaticCache of length T: what a served model computes, to
    hold against :meth:`Evaluator.token_nll` on the same windows."""
    from transformers import StaticCache

    inputs, targets = windows[:, :-1], windows[:, 1:]
    batch, length = inputs.shape
    cache = StaticCache(config=model.config, max_cache_len=length)

    def decode(fn: Callable[..., Any], t: int) -> Tensor:
        return fn(input_ids=inputs[:, t : t + 1], past_key_values=cache, use_cache=True,
                  cache_position=torch.tensor([t], device=inputs.device),
                  position_ids=torch.full((batch, 1), t, device=inputs.device)).logits

    losses = []
    with torch.no_grad():
        # One eager step allocates the cache outside the compiled graph: HF marks the cache tensors static only
        # there, and a compiled step that mutates unmarked ones runs without CUDA graphs.
        decode(model, 0)
        cache.reset()
        for t in range(length):
            losses.append(F.cross_entropy(decode(step, t)[:, -1].float(), targets[:, t], reduction="none"))
    return torch.stack(losses, dim=1)

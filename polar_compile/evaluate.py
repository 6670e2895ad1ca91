"""Perplexity and greedy-generation agreement of a model under head sparsity: dense, oracle top-k, or routers.

The sparse path uses the same matcher as the backend (through :mod:`.instrument`): at every routed site, per
token, ``keep[b, t]`` marks the top-k units by router score ``linear(router_input, W, b)`` (``polar::route``, the
op ``passes/attention.py`` inserts for a decode token) or by the true per-unit output norms (oracle); the SDPA output
becomes ``out * keep`` expanded to the unit's heads, so a dropped unit's heads give exactly zero. Layers without a
router (layer 0 by default, and the layers of a hybrid model that have no attention) stay dense.
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

from .instrument import SiteInfo, check_routable, instrument, unit_norms
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

METHODS = ("dense", "oracle", "routers")


@dataclass(frozen=True)
class Sparsity:
    """Which units each layer keeps: ``method`` ranks them ('dense', 'oracle' or 'routers'), ``kept[layer]`` = k."""

    method: str = "dense"
    kept: tuple[tuple[int, int], ...] = ()  # ((layer, k), ...) for the gated layers

    @classmethod
    def at_density(cls, method: str, density: float, layers: Sequence[int], units: int) -> Sparsity:
        """``method`` keeping ``kept_units(density, units)`` units in each of ``layers`` (dense: none gated)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        if method == "dense":
            return cls()
        return cls(method, tuple((layer, kept_units(density, units)) for layer in layers))

    def key(self, units: int) -> tuple:
        """Equal for specs that compute the same thing (a layer keeping every unit is dense)."""
        gated = tuple((layer, k) for layer, k in self.kept if k < units)
        return (self.method if gated else "dense", gated)


class _Gate:
    """The site hook: zeroes the heads of each token's units outside the top-k of the current :class:`Sparsity`."""

    def __init__(self, bank: RouterBank | None) -> None:
        self.bank = bank
        self.sparsity = Sparsity()

    def __call__(self, site: SiteInfo, x: Tensor, out: Tensor) -> Tensor:
        # x: [B, T, hidden]   out: [B, H, T, D]
        k = dict(self.sparsity.kept).get(site.layer)
        if k is None or k >= site.units:
            return out
        if self.sparsity.method == "oracle":
            top = torch.topk(unit_norms(out, site.units), k, dim=-1).indices  # [B, T, k]
        else:
            weight, bias = self.bank.weights[site.layer], self.bank.biases[site.layer]
            top = torch.ops.polar.route(x, weight.to(x), bias.to(x), k)  # [B, T, k]: the backend's router
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
        self._model = instrument(model, self._gate)
        self._bank_checked = bank is None

    def routed_layers(self) -> list[int]:
        """The gated layers: the bank's, or without a bank every attention layer but layer 0 (the oracle protocol;
        every layer but 0 where the config does not say which layers have attention)."""
        if self.bank is not None:
            return self.bank.layers
        layers = self.attention_layers if self.attention_layers is not None else range(self.shape.num_layers)
        return [layer for layer in layers if layer != 0]

    def sparsity(self, method: str, density: float) -> Sparsity:
        """``method`` at one density for every routed layer."""
        return Sparsity.at_density(method, density, self.routed_layers(), self.shape.num_kv_heads)

    def token_nll(self, windows: Tensor, sparsity: Sparsity, desc: str = "") -> Tensor:
        """Per-token NLL ``[n, T]`` of windows ``[n, T + 1]`` (inputs ``w[:, :-1]``, targets ``w[:, 1:]``)."""
        if sparsity.method == "routers" and self.bank is None:
            raise ValueError("method 'routers' needs a router bank")
        self._gate.sparsity = sparsity
        losses = []
        batches = range(0, len(windows), self.batch_size)
        for start in tqdm(batches, desc=desc or sparsity.method, disable=not self.progress, leave=False):
            batch = windows[start : start + self.batch_size].to(self.device)
            logits = self._run(batch[:, :-1])  # [B, T, vocab]
            nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
            losses.append(nll.view(len(batch), -1).cpu())
        return torch.cat(losses)

    def greedy(self, prompts: Tensor, new_tokens: int, sparsity: Sparsity) -> Tensor:
        """Greedy continuations ``[P, new_tokens]`` of prompts ``[P, T0]``, recomputing the full sequence each step."""
        self._gate.sparsity = sparsity
        tokens = prompts.to(self.device)
        for _ in range(new_tokens):
            next_token = self._run(tokens)[:, -1].argmax(-1)  # [P]
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        return tokens[:, prompts.shape[1] :].cpu()

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
            self._bank_checked = True
        return logits


@dataclass
class EvalReport:
    """Perplexity (and greedy agreement with dense) per (method, density); ``tokens`` predicted per entry."""

    tokens: int
    perplexity: dict[tuple[str, float], float] = field(default_factory=dict)
    agreement: dict[tuple[str, float], float] = field(default_factory=dict)

    def to_json(self) -> dict:
        """A JSON-ready dict: ``tokens`` and one row per (method, density)."""
        rows = [{"method": m, "density": d, "perplexity": p, "agreement": self.agreement.get((m, d))}
                for (m, d), p in self.perplexity.items()]
        return {"tokens": self.tokens, "rows": rows}

    @classmethod
    def from_json(cls, data: dict) -> EvalReport:
        """The report :meth:`to_json` wrote."""
        report = cls(tokens=data["tokens"])
        for row in data["rows"]:
            report.perplexity[row["method"], row["density"]] = row["perplexity"]
            if row["agreement"] is not None:
                report.agreement[row["method"], row["density"]] = row["agreement"]
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
    progress: bool = True,
) -> EvalReport:
    """Perplexity of ``windows`` ``[n, T + 1]`` for each method at each density, plus greedy-token agreement.

    Agreement: greedy continuations of ``prompts`` prompts (the first ``prompt_len`` tokens of the first
    windows), position by position, the share equal to dense's. Equal configurations run once.
    """
    methods = [m for m in methods if m != "routers" or bank is not None]
    evaluator = Evaluator(model, bank, batch_size=batch_size, progress=progress)
    units = evaluator.shape.num_kv_heads
    prompt_ids = windows[:prompts, :prompt_len]
    report = EvalReport(tokens=windows[:, 1:].numel())
    done: dict[tuple, tuple[float, Tensor]] = {}
    for method in methods:
        for density in densities:
            sparsity = evaluator.sparsity(method, density)
            key = sparsity.key(units)
            if key not in done:
                nll = evaluator.token_nll(windows, sparsity, desc=f"{method} {density:g}")
                generated = evaluator.greedy(prompt_ids, new_tokens, sparsity) if prompts else None
                done[key] = (math.exp(nll.double().mean().item()), generated)
            report.perplexity[method, density] = done[key][0]
            if prompts:
                reference = done[Sparsity().key(units)][1]
                report.agreement[method, density] = (done[key][1] == reference).float().mean().item()
    return report


def format_report(report: EvalReport) -> str:
    """A Markdown table: one row per method, perplexity (greedy agreement) per density."""
    densities = sorted({d for _, d in report.perplexity}, reverse=True)
    methods = [m for m in METHODS if any(k[0] == m for k in report.perplexity)]
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
    lines.append(f"\nperplexity over {report.tokens} predicted tokens (greedy-token agreement with dense)")
    return "\n".join(lines)


def plot_report(reports: dict[str, EvalReport], path: str | Path) -> Path:
    """A PNG of perplexity vs density, one panel per named report (e.g. per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 4), squeeze=False)
    for ax, (name, report) in zip(axes[0], reports.items(), strict=True):
        for method, style in zip(METHODS, ("k--", "g-o", "b-s"), strict=True):
            points = sorted((d, p) for (m, d), p in report.perplexity.items() if m == method)
            if points:
                ax.plot(*zip(*points, strict=True), style, label=method)
        ax.set(title=name, xlabel="density (fraction of heads / KV groups kept)", ylabel="perplexity")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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

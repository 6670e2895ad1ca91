"""Run a model with a Python callback on every attention site's output (calibration and evaluation).

:func:`instrument` compiles the model with a Dynamo backend that reads the sites from the one matcher
(``passes/match.py``), inserts ``out = hook(site, router_input, out)`` right after each SDPA call, and runs the
graph eagerly. Hooks see full sequences (prefill-style): ``router_input`` ``[B, T, hidden]``, ``out``
``[B, H, T, D]``. Nothing model-specific: no forward hooks, no class names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from .passes.match import AttentionSite, find_attention_sites
from .passes.routing import strip_router_markers
from .routers import ModelShape

__all__ = ["InstrumentError", "InstrumentedModel", "SiteInfo", "instrument", "unit_norms"]


class InstrumentError(RuntimeError):
    """A model whose attention sites cannot be instrumented."""


@dataclass(frozen=True)
class SiteInfo:
    """What a hook knows about its site: the layer, its query heads and its router units (KV groups or heads)."""

    layer: int
    num_heads: int
    units: int

    @property
    def group(self) -> int:
        """Query heads per unit."""
        return self.num_heads // self.units


SiteHook = Callable[[SiteInfo, Tensor, Tensor], Tensor]  # (site, x [B, T, hidden], out [B, H, T, D]) -> out


def unit_norms(out: Tensor, units: int) -> Tensor:
    """Per-unit attention-output norms ``[B, T, units]``: each head's L2 norm over D, summed over a unit's heads."""
    # out: [B, H, T, D]
    batch, heads, length, _ = out.shape
    norms = out.float().norm(dim=-1)  # [B, H, T]
    return norms.reshape(batch, units, heads // units, length).sum(2).transpose(1, 2)  # [B, T, units]


class InstrumentedModel:
    """A causal LM whose attention outputs pass through a hook; call it with ``input_ids [B, T]`` for logits."""

    def __init__(self, compiled: Callable[..., Any], shape: ModelShape, seen: set[int]) -> None:
        self._compiled, self._shape, self._seen = compiled, shape, seen

    @torch.no_grad()
    def __call__(self, input_ids: Tensor) -> Tensor:
        """Logits ``[B, T, vocab]``; raises :class:`InstrumentError` if some layer's hook did not run."""
        self._seen.clear()
        logits = self._compiled(input_ids=input_ids, use_cache=False).logits
        missing = sorted(set(range(self._shape.num_layers)) - self._seen)
        if missing:
            raise InstrumentError(
                f"the attention hook did not run for layers {missing}: the matcher found no SDPA call there "
                "(is the model loaded with attn_implementation='sdpa'?) or Dynamo fell back to eager"
            )
        return logits


def instrument(model: nn.Module, hook: SiteHook) -> InstrumentedModel:
    """``model`` compiled so that every attention site's output passes through ``hook`` (see module docstring)."""
    shape = ModelShape.of(model)
    seen: set[int] = set()

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        strip_router_markers(gm)  # routers attached to the model play no part here
        sites = find_attention_sites(gm)
        for site in sites:
            _insert_hook(gm, site, _site_info(site, shape), hook, seen)
        gm.graph.lint()
        gm.recompile()
        return gm.forward

    return InstrumentedModel(torch.compile(model, backend=backend), shape, seen)


def _site_info(site: AttentionSite, shape: ModelShape) -> SiteInfo:
    if site.ownership_reason is not None:
        raise InstrumentError(
            f"attention site {site.module or site.sdpa.name} (layer {site.layer}) has no router input: "
            f"{site.ownership_reason}"
        )
    units = site.num_kv_heads or shape.num_kv_heads
    if units != shape.num_kv_heads:
        raise InstrumentError(
            f"layer {site.layer} ({site.module or site.sdpa.name}): the traced attention reads K/V with {units} "
            f"head(s), but the model config gives {shape.num_kv_heads} KV heads; routers sized from the config "
            "would not fit this graph"
        )
    if site.num_heads % units:
        raise InstrumentError(f"layer {site.layer}: {site.num_heads} heads are not a multiple of {units} units")
    return SiteInfo(layer=int(site.layer), num_heads=site.num_heads, units=units)


def _insert_hook(gm: fx.GraphModule, site: AttentionSite, info: SiteInfo, hook: SiteHook, seen: set[int]) -> None:
    """Replace every use of ``site.sdpa`` with ``hook(info, router_input, sdpa)``."""

    def polar_site_hook(x: Tensor, out: Tensor) -> Tensor:
        # x: [B, T, hidden] or [B*T, hidden]   out: [B, H, T, D]
        seen.add(info.layer)
        return hook(info, x.reshape(out.shape[0], out.shape[2], -1), out)

    with gm.graph.inserting_after(site.sdpa):
        new = gm.graph.call_function(polar_site_hook, (site.router_input, site.sdpa))
    site.sdpa.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)

"""Run a model with a Python callback on every attention site's output (calibration and evaluation).

:func:`instrument` compiles the model with a Dynamo backend that reads the sites from the one matcher
(``passes/match.py``), inserts ``out = hook(site, router_input, out)`` right after the SDPA call of each decoder
layer's own self-attention, and runs the graph eagerly. Hooks see full sequences (prefill-style): ``router_input``
``[B, T, hidden]``, ``out`` ``[B, H, T, D]``. Nothing model-specific: no forward hooks, no class names.

The attention layers are those the config's ``layer_types`` marks as attention (hybrid models such as Bamba,
Jamba, FalconH1, Lfm2 or Qwen3-Next mix them with Mamba, linear-attention or conv layers, which have no router),
or, where the config has no ``layer_types``, the layers in which the matcher finds a site. SDPA calls that are
not a decoder layer's own self-attention (cross-attention, calls outside the layer list) are skipped, and why is
kept in :attr:`InstrumentedModel.skipped`.

With ``mlp_hook``, every ReLU MLP inside a decoder layer also passes its hidden activation through it (the matcher's
MLP half; see :mod:`.instrument_mlp` for what the hook sees). MLPs with other activations are left alone, and
:meth:`InstrumentedModel.require_mlp` names the activation found when a caller needs ReLU MLPs.

:class:`InstrumentError` names what cannot be instrumented: an encoder-decoder model, a model with no attention
the matcher can route (a state-space model, attention that does not call SDPA), an attention layer without a
routable site, and a site that routers sized from the config would not fit.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from .instrument_mlp import MlpHook, MlpInfo, MlpTrace, insert_mlp_hooks
from .passes.attention import NOT_SDPA_NOTE
from .passes.graph import op_name
from .passes.match import AttentionSite, find_attention_sites
from .passes.match_mlp import find_mlp_sites
from .passes.routing import strip_router_markers
from .routers import ModelShape

__all__ = [
    "InstrumentError",
    "InstrumentedModel",
    "MlpInfo",
    "SiteInfo",
    "attention_layers",
    "check_routable",
    "instrument",
    "unit_norms",
]

# What the matcher routes; named by every error that says a model has nothing to route
ROUTABLE = "scaled_dot_product_attention calls owned by a decoder layer's attention module"
# transformers' older names of layer types (configuration_utils._LEGACY_LAYER_TYPE_REMAP)
_LEGACY_LAYER_TYPES = {"attention": "full_attention", "mamba": "linear_attention"}


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


def attention_layers(model: nn.Module) -> list[int] | None:
    """The layers the (text decoder's) config marks as attention in ``layer_types``; None when it has none.

    Attention types are the ``*_attention`` ones but ``linear_attention`` (Mamba, linear attention, recurrences),
    and ``hybrid*`` (attention beside a state-space mixer); ``conv``, ``moe``, ``mlp``, ... are not.
    """
    types = _layer_types(model)
    return None if types is None else [layer for layer, kind in enumerate(types) if _is_attention_type(kind)]


def check_routable(model: nn.Module, what: str = "instrument") -> list[int] | None:
    """:func:`attention_layers` of ``model``, after checking ``what`` (e.g. 'calibrate') can run it.

    Raises :class:`InstrumentError` for an encoder-decoder model (it needs decoder inputs, which a run on token
    windows does not give) and for a config whose ``layer_types`` has no attention layer.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise InstrumentError(
            f"{what} supports decoder-only models; {_describe(model)} is encoder-decoder: its decoder needs "
            f"decoder inputs beside the encoder's, which {what} on token windows does not give"
        )
    layers = attention_layers(model)
    if layers == []:
        types = ", ".join(map(repr, sorted(set(_layer_types(model)))))
        raise InstrumentError(
            f"{_describe(model)} has no attention the matcher can route: its config's layer_types mark no layer as "
            f"attention (only {types}), and routers go on {ROUTABLE}"
        )
    return layers


@dataclass
class _Trace:
    """What the backend found in the graphs Dynamo compiled, and the layers whose hook ran in the last call."""

    graphs: int = 0
    softmax_without_sdpa: bool = False  # some graph computes a softmax but calls no SDPA
    owned: set[int] = field(default_factory=set)  # layers with an instrumented site
    skipped: dict[str, int | None] = field(default_factory=dict)  # "module (layer i): reason" -> layer
    problems: dict[str, None] = field(default_factory=dict)  # sites that routers sized from the config would not fit
    seen: set[int] = field(default_factory=set)


class InstrumentedModel:
    """A causal LM whose attention outputs pass through a hook; call it with ``input_ids [B, T]`` for logits."""

    def __init__(self, compiled: Callable[..., Any], model: nn.Module, expected: list[int] | None,
                 trace: _Trace, mlp_trace: MlpTrace | None = None) -> None:
        self._compiled, self._name, self._expected, self._trace = compiled, _describe(model), expected, trace
        self._mlp = mlp_trace

    @property
    def layers(self) -> list[int]:
        """The layers whose attention site is instrumented (known after the first call)."""
        return sorted(self._trace.owned)

    @property
    def skipped(self) -> list[str]:
        """The SDPA calls left alone, as ``"module (layer i): why it is not a decoder layer's self-attention"``."""
        return list(self._trace.skipped)

    @property
    def mlp_layers(self) -> list[int]:
        """The layers whose ReLU MLP passes through the MLP hook (known after the first call; [] without one)."""
        return sorted(self._mlp.owned) if self._mlp is not None else []

    @property
    def mlp_absent(self) -> str | None:
        """Why no MLP is hooked (the activation found, ...), or None when some is (or no MLP hook was asked for)."""
        if self._mlp is None or self._mlp.owned:
            return None
        return self._mlp.why_none(self._name)

    def require_mlp(self) -> None:
        """Raise :class:`InstrumentError` unless some ReLU MLP is hooked, naming the activation found instead
        (e.g. 'silu has no exact zeros'). Call it after the first call."""
        if self._mlp is None:
            raise InstrumentError(f"{self._name} was instrumented without an MLP hook")
        if not self._mlp.owned:
            raise InstrumentError(self.mlp_absent)

    @torch.no_grad()
    def __call__(self, input_ids: Tensor) -> Tensor:
        """Logits ``[B, T, vocab]``; raises :class:`InstrumentError` if an attention layer's hook (or a hooked
        MLP's) did not run."""
        self._trace.seen.clear()
        if self._mlp is not None:
            self._mlp.seen.clear()
            self._mlp.batch = tuple(input_ids.shape)
        logits = self._compiled(input_ids=input_ids, use_cache=False).logits
        self._check()
        return logits

    def _check(self) -> None:
        trace = self._trace
        if trace.problems:
            raise InstrumentError(f"{self._name}: " + "; ".join(trace.problems))
        if not trace.owned:
            raise InstrumentError(f"{self._name} has no attention the matcher can route: {self._why_no_site()}")
        expected = set(self._expected if self._expected is not None else ()) | trace.owned
        missing = sorted(expected - trace.seen)
        if missing:
            raise InstrumentError(self._why_missing(missing))
        if self._mlp is not None and self._mlp.owned - self._mlp.seen:
            raise InstrumentError(f"{self._name}: the MLP hook did not run for layers "
                                  f"{sorted(self._mlp.owned - self._mlp.seen)} (did Dynamo run them eagerly?)")

    def _why_no_site(self) -> str:
        trace = self._trace
        if not trace.graphs:
            return f"it routes {ROUTABLE}, and Dynamo compiled no graph of it (the model ran eagerly)"
        if trace.skipped:
            return f"it routes {ROUTABLE}, and none of its graph's SDPA calls is one: " + "; ".join(trace.skipped)
        found = NOT_SDPA_NOTE if trace.softmax_without_sdpa else "no scaled_dot_product_attention call"
        return f"it routes {ROUTABLE}, and its graph has {found}"

    def _why_missing(self, missing: list[int]) -> str:
        trace = self._trace
        skipped_layers = set(trace.skipped.values())
        no_sdpa = [layer for layer in missing if layer not in trace.owned and layer not in skipped_layers]
        not_run = [layer for layer in missing if layer in trace.owned]
        parts = []
        if no_sdpa:
            parts.append(
                f"the attention hook did not run for attention layers {no_sdpa} (config.layer_types marks them as "
                "attention): the matcher found no scaled_dot_product_attention call there (is the model loaded with "
                "attn_implementation='sdpa'?)"
            )
        for layer in missing:
            if layer not in trace.owned and layer in skipped_layers:
                reasons = [text for text, at in trace.skipped.items() if at == layer]
                parts.append(f"attention layer {layer} has no self-attention site to route: " + "; ".join(reasons))
        if not_run:
            parts.append(f"the attention hook did not run for layers {not_run} (did Dynamo run them eagerly?)")
        return f"{self._name}: " + "; ".join(parts)


def instrument(model: nn.Module, hook: SiteHook, mlp_hook: MlpHook | None = None) -> InstrumentedModel:
    """``model`` compiled so that every attention site's output passes through ``hook`` and, with ``mlp_hook``,
    every ReLU MLP's hidden activation through ``mlp_hook`` (see module docstring).

    Raises :class:`InstrumentError` for models :func:`check_routable` refuses; the graph's own problems are raised
    by the first call.
    """
    expected = check_routable(model)
    shape = ModelShape.of(model)
    trace = _Trace()
    mlp_trace = MlpTrace() if mlp_hook is not None else None

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        strip_router_markers(gm)  # routers attached to the model play no part here
        sites = find_attention_sites(gm)
        mlp_sites = find_mlp_sites(gm) if mlp_hook is not None else []  # matched before any hook goes in
        trace.graphs += 1
        trace.softmax_without_sdpa |= not sites and any(op_name(node) == "softmax" for node in gm.graph.nodes)
        owned = [site for site in sites if site.ownership_reason is None]
        per_layer = Counter(site.layer for site in owned)
        for site in sites:
            if site.ownership_reason is not None:
                trace.skipped[f"{_site_name(site)} (layer {site.layer}): {site.ownership_reason}"] = site.layer
                continue
            units = site.num_kv_heads or shape.num_kv_heads
            problem = _site_problem(site, shape, units, per_layer[site.layer], owned)
            if problem is not None:
                trace.problems[problem] = None
                continue
            trace.owned.add(int(site.layer))
            _insert_hook(gm, site, SiteInfo(int(site.layer), site.num_heads, units), hook, trace.seen)
        if mlp_hook is not None:
            insert_mlp_hooks(gm, mlp_sites, mlp_hook, mlp_trace)
        gm.graph.lint()
        gm.recompile()
        return gm.forward

    return InstrumentedModel(torch.compile(model, backend=backend), model, expected, trace, mlp_trace)


def _site_problem(site: AttentionSite, shape: ModelShape, units: int, in_layer: int, owned: list[AttentionSite]
                  ) -> str | None:
    """Why routers sized from the config (``shape``) cannot serve this owned site of ``units`` units, or None."""
    where = f"layer {site.layer} ({_site_name(site)})"
    if in_layer > 1:
        modules = ", ".join(_site_name(other) for other in owned if other.layer == site.layer)
        return f"layer {site.layer} has {in_layer} self-attention sites ({modules}); a layer's router serves one"
    if units != shape.num_kv_heads:
        return (f"{where}: the traced attention reads K/V with {units} head(s), but the model config gives "
                f"{shape.num_kv_heads} KV heads; routers sized from the config would not fit this graph")
    if site.hidden_size != shape.hidden_size:
        return (f"{where}: the router input (the query projection's input) is {site.hidden_size} wide, but the "
                f"model config gives hidden_size {shape.hidden_size}; routers sized from the config would not fit "
                "this graph")
    if site.num_heads % units:
        return f"{where}: {site.num_heads} heads are not a multiple of {units} units"
    return None


def _insert_hook(gm: fx.GraphModule, site: AttentionSite, info: SiteInfo, hook: SiteHook, seen: set[int]) -> None:
    """Replace every use of ``site.sdpa`` with ``hook(info, router_input, sdpa)``."""

    def polar_site_hook(x: Tensor, out: Tensor) -> Tensor:
        # x: [B, T, hidden] or [B*T, hidden]   out: [B, H, T, D]
        seen.add(info.layer)
        return hook(info, x.reshape(out.shape[0], out.shape[2], -1), out)

    with gm.graph.inserting_after(site.sdpa):
        new = gm.graph.call_function(polar_site_hook, (site.router_input, site.sdpa))
    site.sdpa.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)


def _site_name(site: AttentionSite) -> str:
    return site.module or site.sdpa.name


def _is_attention_type(kind: str) -> bool:
    kind = _LEGACY_LAYER_TYPES.get(kind, kind)
    return kind.startswith("hybrid") or (kind.endswith("attention") and kind != "linear_attention")


def _layer_types(model: nn.Module) -> list[str] | None:
    """The text decoder config's ``layer_types`` (``layers_block_type`` in older configs), if it is a list of str."""
    config = getattr(model, "config", None)
    with contextlib.suppress(AttributeError, ValueError):  # no such method; several candidate text configs
        config = config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None)
    if types is None:
        types = getattr(config, "layers_block_type", None)
    if not isinstance(types, (list, tuple)) or not all(isinstance(kind, str) for kind in types):
        return None
    return list(types)


def _describe(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type {model_type!r})" if model_type else type(model).__name__

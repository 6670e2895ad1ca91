"""AttentionPass: matches decode-step SDPA sites -> rewrites each to router + ``polar::select_attention``.

For a site of layer ``i`` with a router in the bank, the rewrite inserts before the SDPA call

    units_kept = polar.route(router_input, W_i, b_i, k_i)           # [B, k_i]: top-k_i of the router's scores,
                                                                    # k_i = max(1, round(d_i * units))
    out = polar.select_attention(q, K_cache, V_cache, units_kept, mask, scale)   # [B, H, 1, D]

and replaces the SDPA output with ``out``; the Q/K/V projections and cache writes are untouched, and
``repeat_kv`` goes dead. At density 1.0 (static batch) every unit is kept without running the router.
Keeps a site dense when the matcher gives a reason, when the layer has no router, or when the dtype is
unsupported; a dense decode site that reads HF's ``repeat_kv`` still switches to SDPA with ``enable_gqa=True`` on
the un-repeated cache (same numbers). Raises when a router does not fit the graph (a bank for another model).
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._dynamo.source import ConstantSource

from ..config import PolarConfig
from ..ops import SUPPORTED_DTYPES
from ..routers import RouterBankError, kept_units
from .graph import fake_value, op_name, shape_of, static_int
from .match import AttentionSite, find_attention_sites
from .records import PassRecord, SiteRecord

__all__ = ["AttentionPass"]

_VIEW_OPS = ("reshape", "expand", "unsqueeze", "getitem", "slice", "alias")

NOT_SDPA_NOTE = (
    "no scaled_dot_product_attention call but a softmax: attention that does not go through SDPA (such as HF's "
    "eager attention) stays dense; load the model with attn_implementation='sdpa' where it supports it"
)


class AttentionPass:
    """Rewrites decode attention into router-gated selective attention (see the module docstring)."""

    name = "attention"

    def __init__(self, config: PolarConfig) -> None:
        self.config = config

    def __call__(self, gm: fx.GraphModule) -> PassRecord:
        record = PassRecord(self.name)
        changed = False
        sites = find_attention_sites(gm)
        if not sites and any(op_name(node) == "softmax" for node in gm.graph.nodes):
            record.note = NOT_SDPA_NOTE
        for site in sites:
            reason = self._why_dense(site)
            kept = None
            if reason is None:
                kept = kept_units(self.config.layer_density(site.layer), site.num_kv_heads)
                self._rewrite(gm, site, kept)
                changed = True
            elif site.dense_reason is None and site.key_cache is not site.sdpa.args[1]:
                _read_unrepeated_cache(gm.graph, site)
                reason += " (dense, GQA-native SDPA on the un-repeated cache)"
                changed = True
            record.sites.append(
                SiteRecord(
                    pass_name=self.name,
                    layer=site.layer,
                    module=site.module,
                    kind="decode" if site.is_decode else "prefill",
                    heads=site.num_heads,
                    kv_heads=site.num_kv_heads,
                    units=site.num_kv_heads,
                    kept=kept,
                    rewritten=reason is None,
                    reason=reason or "",
                )
            )
        if changed:  # dense GQA-native sites change the graph too
            gm.graph.lint()
            gm.recompile()
        return record

    def _why_dense(self, site: AttentionSite) -> str | None:
        if site.dense_reason is not None:
            return site.dense_reason
        bank = self.config.routers
        if bank is None or site.layer not in bank.weights:
            return f"no router for layer {site.layer}"
        expected = (site.num_kv_heads, site.hidden_size)
        actual = tuple(bank.weights[site.layer].shape)
        if actual != expected:
            raise RouterBankError(
                f"layer {site.layer} ({site.module}): router weight is {list(actual)}, the graph needs "
                f"{list(expected)} ({site.num_kv_heads} {bank.shape.unit_kind}s x hidden {site.hidden_size})"
            )
        if site.num_kv_heads == 1:
            return "one KV head (multi-query): every query head reads the same K/V, so there is nothing to select"
        dtype = fake_value(site.query).dtype
        if dtype not in SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported (supported: {[str(d) for d in SUPPORTED_DTYPES]})"
        if site.attn_mask is None and static_int(shape_of(site.key_cache)[2]) is None:
            return "no attention mask and a dynamic cache length"
        return self._why_not_worth_it(site)

    def _why_not_worth_it(self, site: AttentionSite) -> str | None:
        """Why routing would cost more than it saves (see ``PolarConfig.min_saved_mib``), for static shapes."""
        key = fake_value(site.key_cache)
        threshold = self.config.saved_bytes_threshold(key.device.type)
        batch, kv_len = static_int(shape_of(site.key_cache)[0]), static_int(shape_of(site.key_cache)[2])
        if threshold == 0 or batch is None or kv_len is None:
            return None
        skipped = site.num_kv_heads - kept_units(self.config.layer_density(site.layer), site.num_kv_heads)
        saved = skipped * batch * kv_len * site.head_dim * 2 * key.element_size()  # K and V rows not read
        if saved > threshold:
            return None
        return (f"routing would skip only {saved / 2**20:.1f} MiB of K/V reads per step (B={batch}, L={kv_len}), "
                f"not more than min_saved_mib={threshold / 2**20:g}")

    def _rewrite(self, gm: fx.GraphModule, site: AttentionSite, kept: int) -> None:
        graph = gm.graph
        old_key, old_value = site.sdpa.args[1], site.sdpa.args[2]
        device = fake_value(site.query).device
        existing = set(graph.nodes)
        with graph.inserting_before(site.sdpa):
            units_kept = self._insert_router(gm, site, kept)  # [B, kept]
            mask = site.attn_mask
            if mask is None:
                kv_len = static_int(shape_of(site.key_cache)[2])
                mask = graph.call_function(torch.ones, ((1, 1, 1, kv_len),), {"dtype": torch.bool, "device": device})
            query, scale = site.query, site.scale
            if isinstance(scale, fx.Node):  # a traced float: scale the query in the graph, the op by 1.0
                query, scale = graph.call_function(operator.mul, (query, scale)), 1.0
            out = graph.call_function(
                torch.ops.polar.select_attention.default,
                (query, site.key_cache, site.value_cache, units_kept, mask, scale),
            )
        for node in graph.nodes:
            if node not in existing:
                node.meta["nn_module_stack"] = site.sdpa.meta.get("nn_module_stack", {})
        out.meta.update({k: v for k, v in site.sdpa.meta.items() if k in ("example_value", "val")})
        site.sdpa.replace_all_uses_with(out)
        graph.erase_node(site.sdpa)
        for node in (old_key, old_value):
            _erase_dead_views(graph, node)

    def _insert_router(self, gm: fx.GraphModule, site: AttentionSite, kept: int) -> fx.Node:
        """Nodes computing the kept units ``[B, kept]``; when every unit is kept (and B is static) no router runs."""
        graph, units = gm.graph, site.num_kv_heads
        batch = static_int(shape_of(site.query)[0])
        if kept == units and batch is not None:
            every_unit = graph.call_function(torch.arange, (units,), {"device": fake_value(site.query).device})
            return graph.call_function(torch.Tensor.expand, (every_unit, batch, units))
        bank, x = self.config.routers, site.router_input
        x_value = fake_value(x)
        weight = _constant(gm, f"polar_router_{site.layer}_weight", bank.weights[site.layer], x_value)
        bias = _constant(gm, f"polar_router_{site.layer}_bias", bank.biases[site.layer], x_value)
        top = graph.call_function(torch.ops.polar.route.default, (x, weight, bias, kept))  # [B, 1, kept]
        return graph.call_function(torch.reshape, (top, (-1, kept)))


def _constant(gm: fx.GraphModule, name: str, tensor: torch.Tensor, like: torch.Tensor) -> fx.Node:
    """A ``get_attr`` node of ``tensor`` (in ``like``'s dtype and device), stored on ``gm`` as a buffer.

    Dynamo's graph modules map every parameter and buffer to a source (``_param_name_to_source``); AOTAutograd
    asserts on that map and uses it to find the static inputs (the KV cache) that let Inductor keep CUDA graphs,
    so the new buffer gets an entry too.
    """
    gm.register_buffer(name, tensor.detach().to(device=like.device, dtype=like.dtype).contiguous())
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources[name] = ConstantSource(name)
    return gm.graph.get_attr(name)


def _read_unrepeated_cache(graph: fx.Graph, site: AttentionSite) -> None:
    """Point a dense decode site's SDPA at the un-repeated cache with ``enable_gqa=True`` (same numbers)."""
    old_key, old_value = site.sdpa.args[1], site.sdpa.args[2]
    site.sdpa.args = (site.sdpa.args[0], site.key_cache, site.value_cache, *site.sdpa.args[3:])
    site.sdpa.kwargs = {**site.sdpa.kwargs, "enable_gqa": True}
    for node in (old_key, old_value):
        _erase_dead_views(graph, node)


def _erase_dead_views(graph: fx.Graph, node: object) -> None:
    """Erase ``node`` and the view ops above it that nothing uses any more (the dead ``repeat_kv``)."""
    while isinstance(node, fx.Node) and not node.users and op_name(node) in _VIEW_OPS:
        parent = node.args[0]
        graph.erase_node(node)
        node = parent

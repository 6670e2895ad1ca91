"""AttentionPass: matches decode-step SDPA sites -> rewrites each to router + ``polar::select_attention``.

For a site of layer ``i`` with a router (attached to the model, or in the options' bank: ``passes/routing.py``),
the rewrite inserts before the SDPA call

    units_kept = polar.route(router_input, W_i, b_i, k_i)           # [B, k_i]: top-k_i of the router's scores,
                                                                    # k_i = max(1, round(d_i * units))
    out = polar.select_attention(q, K_cache, V_cache, units_kept, mask, scale)   # [B, H, 1, D]

and replaces the SDPA output with ``out``; the Q/K/V projections and cache writes are untouched, and
``repeat_kv`` goes dead. At density 1.0 (static batch) every unit is kept without running the router.
Keeps a site dense when the matcher gives a reason, when the layer has no router (or shares one with another
site), when the dtype is unsupported, or when routing would save too few bytes. Raises when a router does not fit
the graph (a bank for another model).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor, fx

from ..config import PolarConfig
from ..ops import SUPPORTED_DTYPES
from ..routers import RouterBankError
from .constants import graph_constant
from .graph import erase_dead_views, fake_value, op_name, shape_of, static_int
from .match import AttentionSite, find_attention_sites
from .records import PassRecord, SiteRecord
from .routing import SiteRouter, assign_routers

__all__ = ["AttentionPass"]

NOT_SDPA_NOTE = (
    "no scaled_dot_product_attention call but a softmax or flex_attention: attention that does not go through SDPA "
    "(such as HF's eager or flex attention) stays dense; load the model with attn_implementation='sdpa' where it "
    "supports it"
)
_FLEX_ATTENTION = getattr(torch.ops.higher_order, "flex_attention", None)


GRAD_REASON = ("autograd is recording this step (the query requires grad), and the polar ops are inference-only: "
               "run it under torch.no_grad() or torch.inference_mode()")


class AttentionPass:
    """Rewrites decode attention into router-gated selective attention (see the module docstring)."""

    name = "attention"

    def __init__(self, config: PolarConfig) -> None:
        self.config = config

    def __call__(self, gm: fx.GraphModule) -> PassRecord:
        record = PassRecord(self.name)
        sites = find_attention_sites(gm)
        if not sites and any(op_name(node) == "softmax" or node.target is _FLEX_ATTENTION for node in gm.graph.nodes):
            record.note = NOT_SDPA_NOTE
        routers = assign_routers(gm, sites, self.config)
        for site in sites:
            router = routers.get(site, site.dense_reason)
            reason = router if isinstance(router, str) else self._why_dense(site, router)
            if reason is None:
                self._rewrite(gm, site, router)
            record.sites.append(SiteRecord.of(self.name, site, kept=None if reason else router.k, reason=reason))
            if reason == GRAD_REASON:
                record.note = f"every site stays dense: {GRAD_REASON}"
        if record.rewritten:
            gm.graph.lint()
            gm.recompile()
        return record

    def _why_dense(self, site: AttentionSite, router: SiteRouter) -> str | None:
        expected = (site.num_kv_heads, site.hidden_size)
        actual = tuple(router.weight.shape if isinstance(router.weight, Tensor) else shape_of(router.weight))
        if actual != expected:
            raise RouterBankError(
                f"layer {site.layer} ({site.module}): router weight is {list(actual)}, the graph needs "
                f"{list(expected)} ({site.num_kv_heads} KV heads or heads x hidden {site.hidden_size})"
            )
        if fake_value(site.query).requires_grad:
            return GRAD_REASON
        if site.num_kv_heads == 1:
            return "one KV head (multi-query): every query head reads the same K/V, so there is nothing to select"
        dtype = fake_value(site.query).dtype
        if dtype not in SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported (supported: {[str(d) for d in SUPPORTED_DTYPES]})"
        if site.attn_mask is None and static_int(shape_of(site.key_cache)[2]) is None:
            return "no attention mask and a dynamic cache length"
        return self._why_not_worth_it(site, router)

    def _why_not_worth_it(self, site: AttentionSite, router: SiteRouter) -> str | None:
        """Why routing would cost more than it saves (see ``PolarConfig.min_saved_mib``), for static shapes."""
        key = fake_value(site.key_cache)
        threshold = router.min_saved_bytes
        if threshold is None:
            threshold = self.config.saved_bytes_threshold(key.device.type)
        batch, kv_len = static_int(shape_of(site.key_cache)[0]), static_int(shape_of(site.key_cache)[2])
        if threshold == 0 or batch is None or kv_len is None:
            return None
        saved = (site.num_kv_heads - router.k) * batch * kv_len * site.head_dim * 2 * key.element_size()
        if saved > threshold:
            return None
        return (f"routing would skip only {saved / 2**20:.1f} MiB of K/V reads per step (B={batch}, L={kv_len}), "
                f"not more than min_saved_mib={threshold / 2**20:g}")

    def _rewrite(self, gm: fx.GraphModule, site: AttentionSite, router: SiteRouter) -> None:
        graph = gm.graph
        old_key, old_value = site.sdpa.args[1], site.sdpa.args[2]
        device = fake_value(site.query).device
        existing = set(graph.nodes)
        with graph.inserting_before(site.sdpa):
            units_kept = self._insert_router(gm, site, router)  # [B, k]
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
            erase_dead_views(graph, node)

    def _insert_router(self, gm: fx.GraphModule, site: AttentionSite, router: SiteRouter) -> fx.Node:
        """Nodes computing the kept units ``[B, k]``; when every unit is kept (and B is static) no router runs."""
        graph, units, kept = gm.graph, site.num_kv_heads, router.k
        batch = static_int(shape_of(site.query)[0])
        if kept == units and batch is not None:
            every_unit = graph.call_function(torch.arange, (units,), {"device": fake_value(site.query).device})
            return graph.call_function(torch.Tensor.expand, (every_unit, batch, units))
        x = site.router_input
        x_value = fake_value(x)
        weight, bias = (_router_tensor(gm, site, router, name, tensor, x_value)
                        for name, tensor in (("weight", router.weight), ("bias", router.bias)))
        top = graph.call_function(torch.ops.polar.route.default, (x, weight, bias, kept))  # [B, 1, kept]
        return graph.call_function(torch.reshape, (top, (-1, kept)))


def _router_tensor(gm: fx.GraphModule, site: AttentionSite, router: SiteRouter, name: str,
                   value: fx.Node | Tensor, like: Tensor) -> fx.Node:
    """A router weight or bias as a node in ``like``'s dtype: the attached buffer's node (cast in the graph if the
    model's dtype changed under it), or an options tensor stored on ``gm``."""
    if isinstance(value, Tensor):
        return graph_constant(gm, f"polar_router_{router.layer}_{name}", value, like)
    if fake_value(value).dtype == like.dtype:
        return value
    return gm.graph.call_function(torch.Tensor.to, (value, like.dtype))

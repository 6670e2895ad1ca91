"""MlpPass: rewrites the decode step's ReLU MLPs (``passes/match_mlp.py``) into router + gather-GEMMs.

For an MLP site of layer ``i`` with an MLP router (attached to the model, ``polar::layer_mlp_router``, or in the
options' bank) and a k for this step's batch size in the bank's table, the rewrite replaces the down projection by

    x2  = x.reshape(-1, hidden)                                  # [N, hidden]: the MLP input, N = B tokens
    idx = polar.mlp_route(x2, W_in_i, W_out_i, k)                # [k]: one neuron set for the whole batch
    h   = polar.gather_up(x2, W_up, b_up, idx)                   # [N, k]   (gated: polar.gather_gated_up)
    h   = torch.square(h)                                        # squared ReLU (relu2) only
    out = polar.gather_down(h, W_down^T, b_down, idx)            # [N, hidden], reshaped as the down output

so it computes exactly ``down[:, idx] · act(up[idx] x + b_up[idx]) + b_down`` (a fused gate/up projection's weight
and bias are cut into their two halves of rows first). The up weight is read in its
``[ffn, hidden]`` rows and the down weight through a transposed, contiguous copy ``[ffn, hidden]`` (taken from the
model's tensor when the graph compiles, shared by all graphs of that weight, listed in ``gm.meta[TRANSPOSED_META]``
so that the backend copies it again, in place, before a call that follows an in-place change of the weight; Conv1D
layouts are already so and need no copy); the user's model is never changed. Sites stay dense, with the reason, for every activation but a
bare ReLU (or a squared one in a plain MLP), prefill, no router or no k (the table says dense at this batch size), k past the kernels' break-even
(``PolarConfig.mlp_break_even``), an unsupported dtype, autograd recording, or weights the graph computes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from ..config import PolarConfig
from ..distributed import MLP_SHARDED_REASON, projection_shard
from ..ops import SUPPORTED_DTYPES
from ..routers import RouterBankError
from .attention import GRAD_REASON
from .constants import graph_constant, transposed
from .graph import bound_args, fake_value, module_path, module_stack, op_name, shape_of, static_int
from .match import find_attention_sites
from .match_mlp import MlpSite, find_mlp_sites
from .records import PassRecord, SiteRecord
from .routing import is_mlp_router_marker

__all__ = ["TRANSPOSED_META", "MlpPass"]

TRANSPOSED_META = "polar_transposed_weights"  # gm.meta key: the TransposedWeight copies the graph reads

_SELECT_ATTENTION = torch.ops.polar.select_attention.default
# ops of the MLP body the rewrite makes dead (the activation chain, the projections, their views)
_BODY_OPS = ("linear", "addmm", "matmul", "relu", "activation", "mul", "add", "pow", "square", "tanh", "reshape", "alias",
             "dropout", "getitem", "split")


@dataclass(frozen=True)
class MlpRouter:
    """The MLP router one site runs: ``w_in [rank, hidden]``, ``w_out [ffn, rank]`` as graph nodes (attached) or
    tensors (options), and the ``k`` neurons kept at this batch size (None: the table says dense)."""

    layer: int
    w_in: fx.Node | Tensor
    w_out: fx.Node | Tensor
    k: int | None


class MlpPass:
    """Rewrites decode-step ReLU MLPs into router + gather-GEMMs (see the module docstring)."""

    name = "mlp"

    def __init__(self, config: PolarConfig, inputs: dict[fx.Node, Any] | None = None) -> None:
        self.config = config
        self.inputs = inputs or {}  # placeholder -> the real tensor the graph is compiled for (weights)

    def __call__(self, gm: fx.GraphModule) -> PassRecord:
        record = PassRecord(self.name)
        decode_graph = _is_decode_graph(gm)
        markers = {module_path(node): node for node in gm.graph.nodes if is_mlp_router_marker(node)}
        for site in find_mlp_sites(gm):
            kind = _kind(site, decode_graph)
            router = self._router(site, markers) if site.dense_reason is None and kind == "decode" else None
            reason = self._why_dense(gm, site, kind, router)
            if reason is None:
                self._rewrite(gm, site, router)
            record.sites.append(SiteRecord(
                pass_name=self.name, layer=site.layer, module=module_path(site.down), kind=kind, heads=None,
                kv_heads=None, units=site.ffn_size, kept=None if reason else router.k, rewritten=reason is None,
                reason=reason or ""))
        if record.rewritten:
            gm.graph.lint()
            gm.recompile()
        return record

    def _router(self, site: MlpSite, markers: dict[str, fx.Node]) -> MlpRouter | None:
        bank = self.config.routers
        if bank is not None:
            if bank.mlp is None or site.layer not in bank.mlp.w_in:
                return None
            rows = _rows(site)
            k = None if rows is None else bank.mlp.k_for(site.layer, rows)
            return MlpRouter(site.layer, bank.mlp.w_in[site.layer], bank.mlp.w_out[site.layer], k)
        marker = next((markers[path] for path in reversed(module_stack(site.down)) if path in markers), None)
        if marker is None:
            return None
        _, w_in, w_out, layer, k = marker.args
        return MlpRouter(layer, w_in, w_out, k or None)

    def _why_dense(self, gm: fx.GraphModule, site: MlpSite, kind: str, router: MlpRouter | None) -> str | None:
        if site.dense_reason is not None:
            return site.dense_reason
        if kind != "decode":
            return f"{kind}: only decode steps are sparsified"
        shard = projection_shard(site.up)
        if shard is not None:
            return MLP_SHARDED_REASON.format(size=shard.size)
        if router is None:
            return f"no MLP router for layer {site.layer}"
        _check_router_fits(site, router)
        x = fake_value(_mlp_input(site))
        rows = _rows(site)
        if rows is None and self.config.routers is not None:
            return ("dynamic batch size: an options bank's k table needs a static one (compile with dynamic=False, "
                    "or attach the routers, whose k Dynamo picks and guards per batch size)")
        if router.k is None:
            return f"the bank's k table keeps every neuron of layer {router.layer} at batch size {rows} (dense)"
        if x.requires_grad:
            return GRAD_REASON
        if x.dtype not in SUPPORTED_DTYPES:
            return f"dtype {x.dtype} is not supported (supported: {[str(d) for d in SUPPORTED_DTYPES]})"
        if site.gate is not None and _mlp_input(site) is not _projection_input(site.gate):
            return "the gate and up projections read different inputs"
        for projection in filter(None, (site.up, site.gate, site.down)):
            if self._weight(gm, projection) is None:
                return f"the weight of {module_path(projection) or 'a projection'} is computed in the graph"
        if rows is None:  # attached: k is the guarded table row of this batch size; judge cost at the example's
            rows = _rows(site, hint=True)
        weight_bytes = (2 if site.gate is None else 3) * x.shape[-1] * site.ffn_size * x.element_size()
        break_even = self.config.mlp_break_even(x.device.type, rows, weight_bytes)
        if router.k > break_even * site.ffn_size:
            return (f"k={router.k} of {site.ffn_size} neurons at batch size {rows} is past the gather kernels' "
                    f"break-even density {break_even:g}: dense is faster")
        return None

    def _rewrite(self, gm: fx.GraphModule, site: MlpSite, router: MlpRouter) -> None:
        graph, down = gm.graph, site.down
        x = _mlp_input(site)
        like = fake_value(x)
        hidden, k = like.shape[-1], router.k
        existing = set(graph.nodes)
        with graph.inserting_before(down):
            rows = graph.call_function(torch.reshape, (x, (-1, hidden)))  # [N, hidden]
            w_in, w_out = (self._router_tensor(gm, router, name, value, like)
                           for name, value in (("in", router.w_in), ("out", router.w_out)))
            idx = graph.call_function(torch.ops.polar.mlp_route.default, (rows, w_in, w_out, k))  # [k]
            gate_half, up_half = site.halves or (None, None)
            up = self._up_operands(gm, site, site.up, up_half, like)
            if site.gate is None:
                h = graph.call_function(torch.ops.polar.gather_up.default, (rows, *up, idx))  # [N, k]
                if site.activation == "relu2":  # in x's dtype after the kernel's rounding, as the model squares
                    h = graph.call_function(torch.square, (h,))
            else:
                gate = self._up_operands(gm, site, site.gate, gate_half, like)
                h = graph.call_function(torch.ops.polar.gather_gated_up.default, (rows, *gate, *up, idx))
            w_t = self._columns_of(gm, site.down, like)  # [ffn, d_out]
            out = graph.call_function(torch.ops.polar.gather_down.default,
                                      (h, w_t, self._bias(gm, site.down, site.hidden_size, like), idx))
            # the values later steps read (backend's split_down_finish): [N, k] and [N, d_out], N maybe symbolic
            tokens = like.reshape(-1, hidden).shape[0]
            h.meta["val"] = like.new_empty((tokens, k))
            out.meta["val"] = like.new_empty((tokens, site.hidden_size))
            # [N, d_out] -> the down projection's shape; only its leading (batch) size may be dynamic
            out = graph.call_function(torch.reshape, (out, (-1, *map(static_int, shape_of(down)[1:]))))
        for node in graph.nodes:
            if node not in existing:
                node.meta["nn_module_stack"] = down.meta.get("nn_module_stack", {})
        out.meta.update({key: v for key, v in down.meta.items() if key in ("example_value", "val")})
        old_input = down.args
        down.replace_all_uses_with(out)
        graph.erase_node(down)
        for arg in old_input:
            _erase_dead_body(graph, arg)

    def _router_tensor(self, gm: fx.GraphModule, router: MlpRouter, name: str, value: fx.Node | Tensor,
                       like: Tensor) -> fx.Node:
        if isinstance(value, Tensor):
            return graph_constant(gm, f"polar_mlp_router_{router.layer}_{name}", value, like)
        if fake_value(value).dtype == like.dtype:
            return value
        return gm.graph.call_function(torch.Tensor.to, (value, like.dtype))

    def _weight(self, gm: fx.GraphModule, projection: fx.Node) -> tuple[fx.Node, Tensor | None, bool] | None:
        """(node, real tensor or None, stored [out, in]) of ``projection``'s weight, when it is a graph input or
        attribute (a model weight), else None."""
        name = op_name(projection)
        node = bound_args(projection, name).get("weight" if name != "matmul" else "other")
        if not isinstance(node, fx.Node):
            return None
        out_in = name == "linear"
        if name == "matmul" and _transpose_of(node) is not None:  # Falcon: x @ weight.T, a linear of weight
            node, out_in = _transpose_of(node), True
        if node.op == "placeholder":
            real = self.inputs.get(node)
            return node, real if isinstance(real, Tensor) else None, out_in
        if node.op == "get_attr":  # a dotted path in export graphs ("model.layers.1.mlp.down_proj.weight")
            return node, operator.attrgetter(str(node.target))(gm), out_in
        return None

    def _up_operands(self, gm: fx.GraphModule, site: MlpSite, projection: fx.Node, half: int | None, like: Tensor
                     ) -> tuple[fx.Node, fx.Node]:
        """(weight rows ``[ffn, hidden]``, bias ``[ffn]``) of an up or gate projection; of its ``half`` of the rows
        when it is a fused gate/up projection."""
        weight = self._rows_of(gm, projection, like)
        if half is None:
            return weight, self._bias(gm, projection, site.ffn_size, like)
        rows = slice(half * site.ffn_size, (half + 1) * site.ffn_size)
        return (gm.graph.call_function(operator.getitem, (weight, rows)),
                self._bias(gm, projection, site.ffn_size, like, rows))

    def _rows_of(self, gm: fx.GraphModule, projection: fx.Node, like: Tensor) -> fx.Node:
        """The projection's weight as ``[ffn, hidden]`` rows (an up or gate projection)."""
        node, real, out_in = self._weight(gm, projection)
        return node if out_in else self._transposed(gm, projection, real, like)

    def _columns_of(self, gm: fx.GraphModule, projection: fx.Node, like: Tensor) -> fx.Node:
        """The projection's weight as ``[ffn, d_out]`` rows, one per input neuron (the down projection)."""
        node, real, out_in = self._weight(gm, projection)
        return self._transposed(gm, projection, real, like) if out_in else node

    def _transposed(self, gm: fx.GraphModule, projection: fx.Node, real: Tensor | None, like: Tensor) -> fx.Node:
        if real is None:
            raise RouterBankError(
                f"{module_path(projection)}: the MLP rewrite needs the weight's values to lay it out for the gather "
                "kernels, and this graph has none (run it through the polar backend, which passes them)"
            )
        name = "polar_mlp_" + (module_path(projection) or projection.name).replace(".", "_") + "_t"
        entry = transposed(real, like)
        gm.meta.setdefault(TRANSPOSED_META, []).append(entry)  # the backend refreshes it before every call
        return graph_constant(gm, name, entry.copy, like)

    def _bias(self, gm: fx.GraphModule, projection: fx.Node, width: int, like: Tensor, rows: slice | None = None
              ) -> fx.Node:
        """The projection's bias (its ``rows``, when given), or zeros ``[width]`` when it has none."""
        name = op_name(projection)
        bias = bound_args(projection, name).get("bias") if name != "matmul" else None
        if isinstance(bias, fx.Node):
            return bias if rows is None else gm.graph.call_function(operator.getitem, (bias, rows))
        return gm.graph.call_function(torch.zeros, ((width,),), {"dtype": like.dtype, "device": like.device})


def _check_router_fits(site: MlpSite, router: MlpRouter) -> None:
    """Raise :class:`RouterBankError` naming the layer when the router's widths differ from the site's."""
    w_in, w_out = (tuple(t.shape if isinstance(t, Tensor) else shape_of(t)) for t in (router.w_in, router.w_out))
    hidden = fake_value(_mlp_input(site)).shape[-1]
    if w_in[1] != hidden or w_out[0] != site.ffn_size:
        raise RouterBankError(
            f"layer {site.layer} ({module_path(site.down)}): MLP router is in {list(w_in)}, out {list(w_out)}; the "
            f"graph's MLP needs in [rank, {hidden}], out [{site.ffn_size}, rank] (hidden x ffn)"
        )


def _transpose_of(node: fx.Node) -> fx.Node | None:
    """``w`` when ``node`` is the transpose of a 2-D graph input or attribute ``w`` (``w.T`` in Dynamo graphs,
    ``permute`` / ``t`` in export graphs), else None."""
    attribute_t = node.op == "call_function" and node.target is getattr and node.args[1:] == ("T",)
    if not attribute_t and op_name(node) != "transpose":
        return None
    base = node.args[0]
    if not isinstance(base, fx.Node) or base.op not in ("placeholder", "get_attr"):
        return None
    value, weight = fake_value(node), fake_value(base)
    # a real transpose swaps the strides (an identity permute does not; shapes can't tell a square weight's apart)
    if value is None or weight is None or weight.dim() != 2 or value.stride() != weight.stride()[::-1]:
        return None
    return base


def _projection_input(projection: fx.Node) -> fx.Node:
    return bound_args(projection, op_name(projection)).get("input")


def _mlp_input(site: MlpSite) -> fx.Node:
    """The MLP's input as the up projection reads it (``[B, 1, hidden]``, or OPT's flattened ``[B, hidden]``)."""
    return _projection_input(site.up)


def _rows(site: MlpSite, hint: bool = False) -> int | None:
    """Tokens the MLP runs on (the batch size at a decode step); None when dynamic, unless ``hint``: then the size
    of the example the graph was traced with."""
    rows = 1
    for size in shape_of(_mlp_input(site))[:-1]:
        if static_int(size) is None and not hint:
            return None
        rows *= static_int(size) if static_int(size) is not None else int(size.node.hint)
    return rows


def _erase_dead_body(graph: fx.Graph, node: Any) -> None:
    """Erase ``node`` and what only it used, as far as the MLP body goes (projections, activation, views)."""
    if not isinstance(node, fx.Node) or node.users or (op_name(node) not in _BODY_OPS and _transpose_of(node) is None):
        return
    parents = node.all_input_nodes
    graph.erase_node(node)
    for parent in parents:
        _erase_dead_body(graph, parent)


def _is_decode_graph(gm: fx.GraphModule) -> bool:
    """True when the graph's attention decodes: every SDPA site has one query token, or the attention pass has
    already rewritten them (``polar::select_attention``), and there is at least one."""
    sites = find_attention_sites(gm)
    rewritten = any(node.target is _SELECT_ATTENTION for node in gm.graph.nodes)
    return (bool(sites) or rewritten) and all(site.is_decode for site in sites)


def _kind(site: MlpSite, decode_graph: bool) -> str:
    """'decode' when each sequence feeds one token: ``[B, 1, d]`` inputs, or a 2-D flatten (OPT) in a graph whose
    attention decodes."""
    shape = shape_of(site.up)
    if shape is None or (len(shape) == 3 and static_int(shape[1]) is None):
        return "unknown"
    if len(shape) == 3:
        return "decode" if static_int(shape[1]) == 1 else "prefill"
    return "decode" if decode_graph else "prefill"

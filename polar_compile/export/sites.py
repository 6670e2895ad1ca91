"""What an exported program routes, read from its graph: the records ``explain`` prints for an ``ExportedProgram``.

Read from the program itself, not from what export once reported, so a saved and loaded program says what it runs:
each ``polar::select_attention`` is a rewritten attention site (``k`` from the ``polar::route`` feeding it), each
``polar::gather_down`` a rewritten MLP site (``k`` from its ``polar::mlp_route``), and each remaining SDPA call a
dense site, with the matcher's reason where it has one. Layers come from the nodes' ``nn_module_stack``, which
export keeps.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.export import ExportedProgram

from ..passes.graph import layer_of, module_path, op_name, shape_of, static_int
from ..passes.match import find_attention_sites
from ..passes.records import PassRecord, SiteRecord

__all__ = ["program_records"]

_SELECT = torch.ops.polar.select_attention.default
_ROUTE = torch.ops.polar.route.default
_GATHER_DOWN = torch.ops.polar.gather_down.default
_MLP_ROUTE = torch.ops.polar.mlp_route.default
DENSE_AT_EXPORT = "dense in the exported program"


def program_records(program: ExportedProgram) -> list[PassRecord]:
    """An ``attention`` and an ``mlp`` record of the sites ``program`` runs, in graph order."""
    graph = program.module()
    attention, mlp = PassRecord("attention"), PassRecord("mlp")
    for node in graph.graph.nodes:
        if node.target is _SELECT:
            attention.sites.append(_attention_record(node))
        elif node.target is _GATHER_DOWN:
            mlp.sites.append(_mlp_record(node))
    for site in find_attention_sites(graph):
        attention.sites.append(SiteRecord.of("attention", site, kept=None,
                                             reason=site.dense_reason or DENSE_AT_EXPORT))
    attention.sites.sort(key=lambda site: (site.layer is None, site.layer or 0))
    return [attention, mlp]


def _attention_record(select: fx.Node) -> SiteRecord:
    query, key, units = select.args[0], select.args[1], select.args[3]
    heads, kv_heads = (static_int(shape_of(node)[1]) for node in (query, key))
    route = _producer(units, _ROUTE)
    kept = route.args[3] if route is not None else static_int(shape_of(units)[-1])
    return SiteRecord(pass_name="attention", layer=_layer(select), module=module_path(select),
                      kind=_kind(query), heads=heads, kv_heads=kv_heads, units=kv_heads, kept=kept, rewritten=True,
                      reason="")


def _mlp_record(gather_down: fx.Node) -> SiteRecord:
    idx = gather_down.args[3]
    route = _producer(idx, _MLP_ROUTE)
    ffn = static_int(shape_of(gather_down.args[1])[0])
    return SiteRecord(pass_name="mlp", layer=_layer(gather_down), module=module_path(gather_down), kind="decode",
                      heads=None, kv_heads=None, units=ffn, kept=route.args[3] if route is not None else None,
                      rewritten=True, reason="")


def _producer(node: fx.Node, target: object) -> fx.Node | None:
    """``node`` or the op above it through reshapes whose target is ``target``."""
    while isinstance(node, fx.Node):
        if node.target is target:
            return node
        if op_name(node) != "reshape":
            return None
        node = node.args[0]
    return None


def _layer(node: fx.Node) -> int | None:
    layer = layer_of(node)
    return layer[1] if layer else None


def _kind(query: fx.Node) -> str:
    length = static_int(shape_of(query)[2])
    return "unknown" if length is None else "decode" if length == 1 else "prefill"

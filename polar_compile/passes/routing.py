"""Which router a matched attention site uses: one attached to its decoder layer, or one from the options' bank.

Attached routers (``polar_compile.attach``) reach the graph as ``polar::layer_router`` nodes, one per decoder layer
that has a router, inside that layer's module: their weight and bias are graph inputs (the model's own buffers)
and their layer index, ``k`` and cost threshold are constants Dynamo guarded when it traced them. A site takes the
router of the layer around it. A bank given in ``options`` instead is the same for every model the backend compiles
(Dynamo tells backends apart by their options); its tensors become constants of the graph.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from ..config import PolarConfig
from ..distributed import projection_shard
from ..ops import layer_mlp_router, layer_router  # noqa: F401  (registers the marker ops)
from ..routers import RouterBank, RouterBankError, kept_units
from .graph import layer_of, module_path, module_stack
from .match import AttentionSite

__all__ = ["SiteRouter", "assign_routers", "is_mlp_router_marker", "is_router_marker", "strip_router_markers"]


def is_mlp_router_marker(node: fx.Node) -> bool:
    """True for a ``polar::layer_mlp_router`` call (the MLP router :func:`polar_compile.attach` put on a layer)."""
    return node.op == "call_function" and node.target in (torch.ops.polar.layer_mlp_router,
                                                          torch.ops.polar.layer_mlp_router.default)


def is_router_marker(node: fx.Node) -> bool:
    """True for a ``polar::layer_router`` call (Dynamo may record the op or its default overload)."""
    return node.op == "call_function" and (node.target is torch.ops.polar.layer_router
                                           or node.target is torch.ops.polar.layer_router.default)


@dataclass(frozen=True)
class SiteRouter:
    """The router one site runs: ``weight [units, hidden]`` and ``bias [units]`` as graph nodes (attached) or
    tensors (options), the ``k`` units kept per sequence, and the cost threshold in bytes (None: device default)."""

    layer: int
    weight: fx.Node | Tensor
    bias: fx.Node | Tensor
    k: int
    min_saved_bytes: float | None
    owner: object  # the same object for sites that would share one router


def assign_routers(gm: fx.GraphModule, sites: list[AttentionSite], config: PolarConfig
                   ) -> dict[AttentionSite, SiteRouter | str]:
    """For each rewritable site (no ``dense_reason``), its router or the reason it has none.

    Raises :class:`RouterBankError` when an options bank does not fit the graph (another model's bank).
    """
    candidates = [site for site in sites if site.dense_reason is None]
    if config.routers is not None:
        _check_bank_fits_graph(gm, config.routers, candidates)
        found = {site: _bank_router(site, config) for site in candidates}
    else:
        markers = {module_path(node): node for node in gm.graph.nodes if is_router_marker(node)}
        found = {site: _attached_router(site, markers, config) for site in candidates}
    sharing: dict[object, list[AttentionSite]] = defaultdict(list)
    for site, router in found.items():
        if isinstance(router, SiteRouter):
            sharing[router.owner].append(site)
    for group in sharing.values():
        modules = sorted({site.module for site in group})
        if len(modules) > 1:  # one module called twice (e.g. a batch for guidance) uses its router each time
            for site in group:
                found[site] = (f"{len(modules)} attention modules ({', '.join(modules)}) in layer "
                               f"{found[site].layer}, and a bank holds one router per layer")
    return found


def strip_router_markers(gm: fx.GraphModule) -> bool:
    """Replace every ``polar::layer_router`` and ``polar::layer_mlp_router`` node by its input; True when there was
    one."""
    markers = [node for node in gm.graph.nodes if is_router_marker(node) or is_mlp_router_marker(node)]
    for node in markers:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    return bool(markers)


def _attached_router(site: AttentionSite, markers: dict[str, fx.Node], config: PolarConfig) -> SiteRouter | str:
    marker = next((markers[path] for path in reversed(module_stack(site.sdpa)) if path in markers), None)
    if marker is None:
        return f"no router for layer {site.layer}"
    _, weight, bias, layer, k, min_saved_bytes = marker.args
    site.layer = layer  # the index attach() gave the layer (equal to the path's, stated by the model itself)
    if config.density is not None:
        k = kept_units(config.layer_density(layer), site.num_kv_heads)
    if config.min_saved_mib is not None:
        min_saved_bytes = config.min_saved_mib * 2**20
    return SiteRouter(layer, weight, bias, k, None if min_saved_bytes < 0 else min_saved_bytes, marker)


def _bank_router(site: AttentionSite, config: PolarConfig) -> SiteRouter | str:
    bank = config.routers
    if site.layer not in bank.weights:
        return f"no router for layer {site.layer}"
    weight, bias, units = bank.weights[site.layer], bank.biases[site.layer], bank.shape.num_kv_heads
    shard = projection_shard(site.query_projection)
    if shard is not None:  # tensor parallel: this rank's units, its own top-k (distributed.py)
        where = f"layer {site.layer} ({site.module}), tensor-parallel rank {shard.rank} of {shard.size}"
        weight, bias, units = shard.rows(weight, where), shard.rows(bias, where), shard.local_units(units, where)
    k = kept_units(config.layer_density(site.layer), units)
    threshold = None if config.min_saved_mib is None else config.min_saved_mib * 2**20
    return SiteRouter(site.layer, weight, bias, k, threshold, site.layer)


def _check_bank_fits_graph(gm: fx.GraphModule, bank: RouterBank, sites: list[AttentionSite]) -> None:
    """Raise naming the first disagreement between an options bank and the decoder this graph runs."""
    model_types = {model_type for site in sites for model_type in _model_types(site.sdpa)}
    if model_types and bank.shape.model_type not in model_types:
        raise RouterBankError(
            f"the router bank is for model_type {bank.shape.model_type!r}, this graph runs "
            f"{' / '.join(sorted(map(repr, model_types)))}"
        )
    for site in sites:
        if site.layer >= bank.shape.num_layers:
            raise RouterBankError(
                f"layer {site.layer} ({site.module}): the router bank is for a model of {bank.shape.num_layers} "
                "layers, this graph's decoder has more"
            )
    lists = {site.layer_module.rsplit(".", 1)[0] for site in sites if site.layer_module}
    for layer_list in lists:
        count = _complete_layer_count(gm, layer_list)
        if count is not None and count != bank.shape.num_layers:
            raise RouterBankError(
                f"the router bank is for a model of {bank.shape.num_layers} layers, this graph's decoder "
                f"({layer_list}) has {count}"
            )


def _model_types(node: fx.Node) -> list[str]:
    """The HF ``model_type`` of every module around ``node`` whose class names its config class (the model, its
    decoder, ...); Dynamo records classes, export may record only their names (then none)."""
    classes = [cls for _, cls in (node.meta.get("nn_module_stack") or {}).values() if isinstance(cls, type)]
    config_classes = [getattr(cls, "config_class", None) for cls in classes]
    return [config.model_type for config in config_classes if isinstance(getattr(config, "model_type", None), str)
            and config.model_type]


def _complete_layer_count(gm: fx.GraphModule, layer_list: str) -> int | None:
    """How many items of ``layer_list`` the graph runs, when it provably runs all of them (items 0..n-1 and then
    a module of the list's parent, such as the final norm); else None (e.g. a graph break inside the list)."""
    parent = layer_list.rsplit(".", 1)[0] if "." in layer_list else ""
    indices: set[int] = set()
    after_list = False
    for node in gm.graph.nodes:
        layer = layer_of(node)
        if layer is not None and layer[0].rsplit(".", 1)[0] == layer_list:
            indices.add(layer[1])
            after_list = False
        elif indices and parent and module_path(node).startswith(parent + "."):
            after_list = True
    if after_list and indices == set(range(len(indices))):
        return len(indices)
    return None

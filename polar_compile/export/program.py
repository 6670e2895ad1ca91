"""``torch.export`` programs of a model's steps: the decode step rewritten by polar's passes, the prefill dense.

The decode step (:class:`~polar_compile.export.decode_step.CacheStep` with one token per row) is exported, its ATen
graph (``ExportedProgram.module()``) rewritten in place by :func:`~polar_compile.passes.manager.run_passes`, the
same passes and matcher as the backend, and exported again, so the program holds the ``polar::`` ops (and the
router tensors as constants) and keeps each node's ``nn_module_stack``, from which ``explain`` reads the layers.
Routers come from ``config.routers`` or, when it is None, from the ones attached to the model
(:func:`polar_compile.attach`), as in the backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

from ..config import PolarConfig
from ..passes.manager import run_passes
from ..passes.records import PassRecord
from ..passes.routing import is_mlp_router_marker, is_router_marker
from .decode_step import CacheStep
from .errors import ExportError

__all__ = ["export_decode", "export_prefill"]

NO_ROUTERS = ("export needs routers: pass routers= (a RouterBank or its directory) or attach them first with "
              "polar_compile.attach(model, bank); calibrate them with polar-compile calibrate")


def export_decode(model: nn.Module, inputs: Sequence[Tensor], config: PolarConfig, cache_mode: str = "inplace"
                  ) -> tuple[ExportedProgram, list[PassRecord]]:
    """The decode step of ``model`` as an ``ExportedProgram`` rewritten by polar's passes, and the passes' records.

    ``inputs`` are :class:`CacheStep`'s (ids ``[B, 1]``, positions, mask, slots, cache). Raises
    :class:`ExportError` for a prefill-shaped example, a model without routers (neither in ``config`` nor
    attached), and a graph in which the matcher finds no attention.
    """
    ids = inputs[0]
    if ids.dim() != 2 or ids.shape[1] != 1:
        raise ExportError(
            f"the decode step takes input_ids [B, 1] (one new token per sequence), got {list(ids.shape)}: a "
            "prefill-shaped example; export the prefill with export_prefill (polar_compile.export does both)"
        )
    if config.routers is not None:
        config.routers.check_model(model)
    graph = _export(CacheStep(model, cache_mode), inputs).module()
    attached = any(is_router_marker(node) or is_mlp_router_marker(node) for node in graph.graph.nodes)
    if config.routers is None and not attached:
        raise ExportError(NO_ROUTERS)
    records = run_passes(graph, config, inputs)
    attention = next(record for record in records if record.name == "attention")
    if not attention.sites:
        raise ExportError(
            f"{type(model).__name__}: the matcher found no attention in the decode step"
            + (f" ({attention.note})" if attention.note else "")
            + ", so there is nothing to route; export supports decoders whose attention calls SDPA"
        )
    return _export(graph, inputs), records


def export_prefill(model: nn.Module, inputs: Sequence[Tensor], cache_mode: str = "inplace") -> ExportedProgram:
    """The dense prefill of ``model`` (``inputs``: ids ``[B, T]``, ``T > 1``, and the rest as for the decode
    step) as an ``ExportedProgram``; it writes slots ``cache_position`` of the cache that the decode step reads."""
    return _export(CacheStep(model, cache_mode), inputs)


def _export(module: nn.Module, inputs: Sequence[Tensor]) -> ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, tuple(inputs), strict=False)

"""Tensor parallel: which slice of a layer's attention units this rank holds, and its routers' rows.

Under tensor parallelism (TP) the query, key and value projections are column-sharded and the output projection
row-sharded (DTensor ``parallelize_module``, ``use_local_output=True``; transformers' ``tp_plan`` /
``distributed_config`` does the same), so rank ``r`` of ``T`` holds query heads ``[r H/T, (r+1) H/T)``, KV heads
``[r Hkv/T, (r+1) Hkv/T)`` and its slice of the KV cache, and its attention sees local tensors.

Per-rank routing (the Polar Sparsity authors' TP semantics): the bank stays unsharded on disk; each rank takes the
router rows of its own units (KV groups, or heads for MHA), ``units / T`` of them, and keeps its own top
``k_local = max(1, round(density * units / T))`` per sequence. No collective runs for the selection and every rank
does the same work, but the kept set differs from a global top-k: each rank keeps exactly ``k_local`` of its own
units (``polar-compile eval --tp T`` measures what that costs).

What a backend sees (torch 2.13, transformers 5.24 and 5.17; Dynamo graph, before AOTAutograd):
- ``parallelize_module``: the parameters are ``DTensor`` placeholders; each projection reads
  ``DTensor.from_local(x)`` and its output passes through ``redistribute`` and ``to_local``; SDPA and the cache
  are local tensors (``H/T`` heads);
- transformers' TP: the parameters are ``DTensor`` placeholders whose ``to_local()`` the linear reads (a local
  ``linear`` on the local input), and the row-sharded output is summed by ``_c10d_functional.all_reduce`` +
  ``wait_tensor`` + ``copy_``.
Torch 2.11 (and earlier) Dynamo records ``from_local``, ``redistribute`` and ``to_local`` as call_functions of
closures named ``prim from_local``, ``prim_redistribute`` and ``prim_to_local`` (the mesh is not a graph input
there); the matcher looks through both forms (``passes/graph.py``: op ``dtensor``).
The sharding of a projection is read from its weight's ``DTensor`` (:func:`projection_shard`), that of a model
from its decoder layers' parameters (:func:`model_shard`). A sharded MLP stays dense: per-rank neuron routing is
not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from .passes.graph import bound_args, fake_value, op_name
from .routers import RouterBankError

__all__ = ["MLP_SHARDED_REASON", "TpShard", "model_shard", "parallelize", "projection_shard", "tensor_shard"]

MLP_SHARDED_REASON = ("tensor parallel: the MLP is sharded over {size} ranks and per-rank MLP routing is not "
                      "implemented, so it stays dense")


@dataclass(frozen=True)
class TpShard:
    """This rank's place in its tensor-parallel group: ``rank`` of ``size``."""

    rank: int
    size: int

    def local_units(self, units: int, where: str) -> int:
        """``units / size``; :class:`RouterBankError` naming ``where`` (e.g. the layer) when ``size`` does not
        divide ``units``."""
        if units % self.size:
            raise RouterBankError(
                f"{where}: {units} units (KV groups, or heads for MHA) are not divisible by the tensor-parallel size "
                f"{self.size}; each rank must hold whole units (expected a multiple of {self.size}, got {units})"
            )
        return units // self.size

    def rows(self, tensor: Tensor, where: str) -> Tensor:
        """This rank's contiguous block of ``tensor``'s rows (``[units, ...]`` -> ``[units / size, ...]``)."""
        local = self.local_units(tensor.shape[0], where)
        return tensor[self.rank * local : (self.rank + 1) * local]


def tensor_shard(tensor: Any) -> TpShard | None:
    """The shard a ``DTensor`` (real or fake) holds along the mesh dimension it is ``Shard``-placed on; None for a
    plain tensor or a replicated ``DTensor``."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return None
    dims = [dim for dim, placement in enumerate(tensor.placements) if isinstance(placement, Shard)]
    if not dims:
        return None
    mesh = tensor.device_mesh
    return TpShard(mesh.get_local_rank(dims[0]), mesh.size(dims[0]))


def projection_shard(projection: fx.Node | None) -> TpShard | None:
    """The shard of a ``linear`` node's weight in a Dynamo graph: the ``DTensor`` placeholder it reads, directly
    (``parallelize_module``) or through ``to_local()`` (transformers' TP; a ``prim_to_local`` closure on torch
    2.11); None when the weight is a plain tensor."""
    if projection is None or op_name(projection) != "linear":
        return None
    weight = bound_args(projection, "linear").get("weight")
    while isinstance(weight, fx.Node) and op_name(weight) == "dtensor" and weight.args:
        weight = weight.args[0]
    return tensor_shard(fake_value(weight))


def model_shard(layers: Sequence[nn.Module]) -> TpShard | None:
    """The TP shard of a model's decoder ``layers``: that of their first ``Shard``-placed ``DTensor`` parameter
    (the column-sharded attention projections), or None when no parameter is sharded."""
    for layer in layers:
        for parameter in layer.parameters():
            shard = tensor_shard(parameter)
            if shard is not None:
                return shard
    return None


# Separate projections parallelize() shards, by the attribute names HF decoders give them.
_COLUMN = ("q_proj", "k_proj", "v_proj", "fc1", "gate_proj", "up_proj")
_ROW = ("o_proj", "out_proj", "fc2", "down_proj")
_HEAD_COUNTS = ("num_heads", "num_key_value_heads")  # attention-module attributes some HF decoders view by


def parallelize(model: nn.Module, mesh: Any) -> nn.Module:
    """Shard ``model``'s decoder layers over the 1-D device ``mesh`` with DTensor ``parallelize_module``: query,
    key, value and MLP up/gate projections column-wise, output and MLP down projections row-wise
    (``use_local_output=True``), for models without a TP plan of their own (e.g. OPT); an attention module's
    ``num_heads`` / ``num_key_value_heads`` become the local counts. Returns ``model``.

    Raises :class:`RouterBankError` on every rank when the mesh size does not divide the heads or KV heads, or a
    decoder layer has fused projections (a column-sharded fused QKV would split query, key and value unevenly).
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from .routers import ModelShape
    from .state import decoder_layers

    shape = ModelShape.of(model)
    size = mesh.size()
    for count, what in ((shape.num_heads, "attention heads"), (shape.num_kv_heads, "KV heads")):
        if count % size:
            raise RouterBankError(f"{type(model).__name__}: {count} {what} are not divisible by the tensor-parallel "
                                  f"size {size} (expected a multiple of {size})")
    for index, layer in enumerate(decoder_layers(model, shape)):
        plan = {name: ColwiseParallel() if name.rsplit(".", 1)[-1] in _COLUMN else RowwiseParallel()
                for name, module in layer.named_modules() if name.rsplit(".", 1)[-1] in _COLUMN + _ROW}
        if not any(name.endswith("k_proj") for name in plan):
            raise RouterBankError(f"layer {index}: no separate q_proj/k_proj/v_proj to shard (fused projections are "
                                  "not supported by polar_compile.distributed.parallelize)")
        parallelize_module(layer, mesh, plan)
        for module in layer.modules():  # attention that views by its head counts (OPT) sees its local heads
            for name in _HEAD_COUNTS:
                if hasattr(module, "k_proj") and isinstance(getattr(module, name, None), int):
                    setattr(module, name, getattr(module, name) // size)
    return model

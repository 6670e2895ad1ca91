"""The order of polar's graph passes, in one function, and the records they leave for ``explain``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from torch import fx

from ..config import PolarConfig
from .attention import AttentionPass
from .gqa import GqaPass
from .mlp import MlpPass
from .records import PassRecord
from .routing import strip_router_markers

__all__ = ["run_passes"]

# In this order: the GQA pass rewrites the sites the attention pass left dense.
_PASSES = {"attention": lambda config, inputs: AttentionPass(config), "gqa": lambda config, inputs: GqaPass(),
           "mlp": MlpPass}


def run_passes(gm: fx.GraphModule, config: PolarConfig, example_inputs: Sequence[Any] | None = None
               ) -> list[PassRecord]:
    """Rewrite ``gm`` in place with the passes ``config`` enables, in order; one record per pass.

    ``example_inputs`` are the tensors the graph's placeholders stand for (the backend's): the MLP pass lays out
    weights from them. Then removes the attached routers' markers, which only the passes read.
    """
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    inputs = dict(zip(placeholders, example_inputs or (), strict=False))
    records = []
    for name in config.passes:
        start = time.perf_counter()
        record = _PASSES[name](config, inputs)(gm)
        record.seconds = time.perf_counter() - start
        records.append(record)
    if strip_router_markers(gm):
        gm.graph.lint()
        gm.recompile()
    return records

"""The order of polar's graph passes, in one function, and the records they leave for ``explain``."""

from __future__ import annotations

import time

from torch import fx

from ..config import PolarConfig
from .attention import AttentionPass
from .gqa import GqaPass
from .mlp import MlpPass
from .records import PassRecord
from .routing import strip_router_markers

__all__ = ["run_passes"]

# In this order: the GQA pass rewrites the sites the attention pass left dense.
_PASSES = {"attention": AttentionPass, "gqa": lambda config: GqaPass(), "mlp": lambda config: MlpPass()}


def run_passes(gm: fx.GraphModule, config: PolarConfig) -> list[PassRecord]:
    """Rewrite ``gm`` in place with the passes ``config`` enables, in order; one record per pass.

    Then removes the attached routers' markers (``polar::layer_router``), which only the passes read.
    """
    records = []
    for name in config.passes:
        start = time.perf_counter()
        record = _PASSES[name](config)(gm)
        record.seconds = time.perf_counter() - start
        records.append(record)
    if strip_router_markers(gm):
        gm.graph.lint()
        gm.recompile()
    return records

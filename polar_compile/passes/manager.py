"""The order of polar's graph passes, in one function, and the records they leave for ``explain``."""

from __future__ import annotations

import time

from torch import fx

from ..config import PolarConfig
from .attention import AttentionPass
from .records import PassRecord

__all__ = ["run_passes"]

_PASSES = {"attention": AttentionPass}


def run_passes(gm: fx.GraphModule, config: PolarConfig) -> list[PassRecord]:
    """Rewrite ``gm`` in place with the passes ``config`` enables, in order; one record per pass."""
    records = []
    for name in config.passes:
        start = time.perf_counter()
        record = _PASSES[name](config)(gm)
        record.seconds = time.perf_counter() - start
        records.append(record)
    return records

"""``pt2``: the programs as ``torch.export`` archives (``torch.export.save``); ``torch.export.load`` reads them back
in any process that has imported ``polar_compile`` (which registers the ``polar::`` ops they call)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.export import ExportedProgram

__all__ = ["save_pt2"]


def save_pt2(program: ExportedProgram, path: Path) -> None:
    """Save ``program`` to ``path``; ``ExportedProgram.module()`` of the loaded program keeps the in-place writes
    into the cache tensors it is given."""
    torch.export.save(program, path)

"""Export for deployment: ``polar_compile.export(model, ...)`` writes a decode step rewritten by polar's passes, and a
dense prefill, in one of four formats.

    decode_step.py   the unit exported (:class:`CacheStep`): its inputs, outputs and how the cache travels
    program.py       torch.export of the steps; the decode step's ATen graph goes through ``run_passes``
    sites.py         what an exported program routes (``polar_compile.explain(program)``)
    artifact.py      the folder written (manifest + programs) and :func:`load`, which runs it from Python
    pt2.py, aoti.py  the two runnable formats; onnx.py / onnx_ops.py: ONNX; tensorrt.py: guarded, untested

This package module is also callable: ``polar_compile.export(...)`` is :func:`export`.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ExportError

if TYPE_CHECKING:
    from torch import nn

    from ..routers import RouterBank
    from .artifact import Deployment, load
    from .decode_step import CacheStep

__all__ = ["FORMATS", "CacheStep", "Deployment", "ExportError", "export", "load"]

FORMATS = ("pt2", "aoti", "onnx", "tensorrt")


def export(
    model: nn.Module,
    *,
    batch_size: int,
    max_cache_len: int,
    path: str | Path,
    format: str = "pt2",
    routers: RouterBank | str | Path | None = None,
    density: float | Sequence[float] | None = None,
    prefill_len: int | None = None,
    mlp: bool = True,
    min_saved_mib: float | None = None,
) -> Path:
    """Export ``model``'s decode step (rewritten by polar's passes) and its dense prefill to the folder ``path``.

    - ``batch_size``, ``max_cache_len``: the static batch and cache length the programs run at.
    - ``format``: ``"pt2"`` (``torch.export.save``), ``"aoti"`` (AOTInductor packages), ``"onnx"`` (cache in, cache
      out; see ``export/onnx.py``) or ``"tensorrt"`` (untested, needs ``torch_tensorrt``).
    - ``routers``: a :class:`RouterBank` or its folder; None uses the routers attached to ``model``
      (:func:`polar_compile.attach`). ``density``, ``min_saved_mib``: as in the backend's options; ``mlp=False``
      keeps every MLP dense.
    - ``prefill_len``: the prompt length of the prefill program (prompts are left-padded to it); default
      ``max_cache_len // 2``.

    The model runs in its dtype and on its device (an ``aoti`` package is compiled for that device). Returns the
    folder; :func:`load` runs a ``pt2`` or ``aoti`` one, ``polar_compile.explain(torch.export.load(...))`` lists
    the sites of a ``pt2`` decode program. Raises :class:`ExportError` for an unknown format, bad sizes, a
    prefill-shaped decode example, a model without routers or without attention the matcher finds, and
    ``tensorrt`` without ``torch_tensorrt``.
    """
    from ..config import PolarConfig
    from .artifact import PROGRAMS, manifest_fields, write_manifest
    from .decode_step import STEP_INPUTS, example_inputs
    from .program import export_decode, export_prefill

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; formats: {list(FORMATS)}")
    if format == "tensorrt":
        from .tensorrt import require_tensorrt

        require_tensorrt()  # before any work
    prefill_len = max_cache_len // 2 if prefill_len is None else prefill_len
    _check_sizes(batch_size, max_cache_len, prefill_len)
    passes = ("attention", "gqa", "mlp") if mlp else ("attention", "gqa")
    config = PolarConfig(routers=routers, density=density, passes=passes, min_saved_mib=min_saved_mib)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        from .onnx import export_onnx  # ONNX translations of the polar ops (needs onnxscript)

        return export_onnx(model, config=config, batch_size=batch_size, max_cache_len=max_cache_len,
                           prefill_len=prefill_len, path=folder)
    cache_mode = "io" if format == "tensorrt" else "inplace"
    decode_inputs = example_inputs(model, batch_size, max_cache_len, tokens=1)
    prefill_inputs = example_inputs(model, batch_size, max_cache_len, tokens=prefill_len)
    decode, records = export_decode(model, decode_inputs, config, cache_mode)
    prefill = export_prefill(model, prefill_inputs, cache_mode)
    for name, program, inputs in (("decode", decode, decode_inputs), ("prefill", prefill, prefill_inputs)):
        _write_program(format, program, inputs, folder / PROGRAMS[name])
    num_layers = (len(decode_inputs) - len(STEP_INPUTS)) // 2
    write_manifest(folder, manifest_fields(model, format=format, batch_size=batch_size, max_cache_len=max_cache_len,
                                           prefill_len=prefill_len, num_layers=num_layers, cache_mode=cache_mode,
                                           records=records))
    return folder


def _check_sizes(batch_size: Any, max_cache_len: Any, prefill_len: Any) -> None:
    for name, value in (("batch_size", batch_size), ("max_cache_len", max_cache_len), ("prefill_len", prefill_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ExportError(f"{name} must be a positive int, got {value!r}")
    if prefill_len >= max_cache_len:
        raise ExportError(f"prefill_len ({prefill_len}) must be below max_cache_len ({max_cache_len}), leaving "
                          "slots to decode into")


def _write_program(format: str, program: Any, inputs: Sequence[Any], path: Path) -> None:
    from .aoti import compile_aoti
    from .pt2 import save_pt2

    if format == "pt2":
        save_pt2(program, path)
    elif format == "aoti":
        compile_aoti(program, path)
    else:  # tensorrt, optional: imported only when asked for
        from .tensorrt import compile_tensorrt

        compile_tensorrt(program, inputs, path)


_LAZY = {"CacheStep": "decode_step", "Deployment": "artifact", "load": "artifact"}


def __getattr__(name: str) -> Any:
    # the heavy parts (transformers, torch.export) load on first use: `import polar_compile` and the CLI's --help
    # stay light
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """This package, callable as :func:`export`: ``polar_compile.export(model, ...)`` while
    ``polar_compile.export.onnx`` and the other submodules stay reachable as attributes."""

    def __call__(self, model: nn.Module, **kwargs: Any) -> Path:
        return export(model, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

"""ONNX export: the decode step, rewritten by polar's passes, and the dense prefill, as two ONNX models in standard
opset 18 (``decode.onnx``, ``prefill.onnx``).

Both steps are :class:`~polar_compile.export.decode_step.CacheStep` programs in ``cache_mode="io"`` (ONNX has no
in-place ops, and its maintainers recommend cache in, cache out), exported to ``torch.export`` programs by
``program.py`` — the decode step through the same passes and matcher as the backend — then translated by
``torch.onnx.export(..., dynamo=True)`` with the polar ops' translations (``onnx_ops.py``).

    inputs    input_ids [B, T], position_ids [B, T], attention_mask [B, L], cache_position [T],
              key_0, value_0, key_1, ... [B, Hkv, L, D]           (T = 1: decode; T = prefill_len: prefill)
    outputs   logits [B, 1, V], present_key_0, present_value_0, ...  the cache with this step's slots written

The caller feeds each step's ``present_*`` outputs back as the next step's cache inputs (onnxruntime: keep them as
``OrtValue``s, or bind them with IO binding on a GPU, to avoid host copies). Each step writes a new copy of the cache,
as any cache-in/cache-out graph does: at long caches that copy costs more bytes than the sparse attention saves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import PolarConfig
from .artifact import manifest_fields, write_manifest
from .decode_step import STEP_INPUTS, cache_names, example_inputs, input_names
from .errors import ExportError
from .program import export_decode, export_prefill

__all__ = ["ONNX_OPSET", "PROGRAMS", "check_standard_onnx", "export_onnx", "output_names"]

ONNX_OPSET = 18  # torchlib's opset (torch.onnx's translations of ATen ops, torch 2.11-2.13) and onnx_ops.py's
PROGRAMS = {"decode": "decode.onnx", "prefill": "prefill.onnx"}
STANDARD_DOMAINS = ("", "ai.onnx")
MISSING = ("format='onnx' needs the packages onnx and onnxscript (and onnxruntime to run the result): "
           "pip install 'polar-compile[onnx]'")


def output_names(num_layers: int) -> list[str]:
    """The ONNX models' output names, in order: the logits, then the updated cache (``present_`` + input name)."""
    return ["logits", *(f"present_{name}" for name in cache_names(num_layers))]


def export_onnx(model: nn.Module, *, config: PolarConfig, batch_size: int, max_cache_len: int, prefill_len: int,
                path: Path) -> Path:
    """Write ``decode.onnx`` (the polar decode step), ``prefill.onnx`` (dense, ``prefill_len`` tokens a row) and the
    manifest of ``model`` into the folder ``path``, at the static batch ``batch_size`` and cache ``max_cache_len``.

    Raises :class:`ExportError` as :func:`export_decode` does, when onnx or onnxscript is not installed, and when a
    translated graph holds a node outside the standard ONNX domain.
    """
    try:
        from .onnx_ops import TRANSLATIONS
    except ImportError as error:
        raise ExportError(f"{MISSING} ({error})") from error
    decode_inputs = example_inputs(model, batch_size, max_cache_len, tokens=1)
    prefill_inputs = example_inputs(model, batch_size, max_cache_len, tokens=prefill_len)
    num_layers = (len(decode_inputs) - len(STEP_INPUTS)) // 2
    decode, records = export_decode(model, decode_inputs, config, cache_mode="io")
    prefill = export_prefill(model, prefill_inputs, cache_mode="io")
    for name, program in (("decode", decode), ("prefill", prefill)):
        onnx_program = torch.onnx.export(
            program, dynamo=True, custom_translation_table=TRANSLATIONS, opset_version=ONNX_OPSET,
            input_names=input_names(num_layers), output_names=output_names(num_layers), verbose=False)
        check_standard_onnx(onnx_program.model_proto, name)
        onnx_program.save(path / PROGRAMS[name])
    write_manifest(path, {
        **manifest_fields(model, format="onnx", batch_size=batch_size, max_cache_len=max_cache_len,
                          prefill_len=prefill_len, num_layers=num_layers, cache_mode="io", records=records),
        "programs": PROGRAMS, "onnx_opset": ONNX_OPSET, "outputs": output_names(num_layers),
    })
    return path


def check_standard_onnx(model: Any, name: str = "model") -> None:
    """Raise :class:`ExportError` naming the first nodes outside the standard ONNX domain, or any local function,
    of the ONNX ``model`` (a ``ModelProto``): a runtime without polar's ops could not run them."""
    if model.functions:
        raise ExportError(f"{name}: the ONNX graph keeps local functions "
                          f"{sorted({f'{f.domain}::{f.name}' for f in model.functions})}; expected standard ops only")
    custom = [f"{node.domain}::{node.op_type}" for node in _nodes(model.graph)
              if node.domain not in STANDARD_DOMAINS]
    if custom:
        raise ExportError(f"{name}: the ONNX graph has nodes outside the standard domain: {sorted(set(custom))[:5]} "
                          "(an op without a translation in polar_compile/export/onnx_ops.py)")


def _nodes(graph: Any) -> list[Any]:
    """Every node of ``graph`` and of the subgraphs its nodes hold (If / Loop / Scan bodies)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            for subgraph in (attribute.g, *attribute.graphs) if attribute.HasField("g") else attribute.graphs:
                nodes.extend(_nodes(subgraph))
    return nodes

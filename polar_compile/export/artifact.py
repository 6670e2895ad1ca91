"""An export artifact on disk, and :func:`load`, which runs one from Python.

An artifact is a folder:

    polar_export.json   the manifest: format, batch size, cache length, prefill length, layers, the cache's shape
                        and dtype, the inputs' names, how the cache travels, the polar sites of the decode step
    decode.pt2          the decode step, rewritten by polar's passes (one token per sequence)
    prefill.pt2         the dense prefill of ``prefill_len`` tokens per sequence (prompts left-padded to it)

Both programs take the inputs of :class:`~polar_compile.export.decode_step.CacheStep` and, for ``pt2`` and
``aoti``, write into the cache tensors they are given, in place: allocate one cache per batch
(:meth:`Deployment.new_cache`), prefill into it, then decode step after step with the same tensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..passes.records import PassRecord
from .errors import ExportError

__all__ = ["MANIFEST", "Deployment", "load", "manifest_fields", "read_manifest", "write_manifest"]

MANIFEST = "polar_export.json"
FORMAT_VERSION = 1
PROGRAMS = {"decode": "decode.pt2", "prefill": "prefill.pt2"}


def write_manifest(folder: Path, fields: dict[str, Any]) -> None:
    """Write the manifest of the artifact in ``folder`` (the format version and the program files added)."""
    manifest = {"format_version": FORMAT_VERSION, "programs": PROGRAMS, "torch": torch.__version__, **fields}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def manifest_fields(model: nn.Module, *, format: str, batch_size: int, max_cache_len: int, prefill_len: int,
                    num_layers: int, cache_mode: str, records: list[PassRecord]) -> dict[str, Any]:
    """What the manifest says of an export of ``model``: sizes, the cache's shape, dtype and device, the inputs'
    names, how the cache travels and the decode step's sites (``records``: its passes' records)."""
    from ..explain import ExplainReport
    from .decode_step import cache_shape, input_names

    like = next(model.parameters())
    return {
        "format": format, "model_type": model.config.model_type, "batch_size": batch_size,
        "max_cache_len": max_cache_len, "prefill_len": prefill_len, "num_layers": num_layers,
        "cache_shape": list(cache_shape(model, batch_size, max_cache_len)), "dtype": str(like.dtype).split(".")[-1],
        "device": like.device.type, "cache_mode": cache_mode, "inputs": input_names(num_layers),
        "sites": str(ExplainReport([records])).splitlines(),
    }


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of the artifact in ``folder``; :class:`ExportError` when there is none or it is of another
    version."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder}: not a polar-compile export artifact (no {MANIFEST})")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {manifest.get('format_version')!r}, this polar-compile reads "
                          f"{FORMAT_VERSION}")
    return manifest


@dataclass
class Deployment:
    """A loaded artifact: its manifest and its two programs, each called with :class:`CacheStep`'s inputs."""

    manifest: dict[str, Any]
    decode_program: Callable[..., Any]
    prefill_program: Callable[..., Any]

    def new_cache(self, device: str | torch.device | None = None) -> list[Tensor]:
        """A zeroed cache: ``[key_0, value_0, ...]``, each of the manifest's shape and dtype (on its device unless
        ``device`` is given)."""
        shape, dtype = self.manifest["cache_shape"], getattr(torch, self.manifest["dtype"])
        device = device or self.manifest["device"]
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * self.manifest["num_layers"])]

    def prefill(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, cache: Sequence[Tensor]
                ) -> Tensor:
        """Write the prompts ``[B, prefill_len]`` into slots ``0..prefill_len-1`` of ``cache``; the last token's
        logits ``[B, 1, V]``."""
        slots = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.prefill_program(*_contiguous(input_ids, position_ids, attention_mask), slots, *cache)

    def decode(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, slot: int,
               cache: Sequence[Tensor]) -> Tensor:
        """One decode step: ``input_ids [B, 1]`` written at cache slot ``slot``; logits ``[B, 1, V]``."""
        cache_position = torch.tensor([slot], device=input_ids.device)
        return self.decode_program(*_contiguous(input_ids, position_ids, attention_mask), cache_position, *cache)


def load(folder: str | Path) -> Deployment:
    """Load the artifact in ``folder`` (``pt2``, ``aoti`` or ``onnx``) for running from Python; needs ``import
    polar_compile`` only (the ``polar::`` ops register on import), and onnxruntime for ``onnx``.

    An ``onnx`` artifact runs in onnxruntime (its available providers, in its order of preference) behind the same
    in-place interface: each step's returned cache is copied into the given cache tensors, through host memory. A
    server that keeps the cache in onnxruntime (IO binding) saves those copies."""
    manifest = read_manifest(folder)
    loaders = {"pt2": _load_pt2, "aoti": _load_aoti, "onnx": _load_onnx}
    if manifest["format"] not in loaders:
        raise ExportError(f"{folder}: a {manifest['format']!r} artifact; load() runs {sorted(loaders)} (run "
                          "TensorRT engines with torch_tensorrt)")
    load_program = loaders[manifest["format"]]
    decode, prefill = (load_program(Path(folder) / manifest["programs"][name]) for name in ("decode", "prefill"))
    return Deployment(manifest, decode, prefill)


def _contiguous(*tensors: Tensor) -> list[Tensor]:
    # an AOTInductor package reads its inputs with the strides of the export's examples (contiguous) and does not
    # check them: a column slice such as positions[:, t:t + 1] would be read wrongly
    return [tensor.contiguous() for tensor in tensors]


def _load_pt2(path: Path) -> Callable[..., Any]:
    return torch.export.load(path).module()


def _load_aoti(path: Path) -> Callable[..., Any]:
    return torch._inductor.aoti_load_package(str(path))


def _load_onnx(path: Path) -> Callable[..., Any]:
    try:
        import onnxruntime
    except ImportError as error:
        raise ExportError(f"{path}: running an ONNX artifact needs onnxruntime: pip install "
                          "'polar-compile[onnx]'") from error
    session = onnxruntime.InferenceSession(str(path), providers=onnxruntime.get_available_providers())
    names = [given.name for given in session.get_inputs()]

    def run(*inputs: Tensor) -> Tensor:
        feeds = {name: tensor.detach().cpu().numpy() for name, tensor in zip(names, inputs, strict=True)}
        logits, *cache = session.run(None, feeds)
        for given, updated in zip(inputs[len(inputs) - len(cache):], cache, strict=True):
            given.copy_(torch.from_numpy(updated))
        return torch.from_numpy(logits).to(inputs[0].device)

    return run

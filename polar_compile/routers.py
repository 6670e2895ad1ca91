"""RouterBank: the per-layer head routers of one model, on disk as ``routers.safetensors`` + ``polar_config.json``.

A layer's attention router is one Linear ``[units, hidden]`` (+ bias ``[units]``) on the layer's post-norm
hidden state; a unit is a query head (MHA) or a KV group (GQA). Layers without a router stay dense.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = ["FORMAT_VERSION", "ModelShape", "RouterBank", "RouterBankError"]

FORMAT_VERSION = 1
WEIGHTS_FILE = "routers.safetensors"
CONFIG_FILE = "polar_config.json"


class RouterBankError(ValueError):
    """A router bank that is malformed or does not fit the model it is used with."""


@dataclass(frozen=True)
class ModelShape:
    """The model fields a router bank depends on, read from a Hugging Face config."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int

    @property
    def unit_kind(self) -> str:
        """'head' for multi-head attention, 'kv_group' when query heads share KV heads."""
        return "head" if self.num_kv_heads == self.num_heads else "kv_group"

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        """The shape of an HF model (its text config for multimodal models)."""
        config = getattr(model, "config", None)
        if config is None:
            raise RouterBankError(f"{type(model).__name__} has no `.config`; expected a Hugging Face model")
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        heads = config.num_attention_heads
        return cls(
            model_type=str(getattr(config, "model_type", "unknown")),
            num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            num_heads=int(heads),
            num_kv_heads=int(_cached_kv_heads(config, heads)),
        )


def _cached_kv_heads(config: Any, heads: int) -> int:
    """KV heads per layer as the model's attention reads them from the cache."""
    if getattr(config, "new_decoder_architecture", False):
        return heads  # Falcon-40B/180B layout: K/V broadcast to every query head before the cache
    if getattr(config, "multi_query", False):
        return 1  # Falcon-7B layout and GPT-BigCode: one KV head (their configs may still carry num_kv_heads)
    return getattr(config, "num_key_value_heads", None) or heads


@dataclass
class RouterBank:
    """Per-layer attention routers plus the metadata that ties them to one model.

    ``weights[i]`` is ``[units, hidden]`` and ``biases[i]`` is ``[units]`` for each routed layer ``i``;
    ``densities[i]`` is the fraction of units kept in layer ``i`` when the compile options give none.
    """

    shape: ModelShape
    weights: dict[int, Tensor]
    biases: dict[int, Tensor]
    densities: dict[int, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        units, hidden = self.shape.num_kv_heads, self.shape.hidden_size
        if set(self.weights) != set(self.biases):
            raise RouterBankError(
                f"router weights cover layers {sorted(self.weights)} but biases cover {sorted(self.biases)}"
            )
        for layer in sorted(self.weights):
            if not 0 <= layer < self.shape.num_layers:
                raise RouterBankError(f"router for layer {layer}, but the model has {self.shape.num_layers} layers")
            weight, bias = self.weights[layer], self.biases[layer]
            if tuple(weight.shape) != (units, hidden):
                raise RouterBankError(
                    f"layer {layer}: attention router weight has shape {list(weight.shape)}, expected "
                    f"[{units}, {hidden}] ({self.shape.unit_kind}s x hidden_size)"
                )
            if tuple(bias.shape) != (units,):
                raise RouterBankError(
                    f"layer {layer}: attention router bias has shape {list(bias.shape)}, expected [{units}]"
                )
        for layer, density in self.densities.items():
            check_density(density, f"layer {layer} density")

    @property
    def layers(self) -> list[int]:
        """The routed layer indices, ascending."""
        return sorted(self.weights)

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`RouterBankError` naming the first field where ``model`` differs from the bank's."""
        self.check_shape(ModelShape.of(model))

    def check_shape(self, shape: ModelShape) -> None:
        """Raise :class:`RouterBankError` naming the first field where ``shape`` differs from the bank's."""
        for name in ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads"):
            ours, theirs = getattr(self.shape, name), getattr(shape, name)
            if ours != theirs:
                raise RouterBankError(
                    f"router bank does not fit this model: {name} is {ours!r} in the bank, {theirs!r} in the model"
                )

    def save(self, directory: str | Path) -> Path:
        """Write ``routers.safetensors`` and ``polar_config.json`` into ``directory`` (created if missing)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in self.layers:
            tensors[f"layers.{layer}.attn.weight"] = self.weights[layer].detach().float().contiguous().cpu()
            tensors[f"layers.{layer}.attn.bias"] = self.biases[layer].detach().float().contiguous().cpu()
        save_file(tensors, str(directory / WEIGHTS_FILE))
        config = {
            "format_version": FORMAT_VERSION,
            "model": self.shape.__dict__,
            "unit_kind": self.shape.unit_kind,
            "densities": {str(k): v for k, v in sorted(self.densities.items())},
            "provenance": self.provenance,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> RouterBank:
        """Read a bank written by :meth:`save`; raises :class:`RouterBankError` on missing or corrupt files."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise RouterBankError(f"router bank {directory}: missing {path.name}")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise RouterBankError(f"router bank {directory}: {CONFIG_FILE} is not valid JSON ({err})") from err
        version = config.get("format_version") if isinstance(config, dict) else None
        if version != FORMAT_VERSION:
            raise RouterBankError(
                f"router bank {directory}: format_version {version!r}, expected {FORMAT_VERSION}"
            )
        try:
            shape = ModelShape(**config["model"])
        except (KeyError, TypeError) as err:
            raise RouterBankError(f"router bank {directory}: {CONFIG_FILE} has no valid 'model' section ({err})") from err
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError) as err:
            raise RouterBankError(
                f"router bank {directory}: {WEIGHTS_FILE} is truncated or corrupt ({err})"
            ) from err
        weights, biases = {}, {}
        for name, tensor in tensors.items():
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] != "attn":
                raise RouterBankError(f"router bank {directory}: unexpected tensor {name!r} in {WEIGHTS_FILE}")
            (weights if parts[3] == "weight" else biases)[int(parts[1])] = tensor
        densities = {int(k): float(v) for k, v in config.get("densities", {}).items()}
        return cls(shape, weights, biases, densities, config.get("provenance", {}))


def check_density(density: Any, what: str = "density") -> float:
    """``density`` as a float, or ``ValueError`` unless it lies in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {density!r}")
    return float(density)


def kept_units(density: float, units: int) -> int:
    """How many of ``units`` a layer keeps at ``density``: ``max(1, round(density * units))``."""
    return max(1, min(units, round(density * units)))


def router_from_linear(linear: nn.Linear) -> tuple[Tensor, Tensor]:
    """The (weight, bias) pair of a trained ``nn.Linear`` router, detached, fp32, on the CPU."""
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
    return linear.weight.detach().float().cpu(), bias.detach().float().cpu()

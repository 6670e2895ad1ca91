"""RouterBank: the per-layer routers of one model, on disk as ``routers.safetensors`` + ``polar_config.json``.

A layer's attention router is one Linear ``[units, hidden]`` (+ bias ``[units]``) on the layer's post-norm
hidden state; a unit is a query head (MHA) or a KV group (GQA). MLP routers (low-rank, with a per-batch-size k
table) live in ``mlp_routers.py``. Layers without a router stay dense.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .bank_format import (
    CONFIG_FILE,
    FORMAT_VERSION,
    MODEL_FIELDS,
    WEIGHTS_FILE,
    RouterBankError,
    check_finite,
    check_model_fields,
    describe,
    is_density,
    is_int,
    is_number,
    read_config,
    read_tensors,
    unit_kind,
)
from .mlp_routers import MlpRouters, mlp_width

__all__ = ["FORMAT_VERSION", "ModelShape", "RouterBank", "RouterBankError"]


@dataclass(frozen=True)
class ModelShape:
    """The model fields a router bank depends on, read from a Hugging Face config (the decoder's, for
    encoder-decoder models: the routers serve the decoder's self-attention).

    Raises :class:`RouterBankError` unless ``model_type`` is a non-empty str and the counts are positive ints with
    ``num_heads`` a multiple of ``num_kv_heads``.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        check_model_fields(self.__dict__, prefix="ModelShape.")

    @property
    def unit_kind(self) -> str:
        """'head' for multi-head attention, 'kv_group' when query heads share KV heads."""
        return unit_kind(self.num_heads, self.num_kv_heads)

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        """The shape of an HF model: its text config for multimodal models, its decoder's for encoder-decoders.

        Raises :class:`RouterBankError` when the config lacks a field, e.g. attention heads (state-space models).
        """
        config = getattr(model, "config", None)
        if config is None:
            raise RouterBankError(f"{type(model).__name__} has no `.config`; expected a Hugging Face model")
        section = _decoder_config(config, model)
        model_type = str(getattr(section, "model_type", None) or getattr(config, "model_type", None) or "unknown")
        owner = f"{type(model).__name__} (model_type {model_type!r}, config {type(section).__name__})"
        flat_encoder_decoder = bool(getattr(section, "is_encoder_decoder", False))
        # T5's family and ProphetNet keep the decoder's depth (and ProphetNet its heads) under names that
        # get_text_config(decoder=True) does not map; BART, Marian, Whisper, ... it maps
        layer_names = ("num_decoder_layers", "num_hidden_layers") if flat_encoder_decoder else ("num_hidden_layers",)
        head_names = (
            ("num_decoder_attention_heads", "num_attention_heads") if flat_encoder_decoder else ("num_attention_heads",)
        )
        heads = _config_field(section, head_names, owner, "attention heads", " (a model without self-attention, "
                              "e.g. a state-space model such as Mamba, has no heads to route)")
        fields = dict(
            model_type=model_type,
            num_layers=_config_field(section, layer_names, owner, "layer count"),
            hidden_size=_config_field(section, ("hidden_size",), owner, "hidden size"),
            num_heads=heads,
            num_kv_heads=_cached_kv_heads(section, heads),
        )
        check_model_fields(fields, f"{owner}: ")
        return cls(**fields)


def _decoder_config(config: Any, model: nn.Module) -> Any:
    """The config section of the text decoder (``config`` itself for plain decoder-only models)."""
    if not hasattr(config, "get_text_config"):
        return config
    try:
        return config.get_text_config(decoder=True)
    except ValueError as err:  # several candidate text configs
        raise RouterBankError(f"{type(model).__name__}: cannot tell which config is the text decoder's ({err})") from err


def _config_field(config: Any, names: tuple[str, ...], owner: str, what: str, why: str = "") -> Any:
    """The first of ``names`` that ``config`` sets (not ``None``); :class:`RouterBankError` naming them if none."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            if not is_int(value) or value < 1:
                raise RouterBankError(f"{owner}: config.{name} must be a positive int, got {describe(value)}")
            return int(value)
    looked = " or ".join(repr(name) for name in names)
    raise RouterBankError(f"{owner} has no {what} in its config: looked for {looked}{why}")


def _cached_kv_heads(config: Any, heads: int) -> int:
    """KV heads per layer as the model's attention reads them from the cache."""
    if getattr(config, "new_decoder_architecture", False):
        return heads  # Falcon-40B/180B layout: K/V broadcast to every query head before the cache
    if getattr(config, "multi_query", False):
        return 1  # Falcon-7B layout and GPT-BigCode: one KV head (their configs may still carry num_kv_heads)
    return getattr(config, "num_key_value_heads", None) or heads


@dataclass(eq=False)
class RouterBank:
    """Per-layer attention routers, optional MLP routers, and the metadata that ties them to one model.

    ``weights[i]`` is ``[units, hidden]`` and ``biases[i]`` is ``[units]`` for each routed layer ``i``, floating
    point and finite; ``densities[i]`` is the fraction of units kept in layer ``i`` when the compile options give
    none; ``mlp`` holds the MLP routers (:class:`MlpRouters`), if any (a bank may have MLP routers only). Banks
    compare by identity (Dynamo compares compile options; tensors have no single truth value), so a bank is a value:
    a graph compiled with it keeps what it held; build a new bank rather than changing one in place.
    Construction raises :class:`RouterBankError` naming the first malformed entry.
    """

    shape: ModelShape
    weights: dict[int, Tensor]
    biases: dict[int, Tensor]
    densities: dict[int, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    mlp: MlpRouters | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.shape, ModelShape):
            raise RouterBankError(f"RouterBank.shape must be a ModelShape, got {describe(self.shape)}")
        for name, kind in (("weights", "weight"), ("biases", "bias")):
            _check_tensors(getattr(self, name), name, kind)
        if set(self.weights) != set(self.biases):
            raise RouterBankError(
                f"router weights cover layers {sorted(self.weights)} but biases cover {sorted(self.biases)}"
            )
        units, hidden = self.shape.num_kv_heads, self.shape.hidden_size
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
            check_finite(f"layer {layer}: attention router", (("weight", weight), ("bias", bias)))
        self.densities = self._checked_densities()
        if not isinstance(self.provenance, Mapping):
            raise RouterBankError(f"RouterBank.provenance must be a dict, got {describe(self.provenance)}")
        if self.mlp is not None:
            if not isinstance(self.mlp, MlpRouters):
                raise RouterBankError(f"RouterBank.mlp must be MlpRouters or None, got {describe(self.mlp)}")
            self.mlp.check(self.shape.num_layers, self.shape.hidden_size)

    def _checked_densities(self) -> dict[int, float]:
        if not isinstance(self.densities, Mapping):
            raise RouterBankError(
                f"RouterBank.densities must be a dict of layer index -> density, got {describe(self.densities)}"
            )
        checked = {}
        for layer, density in self.densities.items():
            if not is_int(layer) or not 0 <= layer < self.shape.num_layers:
                raise RouterBankError(
                    f"RouterBank.densities key {layer!r} must be a layer index of the model (an int in "
                    f"0..{self.shape.num_layers - 1}), got {describe(layer)}"
                )
            if not is_density(density):
                raise RouterBankError(f"layer {layer} density must be a number in (0, 1], got {describe(density)}")
            checked[int(layer)] = float(density)
        return checked

    @property
    def layers(self) -> list[int]:
        """The layers with attention routers, ascending (``mlp.layers`` has those with MLP routers)."""
        return sorted(self.weights)

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`RouterBankError` naming the first field where ``model`` differs from the bank's (with MLP
        routers, also the MLP width when the model's config names one: :func:`mlp_width`)."""
        self.check_shape(ModelShape.of(model))
        width = mlp_width(model) if self.mlp is not None else None
        if width is not None and width != self.mlp.ffn_size:
            raise RouterBankError(
                f"router bank does not fit this model: MLP width (ffn) is {self.mlp.ffn_size} in the bank, {width} in "
                "the model"
            )

    def check_shape(self, shape: ModelShape) -> None:
        """Raise :class:`RouterBankError` naming the first field where ``shape`` differs from the bank's."""
        for name in MODEL_FIELDS:
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
        config = {
            "format_version": FORMAT_VERSION,
            "model": dict(self.shape.__dict__),
            "unit_kind": self.shape.unit_kind,
            "densities": {str(k): v for k, v in sorted(self.densities.items())},
        }
        if self.mlp is not None:
            for layer in self.mlp.layers:
                tensors[f"layers.{layer}.mlp.in.weight"] = self.mlp.w_in[layer].detach().float().contiguous().cpu()
                tensors[f"layers.{layer}.mlp.out.weight"] = self.mlp.w_out[layer].detach().float().contiguous().cpu()
            topk = {str(size): list(row) for size, row in sorted(self.mlp.topk.items())}
            config["mlp"] = {"rank": self.mlp.rank, "topk": topk}
        config["provenance"] = self.provenance
        save_file(tensors, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> RouterBank:
        """Read a bank written by :meth:`save`.

        Raises :class:`RouterBankError` naming the file, the field, the expected and the actual on a missing,
        corrupt or malformed file, e.g. ``polar_config.json: model.num_layers must be a positive int, got str '4'``.
        """
        directory = Path(directory)
        where = f"router bank {directory}"
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise RouterBankError(f"{where}: missing {path.name}")
        config = read_config(config_path, where)
        shape = ModelShape(**config.model)
        tensors = read_tensors(weights_path, where)
        try:
            cls(shape, tensors.weights, tensors.biases)  # the tensors alone: what fails here is about the tensor file
        except RouterBankError as err:
            raise RouterBankError(f"{where}: {WEIGHTS_FILE}: {err}") from None
        mlp = _load_mlp(config.mlp, tensors.mlp_in, tensors.mlp_out, shape, where)
        return cls(shape, tensors.weights, tensors.biases, config.densities, config.provenance, mlp)


def _load_mlp(section: dict[str, Any] | None, w_in: dict[int, Tensor], w_out: dict[int, Tensor], shape: ModelShape,
              where: str) -> MlpRouters | None:
    """The MLP routers from the ``mlp`` section and tensors of a bank's files; errors name the file at fault."""
    if section is None and not (w_in or w_out):
        return None
    if section is None:
        raise RouterBankError(
            f"{where}: {WEIGHTS_FILE} holds MLP router tensors (layers {sorted({*w_in, *w_out})}) but {CONFIG_FILE} "
            'has no mlp section; expected "mlp": {"rank": r, "topk": {"<batch size>": [k or null per layer]}}'
        )
    if not (w_in or w_out):
        raise RouterBankError(
            f"{where}: {CONFIG_FILE} has an mlp section (rank {section['rank']}) but {WEIGHTS_FILE} holds no MLP "
            "router tensors (layers.{i}.mlp.in.weight, layers.{i}.mlp.out.weight)"
        )
    ranks = {layer: tensor.shape[0] for layer, tensor in sorted(w_in.items()) if tensor.dim() == 2}
    # the tensors' own rank: the JSON's when some tensor has it (so that the odd tensor out is named), else the first's
    rank = section["rank"] if section["rank"] in ranks.values() or not ranks else next(iter(ranks.values()))
    first = min(w_in) if w_in else None
    try:  # the tensors alone, at their own rank: what fails here is about the tensor file
        MlpRouters(rank, w_in, w_out, {}).check(shape.num_layers, shape.hidden_size)
    except RouterBankError as err:
        raise RouterBankError(f"{where}: {WEIGHTS_FILE}: {err}") from None
    if rank != section["rank"]:
        raise RouterBankError(
            f"{where}: {CONFIG_FILE}: mlp.rank is {section['rank']}, but the MLP routers in {WEIGHTS_FILE} have rank "
            f"{rank} (layers.{first}.mlp.in.weight has shape {list(w_in[first].shape)})"
        )
    mlp = MlpRouters(rank, w_in, w_out, section["topk"])
    try:
        mlp.check(shape.num_layers, shape.hidden_size)
    except RouterBankError as err:
        raise RouterBankError(f"{where}: {CONFIG_FILE}: {err}") from None
    return mlp


def _check_tensors(tensors: Any, name: str, kind: str) -> None:
    """Raise :class:`RouterBankError` unless ``tensors`` maps int layer indices to floating-point tensors."""
    if not isinstance(tensors, Mapping):
        raise RouterBankError(f"RouterBank.{name} must be a dict of layer index -> Tensor, got {describe(tensors)}")
    for layer, tensor in tensors.items():
        if not is_int(layer):
            raise RouterBankError(f"RouterBank.{name} keys must be int layer indices, got {describe(layer)}")
        if not isinstance(tensor, Tensor):
            raise RouterBankError(f"layer {layer}: attention router {kind} must be a torch.Tensor, got {describe(tensor)}")
        if not tensor.is_floating_point():
            raise RouterBankError(f"layer {layer}: attention router {kind} must have a floating dtype, got {tensor.dtype}")


def check_density(density: Any, what: str = "density") -> float:
    """``density`` as a float, or ``ValueError`` naming ``what`` unless it is a number (not a bool) in (0, 1]."""
    if not is_density(density):
        shown = repr(density) if is_number(density) else describe(density)
        raise ValueError(f"{what} must be a number in (0, 1], got {shown}")
    return float(density)


def kept_units(density: float, units: int) -> int:
    """How many of ``units`` a layer keeps at ``density``: ``max(1, round(density * units))``."""
    return max(1, min(units, round(density * units)))


def router_from_linear(linear: nn.Linear) -> tuple[Tensor, Tensor]:
    """The (weight, bias) pair of a trained ``nn.Linear`` router, detached, fp32, on the CPU."""
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
    return linear.weight.detach().float().cpu(), bias.detach().float().cpu()

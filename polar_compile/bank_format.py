"""The on-disk format of a router bank: the typed checks of ``polar_config.json`` and ``routers.safetensors``.

Every check names the file, the field, what it expects and what it found, e.g.
``polar_config.json: model.num_layers must be a positive int, got str '4'``.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

__all__ = [
    "CONFIG_FILE", "FORMAT_VERSION", "MODEL_FIELDS", "WEIGHTS_FILE",
    "BankConfig", "BankTensors", "RouterBankError",
    "check_finite", "check_model_fields", "describe", "finite_problem", "is_density", "is_int", "is_number", "read_config", "read_tensors", "unit_kind",
]

FORMAT_VERSION = 1
WEIGHTS_FILE = "routers.safetensors"
CONFIG_FILE = "polar_config.json"
MODEL_FIELDS = ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads")
TOP_LEVEL_FIELDS = ("format_version", "model", "unit_kind", "densities", "mlp", "provenance")
MLP_FIELDS = ("rank", "topk")
_TENSOR = re.compile(r"layers\.(0|[1-9][0-9]*)\.(attn\.weight|attn\.bias|mlp\.in\.weight|mlp\.out\.weight)")
TENSOR_NAMES = ("attn.weight", "attn.bias", "mlp.in.weight", "mlp.out.weight")  # each as layers.{i}.<name>


class RouterBankError(ValueError):
    """A router bank that is malformed or does not fit the model it is used with."""


class BankConfig(NamedTuple):
    """The checked contents of ``polar_config.json``."""

    model: dict[str, Any]
    densities: dict[int, float]
    provenance: dict[str, Any]
    mlp: dict[str, Any] | None = None  # {"rank": int, "topk": {batch size: tuple of k or None per layer}}


class BankTensors(NamedTuple):
    """The tensors of ``routers.safetensors``, per kind, each a dict of layer index -> tensor."""

    weights: dict[int, Tensor]  # layers.{i}.attn.weight
    biases: dict[int, Tensor]  # layers.{i}.attn.bias
    mlp_in: dict[int, Tensor]  # layers.{i}.mlp.in.weight
    mlp_out: dict[int, Tensor]  # layers.{i}.mlp.out.weight


def describe(value: Any, limit: int = 80) -> str:
    """``value``'s type name and repr (shortened past ``limit`` characters), as error messages show it."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_density(value: Any) -> bool:
    """Whether ``value`` is a number (not a bool) in (0, 1]."""
    return is_number(value) and 0.0 < float(value) <= 1.0


def unit_kind(num_heads: int, num_kv_heads: int) -> str:
    """'head' for multi-head attention, 'kv_group' when query heads share KV heads."""
    return "head" if num_kv_heads == num_heads else "kv_group"


def check_model_fields(fields: Mapping[str, Any], where: str = "", prefix: str = "") -> None:
    """Raise :class:`RouterBankError` unless ``fields`` are a valid model shape.

    Messages start with ``where`` and name each field as ``prefix + name``.
    """
    model_type = fields["model_type"]
    if not isinstance(model_type, str) or not model_type:
        raise RouterBankError(f"{where}{prefix}model_type must be a non-empty str, got {describe(model_type)}")
    for name in MODEL_FIELDS[1:]:
        if not is_int(fields[name]) or fields[name] < 1:
            raise RouterBankError(f"{where}{prefix}{name} must be a positive int, got {describe(fields[name])}")
    heads, kv_heads = fields["num_heads"], fields["num_kv_heads"]
    if heads % kv_heads:
        raise RouterBankError(
            f"{where}{prefix}num_heads must be a multiple of {prefix}num_kv_heads, got num_heads {heads} and "
            f"num_kv_heads {kv_heads}"
        )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise RouterBankError(f"duplicate key(s) {duplicates} in one JSON object")
    return dict(pairs)


def read_config(path: Path, where: str) -> BankConfig:
    """Parse and type-check ``polar_config.json`` at ``path``; errors start with ``where``."""
    try:
        config = json.loads(path.read_text(), object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise RouterBankError(f"{where}: {CONFIG_FILE} is not valid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise RouterBankError(f"{where}: {CONFIG_FILE} is not valid JSON (not UTF-8 text: {err})") from err
    except OSError as err:
        raise RouterBankError(f"{where}: {CONFIG_FILE} cannot be read ({err})") from err
    except RouterBankError as err:
        raise RouterBankError(f"{where}: {CONFIG_FILE}: {err}") from None
    where = f"{where}: {CONFIG_FILE}: "
    if not isinstance(config, dict):
        raise RouterBankError(f"{where}the top level must be a JSON object, got {describe(config)}")
    unknown = sorted(set(config) - set(TOP_LEVEL_FIELDS))
    if unknown:
        raise RouterBankError(f"{where}unknown field(s) {unknown}; the fields are {list(TOP_LEVEL_FIELDS)}")

    version = config.get("format_version")
    if "format_version" not in config:
        raise RouterBankError(f"{where}format_version is missing; expected the int {FORMAT_VERSION}")
    if not is_int(version) or version != FORMAT_VERSION:
        raise RouterBankError(
            f"{where}format_version must be the int {FORMAT_VERSION} (the format this version of polar_compile "
            f"reads), got {describe(version)}"
        )

    if "model" not in config:
        raise RouterBankError(f"{where}model is missing; expected a JSON object with fields {list(MODEL_FIELDS)}")
    model = config["model"]
    if not isinstance(model, dict):
        raise RouterBankError(
            f"{where}model must be a JSON object with fields {list(MODEL_FIELDS)}, got {describe(model)}"
        )
    unknown = sorted(set(model) - set(MODEL_FIELDS))
    if unknown:
        raise RouterBankError(f"{where}model has unknown field(s) {unknown}; the fields are {list(MODEL_FIELDS)}")
    missing = [name for name in MODEL_FIELDS if name not in model]
    if missing:
        raise RouterBankError(f"{where}model is missing field(s) {missing}; the fields are {list(MODEL_FIELDS)}")
    check_model_fields(model, where, "model.")

    if "unit_kind" in config:
        expected = unit_kind(model["num_heads"], model["num_kv_heads"])
        if not isinstance(config["unit_kind"], str) or config["unit_kind"] != expected:
            raise RouterBankError(
                f"{where}unit_kind must be {expected!r} (model.num_heads {model['num_heads']}, model.num_kv_heads "
                f"{model['num_kv_heads']}), got {describe(config['unit_kind'])}"
            )

    densities = _read_densities(config.get("densities", {}), model["num_layers"], where)
    provenance = config.get("provenance", {})
    if not isinstance(provenance, dict):
        raise RouterBankError(f"{where}provenance must be a JSON object, got {describe(provenance)}")
    mlp = _read_mlp(config["mlp"], model["num_layers"], where) if "mlp" in config else None
    return BankConfig(dict(model), densities, provenance, mlp)


def _int_key(key: str, default: int) -> int:
    """A JSON object key of decimal digits as an int, else ``default``."""
    return int(key) if key.isascii() and key.isdigit() else default


def _read_densities(raw: Any, num_layers: int, where: str) -> dict[int, float]:
    if not isinstance(raw, dict):
        raise RouterBankError(
            f"{where}densities must be a JSON object mapping layer indices (\"0\"..\"{num_layers - 1}\") to "
            f"numbers in (0, 1], got {describe(raw)}"
        )
    densities = {}
    for key, value in raw.items():
        layer = _int_key(key, -1)
        if str(layer) != key or not 0 <= layer < num_layers:
            raise RouterBankError(
                f"{where}densities key {key!r} is not a layer index of the model: expected \"0\"..\"{num_layers - 1}\" "
                f"(model.num_layers is {num_layers})"
            )
        if not is_density(value):
            raise RouterBankError(f"{where}densities[{key!r}] must be a number in (0, 1], got {describe(value)}")
        densities[layer] = float(value)
    return densities


def _read_mlp(raw: Any, num_layers: int, where: str) -> dict[str, Any]:
    """The ``mlp`` section's rank and table, type-checked (k's upper bound, ffn, comes from the tensors)."""
    if not isinstance(raw, dict):
        raise RouterBankError(f"{where}mlp must be a JSON object with fields {list(MLP_FIELDS)}, got {describe(raw)}")
    unknown = sorted(set(raw) - set(MLP_FIELDS))
    if unknown:
        raise RouterBankError(f"{where}mlp has unknown field(s) {unknown}; the fields are {list(MLP_FIELDS)}")
    missing = [name for name in MLP_FIELDS if name not in raw]
    if missing:
        raise RouterBankError(f"{where}mlp is missing field(s) {missing}; the fields are {list(MLP_FIELDS)}")
    if not is_int(raw["rank"]) or raw["rank"] < 1:
        raise RouterBankError(f"{where}mlp.rank must be a positive int, got {describe(raw['rank'])}")
    table = raw["topk"]
    if not isinstance(table, dict):
        raise RouterBankError(
            f"{where}mlp.topk must be a JSON object mapping batch sizes (\"1\", \"16\", ...) to lists of k or null per "
            f"layer, got {describe(table)}"
        )
    topk = {}
    for key, row in table.items():
        size = _int_key(key, 0)
        if str(size) != key or size < 1:
            raise RouterBankError(
                f"{where}mlp.topk key {key!r} is not a batch size: expected a positive int without leading zeros, "
                f"e.g. \"16\""
            )
        if not isinstance(row, list):
            raise RouterBankError(
                f"{where}mlp.topk[{key!r}] must be a list of k (a positive int) or null per layer, got {describe(row)}"
            )
        if len(row) != num_layers:
            raise RouterBankError(
                f"{where}mlp.topk[{key!r}] has {len(row)} entries, expected {num_layers} (model.num_layers)"
            )
        for layer, k in enumerate(row):
            if k is not None and (not is_int(k) or k < 1):
                raise RouterBankError(
                    f"{where}mlp.topk[{key!r}][{layer}] must be null (dense) or a positive int, got {describe(k)}"
                )
        topk[size] = tuple(row)
    return {"rank": int(raw["rank"]), "topk": topk}


def read_tensors(path: Path, where: str) -> BankTensors:
    """The router tensors per kind and layer in ``routers.safetensors`` at ``path``; errors start with ``where``."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise RouterBankError(f"{where}: {WEIGHTS_FILE} is truncated or corrupt ({err})") from err
    where = f"{where}: {WEIGHTS_FILE}: "
    kinds: dict[str, dict[int, Tensor]] = {kind: {} for kind in TENSOR_NAMES}
    for name in sorted(tensors):
        tensor = tensors[name]
        match = _TENSOR.fullmatch(name)
        if match is None:
            names = ", ".join(f"layers.{{i}}.{kind}" for kind in TENSOR_NAMES)
            raise RouterBankError(f"{where}unexpected tensor {name!r}; the tensors are named {names}")
        if not tensor.is_floating_point():
            raise RouterBankError(f"{where}tensor {name!r} must have a floating dtype, got {tensor.dtype}")
        kinds[match[2]][int(match[1])] = tensor
    return BankTensors(*kinds.values())


def check_finite(owner: str, tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Raise :class:`RouterBankError` naming ``owner`` and the tensor (``(name, tensor)`` pairs) holding NaN or inf."""
    for name, tensor in tensors:
        problem = finite_problem(tensor)
        if problem:
            raise RouterBankError(f"{owner} {name} has {problem}; router weights must be finite")


def finite_problem(tensor: Tensor) -> str | None:
    """How many NaN and inf values ``tensor`` holds, as words, or ``None`` when all are finite (or on meta)."""
    if tensor.is_meta or not tensor.is_floating_point():
        return None
    nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
    if not nan and not inf:
        return None
    return " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n) + " value(s)"


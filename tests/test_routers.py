"""RouterBank on disk, and its checks against models and files."""

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from polar_compile import RouterBank, RouterBankError
from polar_compile.routers import ModelShape
from polar_compile.testing import random_routers
from tests.budget import examples
from tests.models import FAMILIES, MHA_FAMILIES, MULTI_QUERY_FAMILIES, DecodeDriver, TinySpec, tiny_model

DELETE = object()  # a corruption that removes the field
SHAPE = ModelShape("llama", 3, 16, 4, 2)  # the bank every corruption starts from: layers 1 and 2 routed


def small_bank(seed: int = 0) -> RouterBank:
    generator = torch.Generator().manual_seed(seed)
    return RouterBank(SHAPE, {i: torch.randn(2, 16, generator=generator) for i in (1, 2)},
                      {i: torch.randn(2, generator=generator) for i in (1, 2)},
                      densities={1: 0.5}, provenance={"seed": seed})


def edit_config(directory: Path, path: str, value: object) -> None:
    """Set (or, with DELETE, remove) the field at dotted ``path`` of the bank's polar_config.json."""
    file = directory / "polar_config.json"
    config = json.loads(file.read_text())
    *parents, name = path.split(".")
    section = config
    for parent in parents:
        section = section[parent]
    if value is DELETE:
        del section[name]
    else:
        section[name] = value
    file.write_text(json.dumps(config))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=6,
)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()


@settings(max_examples=examples(25))
@given(kv_heads=st.integers(1, 4), group=st.integers(1, 3), hidden=st.integers(1, 48), layers=st.integers(1, 5),
       seed=st.integers(0, 999), data=st.data())
def test_random_valid_banks_round_trip_exactly(tmp_path_factory, kv_heads, group, hidden, layers, seed, data):
    shape = ModelShape(data.draw(st.sampled_from(["llama", "opt", "qwen2"])), layers, hidden, kv_heads * group, kv_heads)
    routed = data.draw(st.sets(st.integers(0, layers - 1)))
    densities = data.draw(st.dictionaries(st.integers(0, layers - 1), st.floats(0, 1, exclude_min=True)))
    provenance = data.draw(st.dictionaries(st.text(max_size=5), json_values, max_size=4))
    generator = torch.Generator().manual_seed(seed)
    bank = RouterBank(shape, {i: torch.randn(kv_heads, hidden, generator=generator) for i in routed},
                      {i: torch.randn(kv_heads, generator=generator) for i in routed}, densities, provenance)
    loaded = RouterBank.load(bank.save(tmp_path_factory.mktemp("bank")))
    assert loaded.shape == shape and loaded.layers == sorted(routed)
    assert loaded.densities == densities and loaded.provenance == provenance
    for i in routed:
        assert torch.equal(loaded.weights[i], bank.weights[i]) and torch.equal(loaded.biases[i], bank.biases[i])


def test_banks_compare_by_identity():
    bank, twin = small_bank(), small_bank()
    assert bank == bank and bank != twin and bank is not twin  # no tensor comparison: Dynamo compares options
    assert len({bank, twin}) == 2


# (field, corrupt value, what the error must say after "polar_config.json: ")
CORRUPTIONS = [
    ("format_version", DELETE, r"format_version is missing; expected the int 1"),
    ("format_version", 99, r"format_version must be the int 1 \(the format .*\), got int 99"),
    ("format_version", "1", r"format_version must be the int 1 .*, got str '1'"),
    ("format_version", True, r"format_version must be the int 1 .*, got bool True"),
    ("format_version", 1.0, r"format_version must be the int 1 .*, got float 1\.0"),
    ("model", DELETE, r"model is missing; expected a JSON object with fields \['model_type', 'num_layers', "),
    ("model", [3, 16], r"model must be a JSON object with fields \['model_type', .*\], got list \[3, 16\]"),
    ("model.extra", 1, r"model has unknown field\(s\) \['extra'\]; the fields are \['model_type', 'num_layers'"),
    ("model.num_heads", DELETE, r"model is missing field\(s\) \['num_heads'\]; the fields are \['model_type'"),
    ("model.model_type", 3, r"model\.model_type must be a non-empty str, got int 3"),
    ("model.model_type", "", r"model\.model_type must be a non-empty str, got str ''"),
    ("model.num_layers", "4", r"model\.num_layers must be a positive int, got str '4'"),
    ("model.num_layers", True, r"model\.num_layers must be a positive int, got bool True"),
    ("model.num_layers", 0, r"model\.num_layers must be a positive int, got int 0"),
    ("model.hidden_size", 16.0, r"model\.hidden_size must be a positive int, got float 16\.0"),
    ("model.num_heads", None, r"model\.num_heads must be a positive int, got NoneType None"),
    ("model.num_kv_heads", "2", r"model\.num_kv_heads must be a positive int, got str '2'"),
    ("model.num_kv_heads", 3, r"model\.num_heads must be a multiple of model\.num_kv_heads, got num_heads 4 and "
                              r"num_kv_heads 3"),
    ("unit_kind", "head", r"unit_kind must be 'kv_group' \(model\.num_heads 4, model\.num_kv_heads 2\), got str 'head'"),
    ("unit_kind", 1, r"unit_kind must be 'kv_group' .*, got int 1"),
    ("densities", [0.5, 0.5], r"densities must be a JSON object mapping layer indices \(\"0\"..\"2\"\) to numbers in "
                              r"\(0, 1\], got list \[0\.5, 0\.5\]"),
    ("densities", {"1": "half"}, r"densities\['1'\] must be a number in \(0, 1\], got str 'half'"),
    ("densities", {"1": 0}, r"densities\['1'\] must be a number in \(0, 1\], got int 0"),
    ("densities", {"1": 1.5}, r"densities\['1'\] must be a number in \(0, 1\], got float 1\.5"),
    ("densities", {"1": True}, r"densities\['1'\] must be a number in \(0, 1\], got bool True"),
    ("densities", {"1": None}, r"densities\['1'\] must be a number in \(0, 1\], got NoneType None"),
    ("densities", {"3": 0.5}, r"densities key '3' is not a layer index of the model: expected \"0\"..\"2\" "
                              r"\(model\.num_layers is 3\)"),
    ("densities", {"-1": 0.5}, r"densities key '-1' is not a layer index of the model"),
    ("densities", {"01": 0.5}, r"densities key '01' is not a layer index of the model"),
    ("densities", {"first": 0.5}, r"densities key 'first' is not a layer index of the model"),
    ("provenance", ["calibrated"], r"provenance must be a JSON object, got list \['calibrated'\]"),
    ("density", 0.5, r"unknown field\(s\) \['density'\]; the fields are \['format_version', 'model', 'unit_kind', "
                     r"'densities', 'mlp', 'provenance'\]"),
    # the MLP section's own checks are in test_mlp_bank.py
    ("mlp", {"rank": 8}, r"mlp is missing field\(s\) \['topk'\]; the fields are \['rank', 'topk'\]"),
]


@pytest.mark.parametrize(("field", "value", "message"), CORRUPTIONS,
                         ids=[f"{field}={value if value is not DELETE else 'deleted'}" for field, value, _ in CORRUPTIONS])
def test_each_malformed_config_field_is_named(tmp_path, field, value, message):
    directory = small_bank().save(tmp_path / "bank")
    edit_config(directory, field, value)
    with pytest.raises(RouterBankError, match=rf"^router bank {re.escape(str(directory))}: polar_config\.json: {message}"):
        RouterBank.load(directory)


def valid(field: str, value: object) -> bool:
    """Whether ``value`` is an acceptable value of ``field`` for the SHAPE bank."""
    if field in ("model.num_layers", "model.hidden_size", "model.num_heads", "model.num_kv_heads"):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return {
        "format_version": lambda: type(value) is int and value == 1,
        "model.model_type": lambda: isinstance(value, str) and value != "",
        "unit_kind": lambda: value == "kv_group",
        "provenance": lambda: isinstance(value, dict),
        "densities": lambda: isinstance(value, dict) and all(
            k in ("0", "1", "2") and type(v) in (int, float) and 0 < v <= 1 for k, v in value.items()),
    }[field]()


@settings(max_examples=examples(60))
@given(field=st.sampled_from(["format_version", "model.model_type", "model.num_layers", "model.hidden_size",
                              "model.num_heads", "model.num_kv_heads", "unit_kind", "densities", "provenance"]),
       value=json_values | json_scalars | st.dictionaries(st.text(max_size=2), json_scalars, max_size=2))
def test_random_corruption_of_one_field_is_rejected_naming_it(tmp_path_factory, field, value):
    assume(not valid(field, value))
    directory = small_bank().save(tmp_path_factory.mktemp("bank"))
    edit_config(directory, field, value)
    with pytest.raises(RouterBankError, match=r"polar_config\.json: ") as raised:
        RouterBank.load(directory)
    assert field in str(raised.value)
    if field != "densities" and not isinstance(value, (list, dict)):
        assert f", got {type(value).__name__} " in str(raised.value)


def test_config_that_is_not_an_object_or_has_duplicate_keys(tmp_path):
    directory = small_bank().save(tmp_path / "bank")
    config = directory / "polar_config.json"
    config.write_text("[1, 2]")
    with pytest.raises(RouterBankError, match=r"polar_config\.json: the top level must be a JSON object, got list \[1, 2\]"):
        RouterBank.load(directory)
    config.write_text('{"format_version": 1, "format_version": 2}')
    with pytest.raises(RouterBankError, match=r"polar_config\.json: duplicate key\(s\) \['format_version'\]"):
        RouterBank.load(directory)


def test_a_shape_that_disagrees_with_the_tensors_names_both(tmp_path):
    # a string num_kv_heads used to read "has shape [2, 16], expected [2, 16]"; a wrong int names the tensor file
    directory = small_bank().save(tmp_path / "bank")
    edit_config(directory, "unit_kind", DELETE)
    edit_config(directory, "model.num_kv_heads", 4)
    with pytest.raises(RouterBankError, match=r"routers\.safetensors: layer 1: attention router weight has shape "
                                              r"\[2, 16\], expected \[4, 16\] \(heads x hidden_size\)"):
        RouterBank.load(directory)


@pytest.mark.parametrize(("tensors", "message"), [
    ({"layers.1.attn.scale": torch.zeros(2)},
     r"unexpected tensor 'layers\.1\.attn\.scale'; the tensors are named layers\.\{i\}\.attn\.weight, "
     r"layers\.\{i\}\.attn\.bias, layers\.\{i\}\.mlp\.in\.weight, layers\.\{i\}\.mlp\.out\.weight"),
    ({"layers.1.mlp.gate.weight": torch.zeros(8, 16)}, r"unexpected tensor 'layers\.1\.mlp\.gate\.weight'"),
    ({"layers.01.attn.weight": torch.zeros(2, 16)}, r"unexpected tensor 'layers\.01\.attn\.weight'"),
    ({"layers.1.attn.weight": torch.zeros(2, 16, dtype=torch.int32), "layers.1.attn.bias": torch.zeros(2)},
     r"tensor 'layers\.1\.attn\.weight' must have a floating dtype, got torch\.int32"),
    ({"layers.1.attn.weight": torch.zeros(2, 16)}, r"router weights cover layers \[1\] but biases cover \[\]"),
    ({"layers.5.attn.weight": torch.zeros(2, 16), "layers.5.attn.bias": torch.zeros(2)},
     r"router for layer 5, but the model has 3 layers"),
    ({"layers.1.attn.weight": torch.zeros(2, 16), "layers.1.attn.bias": torch.tensor([0.0, float("inf")])},
     r"layer 1: attention router bias has 1 inf value\(s\); router weights must be finite"),
])
def test_malformed_tensor_file(tmp_path, tensors, message):
    directory = small_bank().save(tmp_path / "bank")
    save_file(tensors, str(directory / "routers.safetensors"))
    with pytest.raises(RouterBankError, match=rf"router bank .*: routers\.safetensors: {message}"):
        RouterBank.load(directory)


@pytest.mark.parametrize(("kind", "values", "words"), [
    ("weight", [float("nan")], "1 NaN value"), ("weight", [float("-inf")], "1 inf value"),
    ("weight", [float("nan"), float("inf"), float("-inf")], "1 NaN and 2 inf value"),
    ("bias", [float("nan"), float("inf")], "1 NaN and 1 inf value"),
])
def test_non_finite_routers_are_refused_naming_the_layer(kind, values, words):
    weight, bias = torch.zeros(2, 16), torch.zeros(2)
    target = weight.view(-1) if kind == "weight" else bias
    target[: len(values)] = torch.tensor(values)
    with pytest.raises(RouterBankError, match=rf"layer 2: attention router {kind} has {words}\(s\); router weights must be finite"):
        RouterBank(SHAPE, {2: weight}, {2: bias})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"densities": {3: 0.5}}, r"RouterBank\.densities key 3 must be a layer index of the model \(an int in 0\.\.2\), got int 3"),
    ({"densities": {"1": 0.5}}, r"RouterBank\.densities key '1' must be a layer index .*, got str '1'"),
    ({"densities": {1: 1.5}}, r"layer 1 density must be a number in \(0, 1\], got float 1\.5"),
    ({"densities": {1: float("nan")}}, r"layer 1 density must be a number in \(0, 1\], got float nan"),
    ({"densities": [0.5]}, r"RouterBank\.densities must be a dict of layer index -> density, got list \[0\.5\]"),
    ({"provenance": "calibrated"}, r"RouterBank\.provenance must be a dict, got str 'calibrated'"),
    ({"weights": {1: [[0.0] * 16] * 2}}, r"layer 1: attention router weight must be a torch\.Tensor, got list"),
    ({"weights": {"1": torch.zeros(2, 16)}}, r"RouterBank\.weights keys must be int layer indices, got str '1'"),
    ({"biases": {1: torch.zeros(2, dtype=torch.long)}},
     r"layer 1: attention router bias must have a floating dtype, got torch\.int64"),
])
def test_malformed_bank_construction(kwargs, message):
    args = {"weights": {1: torch.zeros(2, 16)}, "biases": {1: torch.zeros(2)}, **kwargs}
    with pytest.raises(RouterBankError, match=message):
        RouterBank(SHAPE, **args)


@pytest.mark.parametrize(("fields", "message"), [
    (("llama", "4", 16, 4, 2), r"ModelShape\.num_layers must be a positive int, got str '4'"),
    (("llama", 3, 16, 4, True), r"ModelShape\.num_kv_heads must be a positive int, got bool True"),
    ((None, 3, 16, 4, 2), r"ModelShape\.model_type must be a non-empty str, got NoneType None"),
    (("llama", 3, 16, 6, 4), r"ModelShape\.num_heads must be a multiple of ModelShape\.num_kv_heads, got num_heads 6"),
])
def test_malformed_model_shape(fields, message):
    with pytest.raises(RouterBankError, match=message):
        ModelShape(*fields)


def saved_bank(tmp_path):
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=3))
    return model, random_routers(model).save(tmp_path / "bank")


def test_truncated_weights_file(tmp_path):
    directory = small_bank().save(tmp_path / "bank")
    weights = directory / "routers.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(RouterBankError, match=r"routers\.safetensors is truncated or corrupt"):
        RouterBank.load(directory)


def test_missing_and_unparsable_config(tmp_path):
    directory = small_bank().save(tmp_path / "bank")
    config = directory / "polar_config.json"
    config.write_text("{not json")
    with pytest.raises(RouterBankError, match=r"polar_config\.json is not valid JSON"):
        RouterBank.load(directory)
    config.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RouterBankError, match=r"polar_config\.json is not valid JSON \(not UTF-8 text"):
        RouterBank.load(directory)
    config.unlink()
    with pytest.raises(RouterBankError, match=r"missing polar_config\.json"):
        RouterBank.load(directory)


def test_bank_for_another_model(tmp_path):
    model, directory = saved_bank(tmp_path)
    bank = RouterBank.load(directory)
    bank.check_model(model)
    opt = tiny_model(TinySpec("opt", heads=4, kv_heads=4, head_dim=8, layers=3))
    with pytest.raises(RouterBankError, match="model_type is 'llama' in the bank, 'opt' in the model"):
        bank.check_model(opt)
    deeper = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=4))
    with pytest.raises(RouterBankError, match="num_layers is 3 in the bank, 4 in the model"):
        bank.check_model(deeper)


def test_wrong_router_shape_names_layer_expected_and_actual():
    shape = ModelShape("llama", 3, 32, 4, 2)
    with pytest.raises(RouterBankError, match=r"layer 2: attention router weight has shape \[4, 32\], expected \[2, 32\]"):
        RouterBank(shape, {2: torch.zeros(4, 32)}, {2: torch.zeros(4)})
    with pytest.raises(RouterBankError, match="router for layer 5, but the model has 3 layers"):
        RouterBank(shape, {5: torch.zeros(2, 32)}, {5: torch.zeros(2)})


@pytest.mark.parametrize("family", [*FAMILIES, *MULTI_QUERY_FAMILIES])
def test_model_shape_counts_the_kv_heads_the_cache_holds(family):
    # Falcon-7B's config keeps num_kv_heads = heads while its attention caches one KV head; Falcon-40B's caches
    # K/V broadcast to every head while its num_kv_heads is smaller
    model = tiny_model(TinySpec(family, heads=4, kv_heads=4 if family in MHA_FAMILIES else 2, head_dim=8, layers=2))
    cache = DecodeDriver(model, batch=2, prompt_len=3, max_cache_len=8).prefill()
    assert ModelShape.of(model).num_kv_heads == cache.layers[0].keys.shape[1]

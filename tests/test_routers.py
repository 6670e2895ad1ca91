"""RouterBank on disk, and its checks against models and files."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polar_compile import RouterBank, RouterBankError
from polar_compile.routers import ModelShape
from polar_compile.testing import random_routers
from tests.models import FAMILIES, MHA_FAMILIES, MULTI_QUERY_FAMILIES, DecodeDriver, TinySpec, tiny_model


@settings(max_examples=20)
@given(units=st.integers(1, 8), hidden=st.integers(1, 64), layers=st.integers(1, 5), seed=st.integers(0, 999),
       data=st.data())
def test_save_load_round_trip(tmp_path_factory, units, hidden, layers, seed, data):
    shape = ModelShape("llama", layers, hidden, units * 2, units)
    routed = data.draw(st.sets(st.integers(0, layers - 1)))
    generator = torch.Generator().manual_seed(seed)
    bank = RouterBank(shape, {i: torch.randn(units, hidden, generator=generator) for i in routed},
                      {i: torch.randn(units, generator=generator) for i in routed},
                      densities={i: 0.25 for i in routed}, provenance={"seed": seed})
    loaded = RouterBank.load(bank.save(tmp_path_factory.mktemp("bank")))
    assert loaded.shape == shape and loaded.layers == sorted(routed)
    assert loaded.densities == bank.densities and loaded.provenance == {"seed": seed}
    for i in routed:
        assert torch.equal(loaded.weights[i], bank.weights[i]) and torch.equal(loaded.biases[i], bank.biases[i])


def saved_bank(tmp_path):
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=3))
    return model, random_routers(model).save(tmp_path / "bank")


def test_truncated_weights_file(tmp_path):
    _, directory = saved_bank(tmp_path)
    weights = directory / "routers.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(RouterBankError, match=r"routers\.safetensors is truncated or corrupt"):
        RouterBank.load(directory)


def test_missing_and_malformed_config(tmp_path):
    _, directory = saved_bank(tmp_path)
    config = directory / "polar_config.json"
    config.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(RouterBankError, match="format_version 99, expected 1"):
        RouterBank.load(directory)
    config.write_text("{not json")
    with pytest.raises(RouterBankError, match=r"polar_config\.json is not valid JSON"):
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

"""Calibration: collection through the matcher, router training, bank round trip, decode == eval's sparse path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import polar_compile
from polar_compile.calibrate import (
    FeatureStore,
    calibrate,
    collect,
    router_recall,
    select_densities,
    train_router,
)
from polar_compile.data import DataError
from polar_compile.evaluate import Evaluator, Sparsity, decode_token_nll
from polar_compile.instrument import InstrumentError
from polar_compile.routers import ModelShape, RouterBank, RouterBankError
from polar_compile.testing import random_routers
from tests.calib_models import LLAMA, OPT, WIKITEXT, load_shared, needs_shared, random_windows
from tests.models import MULTI_QUERY_FAMILIES, TinySpec, attention_modules, tiny_model


def reference_features(model, inputs):
    """Per layer, (q_proj input [B, T, hidden], per-unit norms [B, T, units]) from hooks on the projections."""
    shape = ModelShape.of(model)
    group = shape.num_heads // shape.num_kv_heads
    captured, handles = {}, []
    for layer, (q_proj, o_proj) in enumerate(attention_modules(model)):
        def save_x(module, args, layer=layer):
            captured[layer, "x"] = args[0].detach()

        def save_norms(module, args, layer=layer):
            heads = args[0].unflatten(-1, (shape.num_heads, -1))  # [B, T, H, D]
            captured[layer, "n"] = heads.norm(dim=-1).unflatten(-1, (-1, group)).sum(-1)  # [B, T, units]

        handles += [q_proj.register_forward_pre_hook(save_x), o_proj.register_forward_pre_hook(save_norms)]
    with torch.no_grad():
        model(input_ids=inputs, use_cache=False)
    for handle in handles:
        handle.remove()
    return {layer: (captured[layer, "x"], captured[layer, "n"]) for layer in range(shape.num_layers)}


@pytest.mark.parametrize("spec", [LLAMA, OPT], ids=["gqa", "mha"])
def test_collected_features_equal_hooks_on_the_projections(spec, tmp_path):
    model = tiny_model(spec, seed=3)
    windows = random_windows(5, 12, seed=4)
    layers = [0, 1, 2]
    full = FeatureStore(tmp_path / "full", layers, 5 * 12, ModelShape.of(model))
    collect(model, windows, full, per_window=12, batch_size=2, progress=False)
    sampled = FeatureStore(tmp_path / "sampled", layers, 5 * 4, ModelShape.of(model))
    collect(model, windows, sampled, per_window=4, batch_size=3, progress=False)
    reference = reference_features(model, windows[:, :-1])
    for layer in layers:
        ref_x, ref_norms = (t.flatten(0, 1) for t in reference[layer])  # [n * T, .], window-major
        x, norms = full.load(layer)
        torch.testing.assert_close(x, ref_x, rtol=2e-3, atol=2e-3)  # stored in fp16
        torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-5)
        _, sampled_norms = sampled.load(layer)  # 4 distinct positions of each window, in window order
        for window in range(5):
            rows = sampled_norms[4 * window : 4 * window + 4]
            distance = torch.cdist(rows, ref_norms[12 * window : 12 * window + 12])  # [4, 12]
            matches = distance.argmin(1)
            assert distance.min(1).values.max() < 1e-4 and len(set(matches.tolist())) == 4


@settings(max_examples=5)
@given(seed=st.integers(0, 2**16), units=st.sampled_from([2, 4, 8]))
def test_training_recovers_a_linear_ranking_far_better_than_a_random_router(seed, units):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, 24, generator=generator) * torch.rand(24, generator=generator) * 3 + 1
    true_weight = torch.randn(24, units, generator=generator)
    norms = F.softplus(x @ true_weight + 0.3 * torch.randn(3000, units, generator=generator))  # [N, units]
    linear, _ = train_router(x[:2000], norms[:2000])
    k = max(1, units // 2)
    with torch.no_grad():
        trained = router_recall(linear(x[2000:]), norms[2000:], k)
    random_scores = torch.randn(1000, units, generator=generator)
    assert trained > router_recall(random_scores, norms[2000:], k) + 0.2
    assert trained > 0.85


def test_calibrate_builds_a_bank_with_provenance(tmp_path):
    model = tiny_model(LLAMA, seed=1)
    bank = calibrate(model, random_windows(6, 16, seed=2), seq_len=16, heldout=0.3, density=0.5,
                     progress=False, cache_dir=tmp_path)
    assert bank.layers == [1, 2] and bank.densities == {1: 0.5, 2: 0.5}
    layers = bank.provenance["layers"]
    assert [r["layer"] for r in layers] == [1, 2]
    assert all(0.0 <= r["recall"] <= 1.0 and r["train_samples"] == 4 * 16 for r in layers)
    assert bank.provenance["heldout_windows"] == 2
    assert list(tmp_path.iterdir()) == []  # the memory-mapped features are removed afterwards


def test_bad_data_gives_clear_errors(tmp_path):
    model = tiny_model(LLAMA)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        calibrate(model, empty, tokenizer=object(), progress=False)
    with pytest.raises(DataError, match="too few for one window of 512"):
        calibrate(model, torch.arange(300), progress=False)
    with pytest.raises(DataError, match="at least 2 windows"):
        calibrate(model, random_windows(1, 16), seq_len=16, progress=False)


def test_a_bank_for_another_model_is_refused():
    bank = random_routers(tiny_model(LLAMA))
    with pytest.raises(RouterBankError, match="model_type is 'llama' in the bank, 'opt' in the model"):
        Evaluator(tiny_model(OPT), bank)


def test_a_model_without_sdpa_attention_is_a_clear_error():
    model = tiny_model(LLAMA)
    model.config._attn_implementation = "eager"
    with pytest.raises(InstrumentError, match=(
        r"^LlamaForCausalLM \(model_type 'llama'\) has no attention the matcher can route: it routes "
        r"scaled_dot_product_attention calls owned by a decoder layer's attention module, and its graph has no "
        r"scaled_dot_product_attention call but a softmax or flex_attention: .* attn_implementation='sdpa'")):
        calibrate(model, random_windows(4, 8), seq_len=8, progress=False)


@pytest.mark.parametrize("family", MULTI_QUERY_FAMILIES)
def test_a_multi_query_model_is_refused_before_any_work(family):
    model = tiny_model(TinySpec(family, heads=4, kv_heads=1, head_dim=8, layers=2))
    with pytest.raises(RouterBankError, match=r"reads 1 KV head per layer .* at least 2 KV heads"):
        calibrate(model, random_windows(4, 8), seq_len=8, progress=False)


def test_a_config_that_disagrees_with_the_traced_graph_names_the_layer():
    model = tiny_model(LLAMA)  # 2 KV heads in the graph
    model.config.num_key_value_heads = 4
    with pytest.raises(InstrumentError, match=r"layer 0 .*reads K/V with 2 head\(s\), but the model config gives 4"):
        calibrate(model, random_windows(4, 8), seq_len=8, progress=False)


@pytest.mark.parametrize("spec", [LLAMA, OPT], ids=["gqa", "mha"])
def test_saved_bank_drives_the_backend_with_evals_per_token_losses(spec, tmp_path):
    model = tiny_model(spec, seed=5)
    bank = calibrate(model, random_windows(6, 16, seed=6), seq_len=16, heldout=0.34, progress=False, mlp_rank=0)
    assert bank.mlp is None and bank.provenance["mlp"] == {"off": "mlp_rank is 0"}  # attention only, as eval's
    loaded = RouterBank.load(bank.save(tmp_path / "bank"))
    for layer in bank.layers:
        assert torch.equal(loaded.weights[layer], bank.weights[layer])
        assert torch.equal(loaded.biases[layer], bank.biases[layer])
    assert loaded.densities == bank.densities and loaded.provenance == bank.provenance
    windows = random_windows(2, 10, seed=7)
    evaluator = Evaluator(model, loaded, progress=False)
    expected = evaluator.token_nll(windows, evaluator.sparsity("routers", 0.5))
    dense = evaluator.token_nll(windows, evaluator.sparsity("dense", 1.0))
    compiled = torch.compile(model, backend=polar_compile.make_backend(loaded, 0.5, inductor=False))
    decoded = decode_token_nll(compiled, model, windows)
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)
    assert (decoded - dense).abs().max() > 1e-2  # the routers really dropped units


@needs_shared
def test_trained_model_routers_beat_random_routers_on_held_out_text():
    model, tokenizer = load_shared("tiny-llama-wt2")
    bank = calibrate(model, WIKITEXT / "valid.txt", tokenizer=tokenizer, tokens=12 * 512, heldout=0.25,
                     progress=False)
    windows = bank.provenance["windows"]
    assert windows == 12
    for report in bank.provenance["layers"]:  # k = 1 of 2 KV groups: a random router's recall is 0.5
        assert report["recall"] > 0.6, report


def test_density_selection_with_a_huge_budget_keeps_one_unit_per_layer():
    model = tiny_model(OPT, seed=8)
    windows = random_windows(2, 12, seed=9)
    assert select_densities(model, random_routers(model, seed=1), windows, 100.0, progress=False) == {1: 0.25, 2: 0.25}


def test_density_selection_meets_the_target_and_stops_at_it():
    model = tiny_model(OPT, seed=8)
    bank, windows = random_routers(model, seed=1), random_windows(2, 12, seed=9)
    evaluator = Evaluator(model, bank, progress=False)
    dense = evaluator.token_nll(windows, evaluator.sparsity("dense", 1.0)).mean().item()
    half = evaluator.token_nll(windows, evaluator.sparsity("routers", 0.5)).mean().item()
    target = (half - dense) / 2
    densities = select_densities(model, bank, windows, target, progress=False)
    kept = tuple((layer, round(d * 4)) for layer, d in sorted(densities.items()))
    chosen = evaluator.token_nll(windows, Sparsity("routers", kept)).mean().item()
    assert chosen - dense <= target + 1e-6
    assert any(k < 4 for _, k in kept)  # the budget allows dropping at least the cheapest unit
    for layer, k in kept:  # greedy stopped: no single further drop fits the budget
        if k > 1:
            smaller = tuple((other, k2 - (other == layer)) for other, k2 in kept)
            assert evaluator.token_nll(windows, Sparsity("routers", smaller)).mean().item() - dense > target


def test_by_default_relu_models_get_mlp_routers_that_survive_the_round_trip(tmp_path):
    model = tiny_model(OPT, seed=5)  # OPT's MLP is ReLU; the Llama's is SiLU
    bank = calibrate(model, random_windows(8, 16, seed=6), seq_len=16, heldout=0.25, progress=False, mlp_steps=4)
    assert bank.mlp is not None and bank.mlp.layers == [1, 2] and bank.mlp.rank == 64  # "auto": at least min(128, hidden 64)
    assert [r["layer"] for r in bank.provenance["mlp"]["layers"]] == [1, 2]
    loaded = RouterBank.load(bank.save(tmp_path / "bank"))
    assert loaded.mlp.topk == bank.mlp.topk and loaded.provenance == bank.provenance
    for layer in bank.mlp.layers:
        assert torch.equal(loaded.mlp.w_in[layer], bank.mlp.w_in[layer])
        assert torch.equal(loaded.mlp.w_out[layer], bank.mlp.w_out[layer])
    llama = calibrate(tiny_model(LLAMA, seed=1), random_windows(6, 16, seed=2), seq_len=16, heldout=0.3,
                      progress=False)
    assert llama.mlp is None and "activation is silu, which has no exact zeros" in llama.provenance["mlp"]["off"]

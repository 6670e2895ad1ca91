"""The attention rewrite on stock HF decoders: sites found, numbers against an independent hook reference."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import StaticCache

import polar_compile
from polar_compile.testing import random_routers
from tests.budget import examples
from tests.models import (
    FAMILIES,
    MHA_FAMILIES,
    MULTI_QUERY_FAMILIES,
    DecodeDriver,
    TinySpec,
    gated_heads,
    tiny_model,
)


@st.composite
def specs(draw):
    family = draw(st.sampled_from(FAMILIES))
    heads = draw(st.sampled_from([2, 4, 6, 8]))
    # one KV head (multi-query) stays dense by design: test_multi_query_sites_stay_dense_and_say_why
    kv_heads = heads if family in MHA_FAMILIES else draw(st.sampled_from([d for d in range(2, heads + 1) if heads % d == 0]))
    return TinySpec(family, heads=heads, kv_heads=kv_heads, head_dim=draw(st.sampled_from([4, 8, 16])),
                    layers=draw(st.integers(2, 4)), bias=draw(st.booleans()))


def hooked_reference(model, bank, density, inputs):
    """Logits of the eager model with the test's own head gating (see ``gated_heads``)."""
    with gated_heads(model, bank, density), torch.no_grad():
        return model(**inputs).logits


def compiled_logits(model, bank, density, inputs):
    step = torch.compile(model.forward, backend=polar_compile.make_backend(bank, density, inductor=False), fullgraph=True)
    with torch.no_grad():
        return step(**inputs).logits


@settings(max_examples=examples(12), suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), density=st.sampled_from([0.25, 0.5, 0.75]), batch=st.integers(1, 3), seed=st.integers(0, 99),
       data=st.data())
def test_decode_rewrite_matches_hook_reference(spec, density, batch, seed, data):
    check_decode_rewrite(spec, density, batch, seed, pad=[data.draw(st.integers(0, 3)) for _ in range(batch)])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_rewritten_and_matches_the_hook_reference(family):
    """Each family once for sure (hypothesis above may not draw them all): layouts such as Falcon's fused
    ``x @ weight.T`` projection are found."""
    kv_heads = 4 if family in MHA_FAMILIES else 2
    check_decode_rewrite(TinySpec(family, heads=4, kv_heads=kv_heads, head_dim=8, layers=3, bias=True), 0.5,
                         batch=3, seed=11, pad=[0, 2, 1])


def check_decode_rewrite(spec, density, batch, seed, pad):
    """Every layer but 0 rewritten; polar at density 1.0 equals the model, at ``density`` the hook reference."""
    model = tiny_model(spec, seed=seed)
    bank = random_routers(model, seed=seed)
    driver = DecodeDriver(model, batch=batch, prompt_len=4, max_cache_len=12, pad=pad, seed=seed)

    report = polar_compile.explain(model, options={"routers": bank, "density": density},
                                   **driver.decode_inputs(driver.prefill()))
    assert len(report.graphs) == 1
    assert sorted(s.layer for s in report.rewritten) == list(range(1, spec.layers))
    assert [s.reason for s in report.dense] == ["no router for layer 0"]
    # the dense layer-0 site reads the un-repeated cache when HF repeats K/V for GQA
    gqa_native = [0] if spec.kv_heads < spec.heads and spec.family not in MHA_FAMILIES else []
    assert [s.layer for s in report.sites_of("gqa") if s.rewritten] == gqa_native

    torch._dynamo.reset()
    dense = hooked_reference(model, bank, 1.0, driver.decode_inputs(driver.prefill()))
    with torch.no_grad():
        uncompiled = model(**driver.decode_inputs(driver.prefill())).logits
    torch.testing.assert_close(dense, uncompiled)
    polar_full = compiled_logits(model, bank, 1.0, driver.decode_inputs(driver.prefill()))
    torch.testing.assert_close(polar_full, uncompiled, atol=2e-5, rtol=1e-4)

    torch._dynamo.reset()
    expected = hooked_reference(model, bank, density, driver.decode_inputs(driver.prefill()))
    polar = compiled_logits(model, bank, density, driver.decode_inputs(driver.prefill()))
    torch.testing.assert_close(polar, expected, atol=2e-5, rtol=1e-4)
    if max(1, round(density * spec.kv_heads)) < spec.kv_heads:
        assert (polar - uncompiled).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", *MULTI_QUERY_FAMILIES])
def test_multi_query_sites_stay_dense_and_say_why(family):
    model = tiny_model(TinySpec(family, heads=4, kv_heads=1, head_dim=8, layers=3), seed=5)
    bank = random_routers(model, seed=5)
    driver = DecodeDriver(model, batch=2, prompt_len=4, max_cache_len=12, pad=[0, 2], seed=5)
    report = polar_compile.explain(model, options={"routers": bank, "density": 0.5},
                                   **driver.decode_inputs(driver.prefill()))
    assert not report.rewritten and [s.kv_heads for s in report.dense] == [1, 1, 1]
    assert all("one KV head (multi-query)" in s.reason for s in report.dense[1:])
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(**driver.decode_inputs(driver.prefill())).logits
    polar = compiled_logits(model, bank, 0.5, driver.decode_inputs(driver.prefill()))
    torch.testing.assert_close(polar, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_stays_dense(family):
    model = tiny_model(TinySpec(family, heads=4, kv_heads=4 if family in MHA_FAMILIES else 2, head_dim=8, layers=2))
    driver = DecodeDriver(model, batch=2, prompt_len=5, max_cache_len=12)
    cache = StaticCache(config=model.config, max_cache_len=12)
    report = polar_compile.explain(model, options={"routers": random_routers(model)},
                                   **driver._inputs(driver.prompt, cache, 0))
    assert len(report.sites) == 2 and not report.rewritten
    assert all(s.kind == "prefill" and s.reason.startswith("prefill (query length 5)") for s in report.sites)


def test_no_routers_compiles_dense_with_one_warning():
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=2))
    driver = DecodeDriver(model, batch=2, prompt_len=3, max_cache_len=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = polar_compile.explain(model, **driver.decode_inputs(driver.prefill()))
    messages = [str(w.message) for w in caught if "polar" in str(w.message)]
    assert len(messages) == 1 and "polar_compile.calibrate" in messages[0]
    assert not report.rewritten
    assert [s.reason for s in report.sites] == ["no router for layer 0", "no router for layer 1"]
    assert [s.layer for s in report.sites_of("gqa") if s.rewritten] == [0, 1]


def test_bank_for_another_model_is_rejected_naming_the_layer():
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=2))
    other = tiny_model(TinySpec("llama", heads=4, kv_heads=4, head_dim=8, layers=2))
    driver = DecodeDriver(model, batch=1, prompt_len=3, max_cache_len=8)
    with pytest.raises(polar_compile.RouterBankError, match="num_kv_heads is 4 in the bank, 2 in the model"):
        polar_compile.attach(model, random_routers(other))
    with pytest.raises(Exception, match=r"layer 1 .*router weight is \[4, 32\], the graph needs \[2, 32\]"):
        compiled_logits(model, random_routers(other), 0.5, driver.decode_inputs(driver.prefill()))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_sites_that_would_save_too_little_stay_dense(family):
    """``min_saved_mib``: a site whose skipped K/V bytes per step are at most the threshold keeps dense numbers."""
    heads, kv_heads, head_dim, batch, cache_len = 4, 2 if family == "llama" else 4, 8, 2, 12
    model = tiny_model(TinySpec(family, heads=heads, kv_heads=kv_heads, head_dim=head_dim, layers=2))
    bank = random_routers(model)
    driver = DecodeDriver(model, batch=batch, prompt_len=3, max_cache_len=cache_len)
    skipped_bytes = (kv_heads - kv_heads // 2) * batch * cache_len * head_dim * 2 * 4  # K and V, fp32, density 0.5
    with torch.no_grad():
        uncompiled = model(**driver.decode_inputs(driver.prefill())).logits
    for threshold_bytes, routed in ((skipped_bytes - 1, True), (skipped_bytes, False)):
        torch._dynamo.reset()
        options = {"routers": bank, "density": 0.5, "min_saved_mib": threshold_bytes / 2**20}
        report = polar_compile.explain(model, options=options, **driver.decode_inputs(driver.prefill()))
        assert [s.layer for s in report.rewritten] == ([1] if routed else [])
        if not routed:
            reason = next(s.reason for s in report.dense if s.layer == 1)
            assert reason.startswith(f"routing would skip only {skipped_bytes / 2**20:.1f} MiB of K/V reads per step "
                                     f"(B={batch}, L={cache_len}), not more than min_saved_mib=")
            step = torch.compile(model.forward, backend=polar_compile.make_backend(
                bank, 0.5, inductor=False, min_saved_mib=threshold_bytes / 2**20), fullgraph=True)
            with torch.no_grad():
                torch.testing.assert_close(step(**driver.decode_inputs(driver.prefill())).logits, uncompiled)


def test_dense_gqa_native_rewrite_reaches_the_code_that_runs():
    """With no site routed, the GQA-native SDPA rewrite still regenerates the module's code (and keeps the numbers)."""
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=2))
    driver = DecodeDriver(model, batch=2, prompt_len=3, max_cache_len=8)
    codes = []

    def capture(gm, example_inputs):
        forward = polar_compile.make_backend(inductor=False)(gm, example_inputs)
        codes.append(gm.code)
        return forward

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no routers: the one warning is tested above
        step = torch.compile(model.forward, backend=capture, fullgraph=True)
        with torch.no_grad():
            actual = step(**driver.decode_inputs(driver.prefill())).logits
    with torch.no_grad():
        expected = model(**driver.decode_inputs(driver.prefill())).logits
    assert len(codes) == 1 and codes[0].count("enable_gqa = True") == 2
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


def test_attention_without_sdpa_stays_dense_and_says_why():
    """HF's eager attention (matmul, softmax, matmul) has no site: explain and the backend say so, numbers stay."""
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=3))
    model.set_attn_implementation("eager")
    bank = random_routers(model)
    driver = DecodeDriver(model, batch=2, prompt_len=4, max_cache_len=10, pad=[0, 1])
    report = polar_compile.explain(model, options={"routers": bank}, **driver.decode_inputs(driver.prefill()))
    assert not report.sites
    assert "no scaled_dot_product_attention call but a softmax" in str(report)
    assert "attn_implementation='sdpa'" in str(report)

    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(**driver.decode_inputs(driver.prefill())).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        polar = compiled_logits(model, bank, 0.5, driver.decode_inputs(driver.prefill()))
    assert any("no scaled_dot_product_attention call" in str(w.message) for w in caught)
    torch.testing.assert_close(polar, expected)


def test_graph_without_attention_has_no_note():
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=2))
    mlp = model.model.layers[0].mlp
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = torch.compile(mlp, backend=polar_compile.make_backend(random_routers(model), 0.5, inductor=False))
        step(torch.randn(2, 1, 32))
    assert not [w for w in caught if "polar" in str(w.message)]


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("path", ["attach", "options"])
def test_half_precision_models_match_the_hook_reference(dtype, tolerance, path):
    """bf16 and fp16 models through the backend (attached routers are cast to the model's dtype, options routers
    to the router input's), against the hook reference on the same half-precision model."""
    model = tiny_model(TinySpec("qwen2", heads=4, kv_heads=2, head_dim=8, layers=3, bias=True), seed=8).to(dtype)
    bank = random_routers(model, seed=8)
    for layer in bank.layers:  # router weights exact in ``dtype``, so both sides rank the same scores
        bank.weights[layer] = bank.weights[layer].to(dtype).float()
        bank.biases[layer] = bank.biases[layer].to(dtype).float()
    driver = DecodeDriver(model, batch=3, prompt_len=4, max_cache_len=10, pad=[0, 2, 1], seed=8)
    expected = hooked_reference(model, bank, 0.5, driver.decode_inputs(driver.prefill()))
    if path == "attach":
        polar_compile.attach(model, bank, density=0.5)
        step = torch.compile(model.forward, backend="polar", options={"inductor": False}, fullgraph=True)
        with torch.no_grad():
            actual = step(**driver.decode_inputs(driver.prefill())).logits
    else:
        actual = compiled_logits(model, bank, 0.5, driver.decode_inputs(driver.prefill()))
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)
    with torch.no_grad():
        dense = model(**driver.decode_inputs(driver.prefill())).logits
    assert (actual.float() - dense.float()).abs().max() > 10 * tolerance


def test_explain_sees_through_a_forward_that_is_already_compiled():
    """The README's ``model.forward = torch.compile(model.forward, ...)``: explain traces the original forward."""
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=3), seed=12)
    bank = random_routers(model, seed=12)
    driver = DecodeDriver(model, batch=2, prompt_len=4, max_cache_len=10, seed=12)
    model.forward = torch.compile(model.forward, backend=polar_compile.make_backend(bank, 0.5, inductor=False))
    report = polar_compile.explain(model, options={"routers": bank, "density": 0.5},
                                   **driver.decode_inputs(driver.prefill()))
    assert [s.layer for s in report.rewritten] == [1, 2]


def test_flex_attention_stays_dense_with_the_note():
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=2), seed=13)
    model.set_attn_implementation("flex_attention")
    driver = DecodeDriver(model, batch=2, prompt_len=4, max_cache_len=8, seed=13)
    report = polar_compile.explain(model, options={"routers": random_routers(model)},
                                   **driver.decode_inputs(driver.prefill()))
    assert not report.sites and "softmax or flex_attention" in str(report)

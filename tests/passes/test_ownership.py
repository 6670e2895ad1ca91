"""The matcher rewrites only the sites it owns: a decoder's self-attention, never cross-attention; sliding-window
layers keep being routed once their window cache rolls."""

import pytest
import torch

import polar_compile
from polar_compile.testing import random_routers
from tests.models import TinySpec
from tests.seq2seq import PER_HEAD_MASK_FAMILIES, Seq2SeqDecodeDriver, tiny_seq2seq
from tests.sliding import MultiStepDriver, tiny_sliding_model

LAYERS = 3


def polar_steps(bank, density):
    return polar_compile.make_backend(bank, density, inductor=False)


@pytest.mark.parametrize("family", ["bart", "whisper", "marian"])  # M2M100 breaks fullgraph on transformers 5.17
def test_encoder_decoder_routes_decoder_self_attention_only(family):
    model = tiny_seq2seq(family, layers=LAYERS, seed=4)
    bank = random_routers(model, seed=4)
    driver = Seq2SeqDecodeDriver(model, batch=3, steps=3, pad=[0, 1, 2], seed=4)

    report = polar_compile.explain(model, options={"routers": bank, "density": 0.5},
                                   **driver.decode_inputs(driver.prefill()))
    assert [(s.layer, s.module.rsplit(".", 1)[-1]) for s in report.rewritten] == [(1, "self_attn"), (2, "self_attn")]
    cross = [s for s in report.dense if s.module.endswith("encoder_attn")]
    assert len(cross) == LAYERS
    assert all("own self-attention K/V" in s.reason and "cross-attention" in s.reason for s in cross)

    torch._dynamo.reset()
    step = torch.compile(model.forward, backend=polar_steps(bank, 0.5), fullgraph=True)
    expected, dense = driver.reference(bank, 0.5), driver.run(model)
    for actual, want, plain in zip(driver.run(step), expected, dense, strict=True):
        torch.testing.assert_close(actual, want, atol=2e-5, rtol=1e-4)
        assert (actual - plain).abs().max() > 1e-3


@pytest.mark.parametrize("family", PER_HEAD_MASK_FAMILIES)
def test_per_head_masks_of_t5_keep_every_site_dense(family):
    model = tiny_seq2seq(family, layers=LAYERS, seed=5)
    bank = random_routers(model, seed=5)
    driver = Seq2SeqDecodeDriver(model, batch=2, steps=2, seed=5)
    report = polar_compile.explain(model, options={"routers": bank, "density": 0.5},
                                   **driver.decode_inputs(driver.prefill()))
    assert report.sites and not report.rewritten
    torch._dynamo.reset()
    step = torch.compile(model.forward, backend=polar_steps(bank, 0.5), fullgraph=True)
    for actual, want in zip(driver.run(step), driver.run(model), strict=True):
        torch.testing.assert_close(actual, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family, kv_heads", [("mistral", 2), ("gemma3_text", 2)])
def test_sliding_window_layers_stay_routed_past_the_window(family, kv_heads):
    """Mistral slides everywhere, Gemma-3 every other layer: decoding past a window of 4, each step equals the
    hook reference (the window cache then rolls: roll, setitem, copy_ written from the layer's own projection)."""
    model = tiny_sliding_model(TinySpec(family, heads=4, kv_heads=kv_heads, head_dim=8, layers=LAYERS), window=4,
                               seed=6)
    bank = random_routers(model, seed=6)
    driver = MultiStepDriver(model, batch=2, prompt_len=5, max_cache_len=12, steps=4, pad=[0, 2], seed=6)
    step = torch.compile(model.forward, backend=polar_steps(bank, 0.5), fullgraph=True)
    for actual, want in zip(driver.run(step), driver.reference(bank, 0.5), strict=True):
        torch.testing.assert_close(actual, want, atol=2e-5, rtol=1e-4)

    torch._dynamo.reset()
    cache = driver.prefill()
    for index in range(driver.steps - 1):  # fill the window, then explain the rolling step
        with torch.no_grad():
            model(**driver.decode_inputs(cache, index))
    report = polar_compile.explain(model, options={"routers": bank, "density": 0.5},
                                   **driver.decode_inputs(cache, driver.steps - 1))
    assert [s.layer for s in report.rewritten] == list(range(1, LAYERS))


def test_encoder_decoder_attach_routes_the_decoder_layers():
    """attach() finds the decoder's layer list (``get_decoder()``), not the encoder's, and the bank's shape is the
    decoder's (here 3 decoder layers of 4 heads against an encoder of 2 layers of 2 heads)."""
    model = tiny_seq2seq("bart", layers=LAYERS, seed=7)
    bank = random_routers(model, seed=7)
    assert (bank.shape.num_layers, bank.shape.num_heads) == (LAYERS, 4)
    driver = Seq2SeqDecodeDriver(model, batch=2, steps=2, pad=[1, 0], seed=7)
    expected = driver.reference(bank, 0.5)
    polar_compile.attach(model, bank, density=0.5)
    assert all(not hasattr(layer, "polar_router_weight") for layer in model.get_encoder().layers)
    step = torch.compile(model.forward, backend="polar", options={"inductor": False}, fullgraph=True)
    for actual, want in zip(driver.run(step), expected, strict=True):
        torch.testing.assert_close(actual, want, atol=2e-5, rtol=1e-4)

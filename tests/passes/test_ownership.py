"""The matcher rewrites only the sites it owns: a decoder's self-attention, never cross-attention; sliding-window
layers keep being routed once their window cache rolls."""

import pytest
import torch
import transformers

import polar_compile
from polar_compile.testing import random_routers
from tests.models import DecodeDriver, TinySpec, gated_heads, tiny_model
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


def test_encoder_attention_without_a_cache_is_not_routed_by_an_options_bank():
    """A one-token source makes the encoder's self-attention look like a decode step: with no KV cache to read it
    stays dense (it used to take the decoder's routers of the same layer index)."""
    model = tiny_seq2seq("bart", layers=LAYERS, seed=8)
    bank = random_routers(model, seed=8)
    generator = torch.Generator().manual_seed(8)
    inputs = dict(input_ids=torch.randint(3, 50, (2, 1), generator=generator),
                  decoder_input_ids=torch.randint(3, 50, (2, 1), generator=generator), use_cache=False)
    report = polar_compile.explain(model, options={"routers": bank, "density": 0.5}, **inputs)
    encoder = [s for s in report.sites if ".encoder." in s.module]
    assert encoder and not report.rewritten
    assert all(s.reason.startswith("K/V are computed in this step, not read from a KV cache") for s in encoder)
    torch._dynamo.reset()
    step = torch.compile(model.forward, backend=polar_steps(bank, 0.5), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(step(**inputs).logits, model(**inputs).logits)


def test_a_norm_between_attention_and_its_output_projection_keeps_the_site_dense():
    """BitNet normalizes the attention output over all heads (attn_sub_norm) before o_proj."""
    config = transformers.BitNetConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    config._attn_implementation = "sdpa"
    torch.manual_seed(9)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    bank = random_routers(model, seed=9)
    driver = MultiStepDriver(model, batch=2, prompt_len=3, max_cache_len=8, steps=2, seed=9)
    report = polar_compile.explain(model, options={"routers": bank, "density": 0.5},
                                   **driver.decode_inputs(driver.prefill()))
    assert not report.rewritten
    assert all("acts on the attention output between SDPA and the output projection" in s.reason
               for s in report.dense[1:])
    torch._dynamo.reset()
    step = torch.compile(model.forward, backend=polar_steps(bank, 0.5), fullgraph=True)
    for actual, want in zip(driver.run(step), driver.run(model), strict=True):
        torch.testing.assert_close(actual, want, atol=2e-5, rtol=1e-4)


def test_a_model_called_twice_in_one_graph_routes_both_calls():
    """E.g. classifier-free guidance: two calls of one attention module use its router each time."""
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=LAYERS), seed=10)
    bank = random_routers(model, seed=10)
    first = DecodeDriver(model, batch=2, prompt_len=3, max_cache_len=8, seed=10)
    second = DecodeDriver(model, batch=2, prompt_len=3, max_cache_len=8, seed=11)

    def guided(a, b):
        return model(**a).logits - model(**b).logits

    polar_compile.attach(model, bank, density=0.5)
    step = torch.compile(guided, backend="polar", options={"inductor": False}, fullgraph=True)
    with torch.no_grad():
        actual = step(first.decode_inputs(first.prefill()), second.decode_inputs(second.prefill()))
    polar_compile.detach(model)
    with gated_heads(model, bank, 0.5), torch.no_grad():
        expected = guided(first.decode_inputs(first.prefill()), second.decode_inputs(second.prefill()))
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)

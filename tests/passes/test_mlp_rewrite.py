"""The MLP rewrite: decode logits of stock HF ReLU models (OPT, GPT-2's Conv1D, GPT-NeoX, gated Llama, Qwen2 and
Gemma, Phi-3's and GLM's fused gate/up, Falcon's x @ weight.T, StarCoder2, GPT-BigCode, Nemotron's squared ReLU)
under the polar backend equal the test's own masked reference (``tests/mlp_reference.py``), with routers attached
or in the options, and follow re-attach, another table and another batch size without a reset."""

import pytest
import torch
import transformers
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import polar_compile
from polar_compile import MlpRouters, RouterBank
from polar_compile.config import PolarConfig
from polar_compile.routers import RouterBankError
from polar_compile.testing import random_routers
from tests.budget import examples
from tests.mlp_reference import sparse_mlps
from tests.models import DecodeDriver
from tests.passes.test_mlp_match import RELU, relu_model

FAMILIES = ("opt", "gpt2", "gpt_neox", "llama", "phi3", "falcon", "nemotron", "qwen2", "gemma", "glm", "starcoder2",
            "gpt_bigcode")


def mlp_bank(model, seed=0, first_layer=0, rank=8, topk=None):
    """Random MLP routers only (the attention stays dense, so the MLP reference is the whole reference)."""
    bank = random_routers(model, seed=seed, first_layer=first_layer, mlp_rank=rank, mlp_topk=topk)
    return RouterBank(bank.shape, {}, {}, mlp=bank.mlp)


def driver_for(model, batch, seed=0):
    return DecodeDriver(model, batch=batch, prompt_len=3, max_cache_len=8, pad=[1] + [0] * (batch - 1), seed=seed)


def reference(model, family, mlp, driver):
    gaps = []
    with torch.no_grad():
        cache = driver.prefill()
        with sparse_mlps(model, family, mlp, driver.batch, gaps):
            logits = model(**driver.decode_inputs(cache)).logits
    return logits, min(gaps, default=float("inf"))


def polar_logits(step, driver):
    with torch.no_grad():
        return step(**driver.decode_inputs(driver.prefill())).logits


def compiled(model, options=None):
    return torch.compile(model.forward, backend="polar", options={"inductor": False, **(options or {})},
                         fullgraph=True)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=examples(2), deadline=None)
@given(batch=st.integers(1, 4), density=st.sampled_from([0.1, 0.3, 0.6, 1.0]), rank=st.sampled_from([4, 16]),
       attached=st.booleans(), seed=st.integers(0, 2**16))
def test_decode_logits_equal_the_masked_reference(family, batch, density, rank, attached, seed):
    torch._dynamo.reset()
    model = relu_model(family, relu=True)
    bank = mlp_bank(model, seed, rank=rank, topk={4: density})
    driver = driver_for(model, batch, seed)
    expected, gap = reference(model, family, bank.mlp, driver)
    assume(gap > 1e-5)
    if attached:
        polar_compile.attach(model, bank)
        step = compiled(model)
    else:
        step = compiled(model, {"routers": bank})
    torch.testing.assert_close(polar_logits(step, driver), expected, rtol=1e-4, atol=1e-4)
    report = polar_compile.explain(model, **driver.decode_inputs(driver.prefill()),
                                   options=None if attached else {"routers": bank})
    ffn = RELU[family][2]
    assert [(s.layer, s.rewritten, s.kept) for s in report.sites_of("mlp")] == [
        (layer, True, bank.mlp.k_for(layer, batch)) for layer in (0, 1)] and bank.mlp.ffn_size == ffn


# Decoders outside tests/models.py's families, ReLU by their config: GPT-J and CodeGen (attention and MLP in
# parallel on one LayerNorm), XGLM, BioGPT, Persimmon (squared ReLU, its default)
OTHER_RELU_DECODERS = {
    "gptj": lambda: transformers.GPTJConfig(vocab_size=97, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                            n_positions=64, activation_function="relu"),
    "codegen": lambda: transformers.CodeGenConfig(vocab_size=97, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                  n_positions=64, n_ctx=64, activation_function="relu"),
    "xglm": lambda: transformers.XGLMConfig(vocab_size=97, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64,
                                            max_position_embeddings=64, activation_function="relu"),
    "biogpt": lambda: transformers.BioGptConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64,
                                                max_position_embeddings=64, hidden_act="relu"),
    "persimmon": lambda: transformers.PersimmonConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=64,
                                                      max_position_embeddings=64),
}


@pytest.mark.parametrize("family", OTHER_RELU_DECODERS)
def test_other_relu_decoders_equal_the_masked_reference(family):
    config = OTHER_RELU_DECODERS[family]()
    config._attn_implementation = "eager" if family == "xglm" else "sdpa"  # XGLM has no SDPA path
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    bank = mlp_bank(model, seed=1, topk={4: 0.3})
    driver = driver_for(model, 3, seed=3)
    expected, gap = reference(model, family, bank.mlp, driver)
    assert gap > 1e-5
    torch._dynamo.reset()
    got = polar_logits(compiled(model, {"routers": bank}), driver)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    dense = polar_logits(model.forward, driver)
    assert (got - dense).abs().max() > 1e-3  # the reference really is sparse here
    report = polar_compile.explain(model, **driver.decode_inputs(driver.prefill()), options={"routers": bank})
    assert [(s.layer, s.rewritten) for s in report.sites_of("mlp")] == [(0, True), (1, True)]

def test_a_fused_gate_up_projection_with_a_bias_cuts_both_in_halves():
    """Phi-3's gate_up_proj given a bias (the stock one has none): each half of the bias goes with its half of the
    weight rows."""
    model = relu_model("phi3", relu=True)
    generator = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        fused = layer.mlp.gate_up_proj
        biased = torch.nn.Linear(fused.in_features, fused.out_features, bias=True)
        with torch.no_grad():
            biased.weight.copy_(fused.weight)
            biased.bias.copy_(torch.randn(fused.out_features, generator=generator) * 0.5)
        layer.mlp.gate_up_proj = biased
    bank = mlp_bank(model, seed=3, topk={4: 0.3})
    driver = driver_for(model, 2, seed=3)
    expected, gap = reference(model, "phi3", bank.mlp, driver)
    assert gap > 1e-6
    torch._dynamo.reset()
    torch.testing.assert_close(polar_logits(compiled(model, {"routers": bank}), driver), expected, rtol=1e-4,
                               atol=1e-4)
    report = polar_compile.explain(model, **driver.decode_inputs(driver.prefill()), options={"routers": bank})
    assert [s.rewritten for s in report.sites_of("mlp")] == [True, True]


@pytest.mark.parametrize("seed", [0, 1])
def test_squared_relu_squares_the_gathered_neurons(seed):
    """Nemotron's square(relu(up(x))): the rewritten MLP squares the kept neurons (the masked reference)."""
    torch._dynamo.reset()
    model = relu_model("nemotron", relu=True)
    bank = mlp_bank(model, seed, topk={3: 0.3})
    driver = driver_for(model, 3, seed)
    expected, gap = reference(model, "nemotron", bank.mlp, driver)
    assert gap > 1e-5
    torch.testing.assert_close(polar_logits(compiled(model, {"routers": bank}), driver), expected, rtol=1e-4, atol=1e-4)
    report = polar_compile.explain(model, **driver.decode_inputs(driver.prefill()), options={"routers": bank})
    assert [(s.rewritten, s.kept) for s in report.sites_of("mlp")] == [(True, bank.mlp.k_for(0, 3))] * 2


def test_every_neuron_kept_is_the_dense_model():
    model = relu_model("opt", relu=True)
    bank = mlp_bank(model, topk={8: 1.0})
    driver = driver_for(model, 3)
    with torch.no_grad():
        dense = model(**driver.decode_inputs(driver.prefill())).logits
    torch._dynamo.reset()
    torch.testing.assert_close(polar_logits(compiled(model, {"routers": bank}), driver), dense, rtol=1e-5, atol=1e-5)


def test_reattached_tables_and_batch_sizes_recompile_without_a_reset():
    torch._dynamo.reset()
    family = "llama"
    model = relu_model(family, relu=True)
    banks = [mlp_bank(model, seed, first_layer=1, topk=table)
             for seed, table in ((0, {2: 0.2, 8: 0.5}), (1, {2: 0.6, 8: 0.3}), (2, {2: 0.2, 8: 0.5}))]
    step = compiled(model)
    for bank in banks:
        polar_compile.attach(model, bank)
        for batch in (2, 3):  # rows 2 and 8 of the table
            driver = driver_for(model, batch, seed=batch)
            expected, gap = reference(model, family, bank.mlp, driver)
            assert gap > 1e-6
            torch.testing.assert_close(polar_logits(step, driver), expected, rtol=1e-4, atol=1e-4)
    polar_compile.detach(model)
    driver = driver_for(model, 2)
    with torch.no_grad():
        dense = model(**driver.decode_inputs(driver.prefill())).logits
    torch.testing.assert_close(polar_logits(step, driver), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mlps_stay_dense_with_the_reason(family):
    model = relu_model(family, relu=True)
    bank = mlp_bank(model, first_layer=1, topk={2: 0.5})
    cases = {1: "", 3: "the bank's k table keeps every neuron of layer 1 at batch size 3 (dense)"}
    for batch, reason in cases.items():
        driver = driver_for(model, batch)
        report = polar_compile.explain(model, **driver.decode_inputs(driver.prefill()), options={"routers": bank})
        assert [(s.layer, s.reason) for s in report.sites_of("mlp")] == [(0, "no MLP router for layer 0"),
                                                                          (1, reason)]
    other = relu_model(family, relu=False)
    driver = driver_for(other, 2)
    report = polar_compile.explain(other, **driver.decode_inputs(driver.prefill()))
    assert all("has no exact zeros" in s.reason for s in report.sites_of("mlp"))


def test_a_bank_for_another_mlp_width_is_refused_naming_it():
    model = relu_model("opt", relu=True)  # ffn 64
    bank = random_routers(model, first_layer=1, mlp_rank=8)
    wide = MlpRouters(8, {1: bank.mlp.w_in[1]}, {1: torch.randn(128, 8)}, {1: (None, 16)})
    wrong = RouterBank(bank.shape, bank.weights, bank.biases, mlp=wide)
    driver = driver_for(model, 2)
    with pytest.raises(RouterBankError, match=r"ffn\) is 128 in the bank, 64 in the model"):
        polar_compile.attach(model, wrong)
    step = torch.compile(model.forward, backend=polar_compile.make_backend(wrong, inductor=False), fullgraph=True)
    with pytest.raises(Exception, match=r"layer 1 .*MLP router is in \[8, 32\], out \[128, 8\]"):
        polar_logits(step, driver)


def test_k_past_the_break_even_stays_dense_with_the_reason(monkeypatch):
    seen = []

    def break_even(self, device_type, batch, weight_bytes):
        seen.append((device_type, batch, weight_bytes))
        return 0.4

    monkeypatch.setattr(PolarConfig, "mlp_break_even", break_even)
    model = relu_model("llama", relu=True)  # gated: 3 matrices of hidden 32 x ffn 64, fp32
    bank = mlp_bank(model, first_layer=0, topk={2: [16, 32]})
    driver = driver_for(model, 2)
    report = polar_compile.explain(model, **driver.decode_inputs(driver.prefill()), options={"routers": bank})
    assert [(s.layer, s.rewritten, s.reason) for s in report.sites_of("mlp")] == [
        (0, True, ""),
        (1, False, "k=32 of 64 neurons at batch size 2 is past the gather kernels' break-even density 0.4: dense is "
                   "faster")]
    assert seen == [("cpu", 2, 3 * 32 * 64 * 4)] * 2


# the transposed copy: OPT's and Falcon's down weight (Falcon's read through its graph's weight.T), GPT-2's up weight
@pytest.mark.parametrize("family", ["opt", "gpt2", "falcon"])
def test_weights_changed_in_place_after_compiling_are_read_by_the_next_call(family):
    model = relu_model(family, relu=True)
    bank = mlp_bank(model, first_layer=0, topk={2: 0.5})
    step = compiled(model, {"routers": bank})
    driver = driver_for(model, 2)
    torch.testing.assert_close(polar_logits(step, driver), reference(model, family, bank.mlp, driver)[0],
                               rtol=1e-4, atol=1e-4)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # what load_state_dict or an optimizer step does: the same tensors, new values
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter.std())
    expected, gap = reference(model, family, bank.mlp, driver)
    assert gap > 1e-6
    torch.testing.assert_close(polar_logits(step, driver), expected, rtol=1e-4, atol=1e-4)

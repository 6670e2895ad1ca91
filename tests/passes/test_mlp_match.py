"""The MLP half of the matcher: ReLU MLPs (plain and gated) found by structure in Dynamo and export graphs of stock
HF models; other activations recorded dense with the reason; numbers untouched."""

import pytest
import torch
import transformers

import polar_compile
from polar_compile.passes.match_mlp import find_mlp_sites
from tests.models import DecodeDriver, TinySpec, tiny_config, tiny_model

LAYERS = 2
# family -> (how its config turns ReLU on, its MLP is gated, its ffn width)
RELU = {
    "opt": ({}, False, 64),
    "gpt2": ({"activation_function": "relu"}, False, 128),
    "gpt_neox": ({"hidden_act": "relu"}, False, 64),
    "llama": ({"hidden_act": "relu"}, True, 64),
    "mistral": ({"hidden_act": "relu"}, True, 64),
    "phi": ({"hidden_act": "relu"}, False, 64),
    "phi3": ({"hidden_act": "relu"}, True, 64),  # gate and up: the two halves of one fused projection
    "falcon": ({"activation": "relu"}, False, 128),  # projections are x @ weight.T
    "nemotron": ({"hidden_act": "relu2"}, False, 64),  # squared ReLU: square(relu(up(x))), its default
    "qwen2": ({"hidden_act": "relu"}, True, 64),
    "gemma": ({"hidden_act": "relu"}, True, 64),
    "glm": ({"hidden_act": "relu"}, True, 64),  # gate and up fused, as Phi-3
    "starcoder2": ({"hidden_act": "relu"}, False, 64),
    "gpt_bigcode": ({"activation_function": "relu"}, False, 128),
}
SQUARED = ("nemotron",)  # their activation is relu2
OTHER = {"llama": "silu", "gpt_neox": "gelu", "gpt2": "add+mul+pow+tanh", "falcon": "gelu", "phi3": "silu"}


def relu_model(family: str, relu: bool) -> torch.nn.Module:
    spec = TinySpec(family, heads=4, kv_heads=2 if family in ("llama", "mistral") else 4, head_dim=8, layers=LAYERS)
    if not relu:
        return tiny_model(spec)
    config = tiny_config(spec)
    for name, value in RELU[family][0].items():
        setattr(config, name, value)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def dynamo_mlp_sites(fn, *args, **kwargs) -> list[list]:
    """The MLP sites of every graph Dynamo traces from one call of ``fn`` (no grad, after a reset)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(find_mlp_sites(gm))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=capture)(*args, **kwargs)
    return graphs


def decode_report(model):
    driver = DecodeDriver(model, batch=2, prompt_len=3, max_cache_len=8, pad=[1, 0])
    return polar_compile.explain(model, **driver.decode_inputs(driver.prefill())), driver


@pytest.mark.parametrize("family", RELU)
def test_relu_mlps_are_found_in_every_decoder_layer(family):
    model = relu_model(family, relu=True)
    report, driver = decode_report(model)
    _, gated, ffn = RELU[family]
    sites = report.sites_of("mlp")
    assert [(s.layer, s.kind, s.units) for s in sites] == [(layer, "decode", ffn) for layer in range(LAYERS)]
    assert all(s.reason == f"no MLP router for layer {s.layer}" for s in sites)

    (found,) = dynamo_mlp_sites(model.forward, **driver.decode_inputs(driver.prefill()))
    assert [(s.has_exact_zeros, s.gate is not None, s.ffn_size, s.hidden_size) for s in found] == [(True, gated, ffn, 32)] * 2


@pytest.mark.parametrize("family", OTHER)
def test_other_activations_stay_dense_and_say_which(family):
    report, _ = decode_report(relu_model(family, relu=False))
    reasons = [s.reason for s in report.sites_of("mlp")]
    assert reasons == [f"activation {OTHER[family]} has no exact zeros (only ReLU MLPs are sparsified)"] * LAYERS


def test_prefill_mlps_are_prefill_and_numbers_are_untouched():
    model = relu_model("opt", relu=True)
    driver = DecodeDriver(model, batch=2, prompt_len=5, max_cache_len=8)
    cache = transformers.StaticCache(config=model.config, max_cache_len=8)
    report = polar_compile.explain(model, **driver._inputs(driver.prompt, cache, 0))
    assert [(s.kind, s.reason) for s in report.sites_of("mlp")] == [
        ("prefill", "prefill: only decode steps are sparsified")] * LAYERS
    torch._dynamo.reset()
    step = torch.compile(model.forward, backend=polar_compile.make_backend(passes=["mlp"], inductor=False),
                         fullgraph=True)
    with torch.no_grad():
        expected = model(**driver.decode_inputs(driver.prefill())).logits
        torch.testing.assert_close(step(**driver.decode_inputs(driver.prefill())).logits, expected)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "phi3"])  # transformers' exporter fails on OPT's masking
def test_export_graphs_give_the_same_mlp_sites(family):
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    model = relu_model(family, relu=True)
    model.generation_config.cache_implementation = "static"
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=2, max_cache_len=8)
    program = wrapper.export(input_ids=torch.zeros(2, 1, dtype=torch.long), cache_position=torch.tensor([0]))
    sites = find_mlp_sites(program.module())
    assert [(s.layer, s.activation, s.gate is not None, s.ffn_size) for s in sites] == [
        (layer, "relu2" if family in SQUARED else "relu", RELU[family][1], RELU[family][2]) for layer in range(LAYERS)]


class _Layer(torch.nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.up, self.down, self.activation = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), activation

    def forward(self, x):
        return self.down(self.activation(self.up(x)))


@pytest.mark.parametrize(("activation", "name", "reason"), [
    (torch.relu, "relu", None),
    (lambda h: torch.square(torch.relu(h)), "relu2", None),
    (lambda h: torch.relu(h) ** 2, "relu2", None),
    (lambda h: torch.relu(torch.square(h)), "relu+square", "activation relu+square has no exact zeros"),
    (lambda h: torch.relu(h) ** 3, "pow+relu", "activation pow+relu has no exact zeros"),
    (torch.nn.functional.leaky_relu, "leaky_relu", "activation leaky_relu has no exact zeros"),
])
def test_relu_and_its_square_are_told_from_other_chains_by_their_order(activation, name, reason):
    """Squared ReLU is square(relu(.)), in that order; relu(square(.)) and other chains stay dense, named."""
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([_Layer(activation)])
    model.forward = lambda x: model.layers[0](x)
    ((site,),) = dynamo_mlp_sites(model, torch.randn(2, 8))
    assert site.activation == name and (site.dense_reason is None) == (reason is None)
    assert reason is None or site.dense_reason.startswith(reason)


def test_an_mlp_outside_a_layer_list_has_no_layer():
    model = relu_model("llama", relu=True)
    (sites,) = dynamo_mlp_sites(model.model.layers[0].mlp, torch.randn(2, 1, 32))
    assert [(s.layer, s.dense_reason) for s in sites] == [
        (None, "not inside an item of a module list (a decoder layer), so it has no layer index for a router")]

"""Models that are not plain transformer decoders: hybrids (attention in some layers only), state-space models,
encoder-decoders, and SDPA calls that are not a decoder layer's own self-attention.

References are the test's own: which layers have attention comes from how each config below is built (and from
the modules each layer holds), NLLs from the plain model's forward and from hooks on the HF attention modules.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from polar_compile.calibrate import FeatureStore, calibrate, collect
from polar_compile.evaluate import Evaluator, evaluate
from polar_compile.instrument import InstrumentError, attention_layers
from polar_compile.routers import ModelShape, RouterBank, RouterBankError, kept_units
from tests.calib_models import LLAMA, random_windows
from tests.models import VOCAB, tiny_model

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8, mamba_expand=2)
# family -> (config class, what differs from COMMON, the attention layers that makes); every one runs on the CPU
# with transformers' PyTorch fallbacks of the Mamba / conv / linear-attention kernels
HYBRIDS = {
    "bamba": ("BambaConfig", dict(attn_layer_indices=[1, 3], **MAMBA2), [1, 3]),
    "jamba": ("JambaConfig", dict(attn_layer_period=2, attn_layer_offset=1, num_experts=1, expert_layer_period=1,
                                  expert_layer_offset=0, mamba_d_state=8, mamba_dt_rank=4, mamba_expand=2), [1, 3]),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(layer_types=["mamba", "attention", "mamba", "attention"],
                                                        num_local_experts=2, num_experts_per_tok=1, **MAMBA2), [1, 3]),
    "lfm2": ("Lfm2Config", dict(full_attn_idxs=[1, 3]), [1, 3]),
    "lfm2_moe": ("Lfm2MoeConfig", dict(layer_types=["conv", "full_attention", "conv", "full_attention"], num_experts=2,
                                       num_experts_per_tok=1, moe_intermediate_size=16, num_dense_layers=1), [1, 3]),
    "qwen3_next": ("Qwen3NextConfig", dict(
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"], head_dim=8,
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16), [1, 3]),
    "falcon_h1": ("FalconH1Config", dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1,
                                         mamba_d_state=8, mamba_chunk_size=8, head_dim=8), [0, 1, 2, 3]),
    "nemotron_h": ("NemotronHConfig", dict(layers_block_type=["mamba", "attention", "mamba", "attention"],
                                           mamba_num_heads=4, mamba_head_dim=8, n_groups=1, ssm_state_size=8,
                                           chunk_size=8, head_dim=8), [1, 3]),
    "minimax": ("MiniMaxConfig", dict(
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"], head_dim=8,
        num_local_experts=2, num_experts_per_tok=1, block_size=8), [1, 3]),
    # its attention layers run one shared block on [hidden state, embeddings]: twice hidden_size wide
    "zamba2": ("Zamba2Config", dict(layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], mamba_d_state=8,
                                    mamba_headdim=8, mamba_ngroups=1, n_mamba_heads=8, use_mem_rope=False,
                                    num_mem_blocks=1, chunk_size=8, use_shared_attention_adapter=False), [1, 3]),
}
# the families calibrated and evaluated end to end (a compile each): four mixers, parallel and sequential hybrids
ROUTED = ["bamba", "lfm2", "qwen3_next", "falcon_h1", "nemotron_h"]


def tiny_hybrid(family: str, seed: int = 0, **changes) -> nn.Module:
    """A random-weight fp32 model of ``family`` (HYBRIDS) with SDPA attention, in eval mode."""
    torch.manual_seed(seed)
    name, differences, _ = HYBRIDS[family]
    config = getattr(transformers, name)(**{**COMMON, **differences, **changes})
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # as tests.models.tiny_model: larger weights make heads differ visibly
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3 / parameter.shape[1] ** 0.25)
    return model


def attention_projections(model: nn.Module) -> dict[int, tuple[nn.Module, nn.Module]]:
    """Per layer that holds an attention module, its (query projection, output projection): found by names."""
    found = {}
    for layer, module in enumerate(model.model.layers):
        for name, child in module.named_modules():
            if name.split(".")[-1] == "q_proj":
                parent = module.get_submodule(name.rpartition(".")[0])
                found[layer] = (child, getattr(parent, "o_proj", None) or parent.out_proj)
    return found


def plain_nll(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")


def gated_nll(model: nn.Module, windows: torch.Tensor, bank: RouterBank, density: float) -> torch.Tensor:
    """Per-token NLL with each routed layer's output projection seeing zeros for the heads of the units outside
    the top-k of ``bank``'s router scores on the query projection's input."""
    shape = bank.shape
    group, k = shape.num_heads // shape.num_kv_heads, kept_units(density, shape.num_kv_heads)
    inputs, handles = {}, []
    for layer, (q_proj, o_proj) in attention_projections(model).items():
        if layer not in bank.weights:
            continue

        def save(module, args, layer=layer):
            inputs[layer] = args[0]

        def gate(module, args, layer=layer):
            heads = args[0].unflatten(-1, (shape.num_heads, -1))  # [B, T, H, D]
            scores = inputs[layer] @ bank.weights[layer].T + bank.biases[layer]  # [B, T, units]
            keep = torch.zeros_like(scores).scatter(-1, scores.topk(k, dim=-1).indices, 1.0)
            return (heads * keep.repeat_interleave(group, -1)[..., None]).flatten(-2)

        handles += [q_proj.register_forward_pre_hook(save), o_proj.register_forward_pre_hook(gate)]
    try:
        return plain_nll(model, windows)
    finally:
        for handle in handles:
            handle.remove()


def random_bank(model: nn.Module, layers: list[int], seed: int = 0) -> RouterBank:
    generator = torch.Generator().manual_seed(seed)
    shape = ModelShape.of(model)
    weights = {layer: torch.randn(shape.num_kv_heads, shape.hidden_size, generator=generator) for layer in layers}
    biases = {layer: 0.1 * torch.randn(shape.num_kv_heads, generator=generator) for layer in layers}
    return RouterBank(shape, weights, biases)


@pytest.mark.parametrize("family", HYBRIDS)
def test_the_config_names_the_attention_layers_of_every_hybrid(family):
    model = tiny_hybrid(family)
    expected = HYBRIDS[family][2]
    assert sorted(attention_projections(model)) == expected  # the layers that hold an attention module
    assert attention_layers(model) == expected


@pytest.mark.parametrize("family", ROUTED)
def test_features_are_collected_for_the_attention_layers_only(family, tmp_path):
    model = tiny_hybrid(family, seed=1)
    windows = random_windows(3, 8, seed=2)
    store = FeatureStore(tmp_path, range(4), 3 * 8, ModelShape.of(model))
    instrumented = collect(model, windows, store, per_window=8, batch_size=3, progress=False)
    attention = HYBRIDS[family][2]
    assert store.layers == instrumented.layers == attention and instrumented.skipped == []
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(f"{kind}{layer}.npy" for layer in attention
                                                                      for kind in "nx")
    captured, handles = {}, []
    for layer, (q_proj, _) in attention_projections(model).items():
        handles.append(q_proj.register_forward_pre_hook(lambda m, args, layer=layer: captured.update({layer: args[0]})))
    plain_nll(model, windows)
    for handle in handles:
        handle.remove()
    for layer in attention:
        torch.testing.assert_close(store.load(layer)[0], captured[layer].flatten(0, 1), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("family", ROUTED)
def test_evaluation_gates_the_attention_layers_and_is_the_plain_model_when_dense(family):
    model = tiny_hybrid(family, seed=3)
    attention = HYBRIDS[family][2]
    bank = random_bank(model, [layer for layer in attention if layer != 0], seed=4)
    windows = random_windows(3, 10, seed=5)
    evaluator = Evaluator(model, bank, batch_size=3, progress=False)
    plain = plain_nll(model, windows)
    for method in ("dense", "oracle", "routers"):
        torch.testing.assert_close(evaluator.token_nll(windows, evaluator.sparsity(method, 1.0)), plain,
                                   rtol=1e-5, atol=1e-5)
    routed = evaluator.token_nll(windows, evaluator.sparsity("routers", 0.5))
    torch.testing.assert_close(routed, gated_nll(model, windows, bank, 0.5), rtol=1e-4, atol=1e-4)
    assert (routed - plain).abs().max() > 1e-2  # the routers really dropped units


def test_calibrating_a_hybrid_routes_its_attention_layers_and_evaluates_as_the_plain_model():
    model = tiny_hybrid("bamba", seed=6)
    bank = calibrate(model, random_windows(4, 8, seed=7), seq_len=8, heldout=0.25, steps=5, progress=False)
    assert bank.layers == [1, 3] and bank.densities == {1: 0.5, 3: 0.5}  # dense_layers=(0,): layer 0, Mamba here
    assert bank.provenance["attention_layers"] == [1, 3] and bank.provenance["skipped_sites"] == []
    windows = random_windows(4, 12, seed=8)
    report = evaluate(model, windows, [1.0, 0.5], bank, batch_size=4, prompts=0, progress=False)
    assert report.perplexity["routers", 1.0] == pytest.approx(plain_nll(model, windows).double().mean().exp().item(),
                                                              rel=1e-5)
    assert report.perplexity["routers", 0.5] != report.perplexity["routers", 1.0]
    with pytest.raises(RouterBankError, match=r"^nothing to route: the attention layers \[1, 3\] are all in "
                                              r"dense_layers \[1, 3\]$"):
        calibrate(model, random_windows(4, 8), seq_len=8, dense_layers=(1, 3), progress=False)


def test_an_attention_layer_without_sdpa_is_named_and_the_other_layers_are_not():
    model = tiny_hybrid("lfm2")
    attention = model.model.layers[3].self_attn
    attention.config = type(model.config).from_dict(model.config.to_dict())
    attention.config._attn_implementation = "eager"  # HF reads it per module at each call
    with pytest.raises(InstrumentError, match=(
        r"^Lfm2ForCausalLM \(model_type 'lfm2'\): the attention hook did not run for attention layers \[3\] "
        r"\(config\.layer_types marks them as attention\): the matcher found no scaled_dot_product_attention call "
        r"there \(is the model loaded with attn_implementation='sdpa'\?\)$")):
        calibrate(model, random_windows(4, 8), seq_len=8, progress=False)


def test_shared_attention_on_a_wider_input_is_named():
    with pytest.raises(InstrumentError, match=(
        r"layer 1 \(model\.layers\.1\.shared_transformer\.self_attn\): the router input \(the query projection's "
        r"input\) is 64 wide, but the model config gives hidden_size 32; routers sized from the config would not "
        r"fit this graph")):
        calibrate(tiny_hybrid("zamba2"), random_windows(4, 8), seq_len=8, progress=False)


def test_a_bank_that_routes_a_layer_without_attention_is_refused():
    model = tiny_hybrid("lfm2")
    evaluator = Evaluator(model, random_bank(model, [1, 2, 3]), progress=False)
    with pytest.raises(RouterBankError, match=r"^router bank has routers for layers \[2\], where the model has no "
                                              r"attention site to route \(its attention layers: \[1, 3\]\)"):
        evaluator.token_nll(random_windows(2, 8), evaluator.sparsity("routers", 0.5))


NO_ATTENTION = (r"^{model} \(model_type '{type}'\) has no attention the matcher can route: its config's layer_types "
                r"mark no layer as attention \(only 'linear_attention'\), and routers go on "
                r"scaled_dot_product_attention calls owned by a decoder layer's attention module$")


@pytest.mark.parametrize(("config", "model_type"), [
    (transformers.MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=4), "mamba"),
    (transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_heads=4, head_dim=8,
                               n_groups=1, state_size=8, chunk_size=8), "mamba2"),
])
def test_a_state_space_model_has_no_attention_to_route(config, model_type):
    model = AutoModelForCausalLM.from_config(config).eval()
    message = NO_ATTENTION.format(model=type(model).__name__, type=model_type)
    with pytest.raises(InstrumentError, match=message):
        calibrate(model, random_windows(4, 8), seq_len=8, progress=False)
    with pytest.raises(InstrumentError, match=message):
        evaluate(model, random_windows(2, 8), [1.0], progress=False)


def test_a_model_without_attention_in_its_config_or_graph_is_named():
    rwkv = transformers.RwkvForCausalLM(transformers.RwkvConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, attention_hidden_size=16, intermediate_size=32)).eval()
    with pytest.raises(RouterBankError, match=r"^RwkvForCausalLM .* has no attention heads in its config: looked for "
                                              r"'num_attention_heads'"):
        calibrate(rwkv, random_windows(4, 8), seq_len=8, progress=False)
    rwkv.config.num_attention_heads = 4  # heads in the config, none in the graph: the matcher says so
    with pytest.raises(InstrumentError, match=(
        r"^RwkvForCausalLM \(model_type 'rwkv'\) has no attention the matcher can route: it routes "
        r"scaled_dot_product_attention calls owned by a decoder layer's attention module, and its graph has no "
        r"scaled_dot_product_attention call$")):
        calibrate(rwkv, random_windows(4, 8), seq_len=8, progress=False)


def test_an_encoder_decoder_model_is_refused_with_the_reason():
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=4, encoder_ffn_dim=16,
                                     decoder_ffn_dim=16, max_position_embeddings=32)
    bart = transformers.BartForConditionalGeneration(config).eval()
    for what, run in (("calibrate", lambda: calibrate(bart, random_windows(4, 8), seq_len=8, progress=False)),
                      ("evaluate", lambda: Evaluator(bart))):
        with pytest.raises(InstrumentError, match=(
            rf"^{what} supports decoder-only models; BartForConditionalGeneration \(model_type 'bart'\) is "
            rf"encoder-decoder: its decoder needs decoder inputs beside the encoder's, which {what} on token "
            "windows does not give$")):
            run()


class CrossAttendingMLP(nn.Module):
    """A decoder layer's MLP followed by attention over a fixed memory: an SDPA call inside the layer that is not
    its self-attention (its K/V are parameters, as cross-attention's are the encoder's)."""

    def __init__(self, mlp: nn.Module, heads: int, head_dim: int) -> None:
        super().__init__()
        self.mlp, self.heads = mlp, heads
        self.memory = nn.Parameter(torch.randn(1, heads, 5, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)  # [B, T, hidden]
        query = out.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, T, D]
        memory = self.memory.expand(len(x), -1, -1, -1)
        attended = F.scaled_dot_product_attention(query, memory, memory)
        return out + attended.transpose(1, 2).flatten(-2)


def test_an_sdpa_call_that_is_not_self_attention_is_skipped_and_recorded():
    model = tiny_model(LLAMA, seed=9)
    layer = model.model.layers[1]
    layer.mlp = CrossAttendingMLP(layer.mlp, LLAMA.heads, LLAMA.head_dim)
    bank = calibrate(model, random_windows(4, 8, seed=10), seq_len=8, heldout=0.25, steps=5, progress=False)
    assert bank.layers == [1, 2] and bank.provenance["attention_layers"] == [0, 1, 2]
    [skipped] = bank.provenance["skipped_sites"]
    assert skipped.startswith("model.layers.1.mlp (layer 1): key is not model.layers.1.mlp's own self-attention K/V")
    windows = random_windows(2, 8, seed=11)
    evaluator = Evaluator(model, bank, progress=False)
    torch.testing.assert_close(evaluator.token_nll(windows, evaluator.sparsity("routers", 1.0)),
                               plain_nll(model, windows), rtol=1e-5, atol=1e-5)

"""ModelShape.of: the decoder's self-attention of encoder-decoder models, and models without attention."""

from types import SimpleNamespace

import pytest
import transformers
from torch import nn

from polar_compile import RouterBankError
from polar_compile.routers import ModelShape
from polar_compile.testing import random_routers
from tests.models import TinySpec, tiny_model

HIDDEN, ENCODER_LAYERS, DECODER_LAYERS, ENCODER_HEADS, DECODER_HEADS = 32, 2, 3, 2, 4
TOKENS = dict(vocab_size=97, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
BART_LIKE = dict(d_model=HIDDEN, encoder_layers=ENCODER_LAYERS, decoder_layers=DECODER_LAYERS,
                 encoder_attention_heads=ENCODER_HEADS, decoder_attention_heads=DECODER_HEADS,
                 encoder_ffn_dim=16, decoder_ffn_dim=16, **TOKENS)


def tiny_encoder_decoder(family: str) -> nn.Module:
    """A tiny random encoder-decoder whose encoder and decoder differ in depth (and, but for T5, in heads)."""
    if family == "bart":
        return transformers.BartForConditionalGeneration(transformers.BartConfig(max_position_embeddings=64, **BART_LIKE))
    if family == "marian":
        return transformers.MarianMTModel(transformers.MarianConfig(max_position_embeddings=64, **BART_LIKE))
    if family == "whisper":
        return transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
            num_mel_bins=8, max_source_positions=16, max_target_positions=32, **BART_LIKE))
    if family == "t5":  # one head count for both stacks; d_kv * heads differs from d_model, as in T5-11B
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            d_model=HIDDEN, d_kv=4, d_ff=16, num_layers=ENCODER_LAYERS, num_decoder_layers=DECODER_LAYERS,
            num_heads=DECODER_HEADS, **TOKENS))
    raise ValueError(family)


def decoder_self_attention(model: nn.Module) -> tuple[int, int, int, int]:
    """(layers, heads, hidden, KV heads) of the decoder's self-attention, read from its modules."""
    decoder = model.get_decoder()
    if hasattr(decoder, "block"):  # T5
        attention = decoder.block[0].layer[0].SelfAttention
        return (len(decoder.block), attention.n_heads, attention.q.in_features,
                attention.k.out_features // attention.key_value_proj_dim)
    attention = decoder.layers[0].self_attn
    return (len(decoder.layers), attention.num_heads, attention.q_proj.in_features,
            attention.k_proj.out_features // attention.head_dim)


@pytest.mark.parametrize("family", ["bart", "t5", "whisper", "marian"])
def test_encoder_decoder_models_give_the_decoders_self_attention(family):
    model = tiny_encoder_decoder(family)
    assert len(model.get_encoder().layers if family != "t5" else model.get_encoder().block) == ENCODER_LAYERS
    layers, heads, hidden, kv_heads = decoder_self_attention(model)
    assert (layers, heads, hidden, kv_heads) == (DECODER_LAYERS, DECODER_HEADS, HIDDEN, DECODER_HEADS)
    assert ModelShape.of(model) == ModelShape(family, layers, hidden, heads, kv_heads)
    bank = random_routers(model)
    assert bank.layers == list(range(1, DECODER_LAYERS)) and bank.weights[1].shape == (kv_heads, hidden)


def test_a_nested_decoder_config_gives_the_decoders_shape():
    encoder = transformers.BertConfig(vocab_size=97, hidden_size=HIDDEN, num_hidden_layers=ENCODER_LAYERS,
                                      num_attention_heads=ENCODER_HEADS, intermediate_size=16)
    decoder = transformers.LlamaConfig(vocab_size=97, hidden_size=HIDDEN, num_hidden_layers=DECODER_LAYERS,
                                       num_attention_heads=DECODER_HEADS, num_key_value_heads=2, intermediate_size=16)
    model = nn.Module()
    model.config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    assert ModelShape.of(model) == ModelShape("llama", DECODER_LAYERS, HIDDEN, DECODER_HEADS, 2)


def test_decoder_only_models_are_unchanged():
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=3))
    assert ModelShape.of(model) == ModelShape("llama", 3, 32, 4, 2)


NO_HEADS = r"has no attention heads in its config: looked for 'num_attention_heads'"


def test_a_state_space_model_has_no_heads_to_route():
    mamba = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2,
                                                                   state_size=4))
    message = rf"^MambaForCausalLM \(model_type 'mamba', config MambaConfig\) {NO_HEADS} \(a model without self-attention"
    with pytest.raises(RouterBankError, match=message):
        ModelShape.of(mamba)
    with pytest.raises(RouterBankError, match=message):
        random_routers(mamba)


@pytest.mark.parametrize(("config", "message"), [
    (SimpleNamespace(num_hidden_layers=2, hidden_size=8), NO_HEADS),
    (SimpleNamespace(num_hidden_layers=2, hidden_size=8, num_attention_heads=None), NO_HEADS),
    (SimpleNamespace(hidden_size=8, num_attention_heads=2), r"has no layer count in its config: looked for 'num_hidden_layers'"),
    (SimpleNamespace(num_hidden_layers=2, num_attention_heads=2), r"has no hidden size in its config: looked for 'hidden_size'"),
    (SimpleNamespace(num_hidden_layers=2, hidden_size=8, num_attention_heads="2"),
     r": config\.num_attention_heads must be a positive int, got str '2'"),
    (SimpleNamespace(num_hidden_layers=2, hidden_size=8, num_attention_heads=6, num_key_value_heads=4),
     r": num_heads must be a multiple of num_kv_heads, got num_heads 6 and num_kv_heads 4"),
    (None, r"^Module has no `\.config`; expected a Hugging Face model"),
])
def test_a_config_without_what_routers_need_is_named(config, message):
    model = nn.Module()
    if config is not None:
        model.config = config
    with pytest.raises(RouterBankError, match=message):
        ModelShape.of(model)
    with pytest.raises(RouterBankError, match=message):
        random_routers(model)


@pytest.mark.parametrize("first_layer", [-1, 4, 1.0])
def test_random_routers_first_layer_must_be_a_layer(first_layer):
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=3))
    with pytest.raises(RouterBankError, match=r"first_layer must be an int in 0\.\.3 \(the model has 3 layers\), got"):
        random_routers(model, first_layer=first_layer)

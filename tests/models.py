"""Tiny stock Hugging Face decoders of several families, and a decode-step driver, for the tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GPT2Config,
    GPTBigCodeConfig,
    OPTConfig,
    PretrainedConfig,
    StaticCache,
)

# Families with separate or fused Q/K/V linears and a KV-head count: config class, what differs from its defaults.
LLAMA_LIKE: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "mixtral": ("MixtralConfig", {"sliding_window": None, "num_local_experts": 2}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {"use_sliding_window": False}),
    "gemma": ("GemmaConfig", {}),
    "gemma3_text": ("Gemma3TextConfig", {}),
    "phi": ("PhiConfig", {}),
    "phi3": ("Phi3Config", {}),
    # StableLM's default rotary share, 0.25 of head_dim 4, is 1: HF then builds a query of head_dim 5 against a
    # value of 4, which the matcher rightly keeps dense
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.5}),
    "cohere": ("CohereConfig", {}),
    "granite": ("GraniteConfig", {"attention_multiplier": 0.3}),
    "olmo": ("OlmoConfig", {}),
    "olmo2": ("Olmo2Config", {}),
    "starcoder2": ("Starcoder2Config", {"sliding_window": None}),
    "smollm3": ("SmolLM3Config", {}),
    "glm": ("GlmConfig", {}),
    "helium": ("HeliumConfig", {}),
    "nemotron": ("NemotronConfig", {}),  # LayerNorm1P, partial rotary; its MLP is up -> relu2 -> down
}
# Falcon's new architecture caches K/V broadcast to every head; GPT-BigCode here is its multi_query=False layout
MHA_FAMILIES = ("opt", "gpt2", "gpt_neox", "falcon", "gpt_bigcode")
FAMILIES = (*LLAMA_LIKE, *MHA_FAMILIES)
# Layouts whose attention reads one KV head, which routers cannot use (kept out of FAMILIES)
MULTI_QUERY_FAMILIES = ("falcon_multi_query", "gpt_bigcode_multi_query")
VOCAB = 97


@dataclass(frozen=True)
class TinySpec:
    """The knobs a test draws: family, widths, heads, layers, biases."""

    family: str
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    bias: bool = False

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


def tiny_config(spec: TinySpec) -> PretrainedConfig:
    """A small random-weight config of ``spec.family``."""
    common = dict(vocab_size=VOCAB, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, max_position_embeddings=128)
    if spec.family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads, n_positions=128,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if spec.family in ("gpt_bigcode", "gpt_bigcode_multi_query"):
        return GPTBigCodeConfig(vocab_size=VOCAB, n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads,
                                n_positions=128, multi_query=spec.family.endswith("multi_query"), resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if spec.family == "falcon":  # Falcon-40B/180B layout: fused QKV as `x @ weight.T` (FalconLinear), parallel MLP;
        # fewer KV heads in the projection than in the cache, which holds them broadcast to every head
        return FalconConfig(**common, new_decoder_architecture=True, num_kv_heads=spec.heads // 2, bias=spec.bias,
                            alibi=False, hidden_dropout=0.0, attention_dropout=0.0)
    if spec.family == "falcon_multi_query":  # Falcon-7B layout: one KV head, though num_kv_heads defaults to heads
        return FalconConfig(**common, new_decoder_architecture=False, multi_query=True, bias=spec.bias, alibi=False,
                            hidden_dropout=0.0, attention_dropout=0.0)
    if spec.family == "opt":
        return OPTConfig(**common, ffn_dim=2 * spec.hidden, word_embed_proj_dim=spec.hidden, enable_bias=spec.bias,
                         do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0)
    if spec.family == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, intermediate_size=2 * spec.hidden, attention_bias=spec.bias,
                                          hidden_dropout=0.0, attention_dropout=0.0)
    if spec.family in LLAMA_LIKE:
        name, differences = LLAMA_LIKE[spec.family]
        return getattr(transformers, name)(
            **common, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim, intermediate_size=2 * spec.hidden,
            tie_word_embeddings=False, attention_bias=spec.bias, pad_token_id=None, bos_token_id=None,
            eos_token_id=None, **differences)
    raise ValueError(f"unknown family {spec.family!r}; known: {FAMILIES}")


def tiny_model(spec: TinySpec, seed: int = 0) -> nn.Module:
    """A random-weight fp32 model of ``spec`` in eval mode, with SDPA attention."""
    torch.manual_seed(seed)
    config = tiny_config(spec)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF initialises small; larger weights make heads differ visibly
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3 / parameter.shape[1] ** 0.25)
    return model


_QUERY_PROJECTIONS = ("q_proj", "qkv_proj", "query_key_value", "c_attn")
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj")


def attention_modules(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Per layer, the (query projection, output projection) modules: the test's own knowledge of HF layouts
    (an attention module is one holding both, by these names)."""
    pairs = []
    for module in model.modules():
        query = next((getattr(module, n) for n in _QUERY_PROJECTIONS if hasattr(module, n)), None)
        output = next((getattr(module, n) for n in _OUTPUT_PROJECTIONS if hasattr(module, n)), None)
        if query is not None and output is not None:
            pairs.append((query, output))
    return pairs


class DecodeDriver:
    """Prefills a batch into a fresh ``StaticCache`` eagerly and builds the next decode step's inputs."""

    def __init__(self, model: nn.Module, batch: int, prompt_len: int, max_cache_len: int, pad: list[int] | None = None,
                 seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.model = model
        self.batch, self.prompt_len, self.max_cache_len = batch, prompt_len, max_cache_len
        self.prompt = torch.randint(1, VOCAB, (batch, prompt_len), generator=generator)
        self.next_ids = torch.randint(1, VOCAB, (batch, 1), generator=generator)
        self.attention_mask = torch.ones(batch, prompt_len + 1, dtype=torch.long)
        for row, pad_len in enumerate(pad or []):
            self.attention_mask[row, :pad_len] = 0  # left padding

    def prefill(self) -> StaticCache:
        """A cache holding the prompt, filled by the eager model."""
        cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
        with torch.no_grad():
            self.model(**self._inputs(self.prompt, cache, 0))
        return cache

    def decode_inputs(self, cache: StaticCache) -> dict:
        """Keyword arguments of one decode step after the prompt."""
        return self._inputs(self.next_ids, cache, self.prompt_len)

    def _inputs(self, ids: torch.Tensor, cache: StaticCache, start: int) -> dict:
        length = ids.shape[1]
        mask = self.attention_mask[:, : start + length]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
        return dict(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(start, start + length), position_ids=positions)


@contextmanager
def gated_heads(model: nn.Module, bank, density: float) -> Iterator[None]:
    """Hooks that, at decode steps (one query token), zero before the output projection the heads of the units
    the router did not pick: written from the router tensors alone, with float64 scores."""
    config = model.config
    heads = config.num_attention_heads
    with gated_attention(attention_modules(model), bank, density, heads,
                         getattr(config, "num_key_value_heads", None) or heads):
        yield


@contextmanager
def gated_attention(pairs: list[tuple[nn.Module, nn.Module]], bank, density: float, heads: int,
                    units: int, ranks: int = 1) -> Iterator[None]:
    """:func:`gated_heads` on explicit per-layer (query projection, output projection) pairs (bank layer ``i`` =
    ``pairs[i]``): float64 scores ``x @ W.T + b`` on the query projection's input, top
    ``max(1, round(density * units))`` per sequence, the other units' heads zeroed at decode steps. With ``ranks``
    (tensor parallelism's per-rank routing), each of the ``ranks`` consecutive blocks of ``units / ranks`` units
    keeps its own top ``max(1, round(density * units / ranks))``."""
    local = units // ranks
    keep = max(1, round(density * local))
    captured, handles = {}, []
    for layer, (q_proj, o_proj) in enumerate(pairs):
        if layer not in bank.weights:
            continue
        weight, bias = bank.weights[layer].double(), bank.biases[layer].double()

        def capture(module, args, layer=layer):
            captured[layer] = args[0]

        def gate(module, args, layer=layer, weight=weight, bias=bias):
            z = args[0]  # [B, T, H * D]
            if z.shape[1] != 1:
                return None  # prefill stays dense
            x = captured[layer].double()
            scores = x @ weight.to(x.device).T + bias.to(x.device)  # [B, 1, units]
            blocks = scores.unflatten(-1, (ranks, local))  # [B, 1, ranks, units / ranks]
            chosen = torch.zeros_like(blocks).scatter(-1, blocks.topk(keep, dim=-1).indices, 1.0).flatten(-2)
            head_mask = chosen.repeat_interleave(heads // units, dim=-1)  # [B, 1, H]
            z = z.view(*z.shape[:-1], heads, -1) * head_mask[..., None].to(z.dtype)
            return (z.flatten(-2),)

        handles += [q_proj.register_forward_pre_hook(capture), o_proj.register_forward_pre_hook(gate)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

"""Tiny stock Hugging Face encoder-decoder models, a decode-step driver and the decoder self-attention reference.

Only the decoder's self-attention is routed; cross-attention and the encoder stay dense. In the decode-step graph
(transformers 5.24, ``EncoderDecoderCache`` of two ``StaticCache``) every decoder layer has two SDPA calls: the
self-attention's (``...decoder.layers.i.self_attn``, K/V = the self-attention cache buffers, written in the graph by
``index_copy_`` from the module's own k/v projections of the query projection's input, mask ``[B, 1, 1, max_len]``)
and the cross-attention's (``...decoder.layers.i.encoder_attn``, K/V = the cross-attention cache buffers, not
written in the graph at all, mask ``[B, 1, 1, source_len]`` or None).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoModelForSpeechSeq2Seq,
    EncoderDecoderCache,
    PretrainedConfig,
    StaticCache,
)

from polar_compile.routers import ModelShape, RouterBank
from tests.models import VOCAB, gated_attention

# BART's layout (q_proj/k_proj/v_proj/out_proj, `self_attn` and `encoder_attn`): family -> config class
BART_LIKE = {
    "bart": "BartConfig",
    "mbart": "MBartConfig",
    "marian": "MarianConfig",
    "pegasus": "PegasusConfig",
    "m2m_100": "M2M100Config",
    "blenderbot": "BlenderbotConfig",
}
# Decoder self- and cross-attention through SDPA with a [B, 1, 1, L] mask (Whisper's cross-attention: no mask)
SEQ2SEQ_FAMILIES = (*BART_LIKE, "whisper")
# SDPA too, but T5 folds its relative position bias into a per-head float mask [B, H, 1, L]: dense by design
PER_HEAD_MASK_FAMILIES = ("t5",)
FIRST_TOKEN = 3  # ids below are pad / bos / eos


def tiny_seq2seq_config(family: str, *, heads: int = 4, head_dim: int = 8, layers: int = 3, encoder_heads: int = 2,
                        encoder_layers: int = 2) -> PretrainedConfig:
    """A small config of ``family``: a decoder of ``layers`` layers and ``heads`` heads, width ``heads * head_dim``,
    and an encoder of other depth and heads (so a test can tell them apart). T5 shares heads and, for its
    ``StaticCache``, depth between encoder and decoder: there ``encoder_heads`` and ``encoder_layers`` are ignored."""
    width = heads * head_dim
    if family in BART_LIKE or family == "whisper":
        common = dict(vocab_size=VOCAB, d_model=width, decoder_layers=layers, decoder_attention_heads=heads,
                      encoder_layers=encoder_layers, encoder_attention_heads=encoder_heads, encoder_ffn_dim=2 * width,
                      decoder_ffn_dim=2 * width, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
        if family == "whisper":
            return transformers.WhisperConfig(**common, num_mel_bins=8, max_source_positions=6,
                                              max_target_positions=64)
        return getattr(transformers, BART_LIKE[family])(**common, max_position_embeddings=64)
    if family == "t5":
        # T5's decoder StaticCache takes its depth from num_layers (the encoder's), so the two must agree
        return transformers.T5Config(vocab_size=VOCAB, d_model=width, d_kv=head_dim, d_ff=2 * width, num_layers=layers,
                                     num_decoder_layers=layers, num_heads=heads, dropout_rate=0.0, pad_token_id=0,
                                     eos_token_id=2, decoder_start_token_id=0)
    raise ValueError(f"unknown family {family!r}; known: {(*SEQ2SEQ_FAMILIES, *PER_HEAD_MASK_FAMILIES)}")


def tiny_seq2seq(family: str, *, heads: int = 4, head_dim: int = 8, layers: int = 3, encoder_heads: int = 2,
                 encoder_layers: int = 2, seed: int = 0) -> nn.Module:
    """A random-weight fp32 encoder-decoder of ``family`` (see :func:`tiny_seq2seq_config`) in eval mode, SDPA
    attention, matrices drawn like :func:`tests.models.tiny_model` so heads differ visibly."""
    torch.manual_seed(seed)
    config = tiny_seq2seq_config(family, heads=heads, head_dim=head_dim, layers=layers, encoder_heads=encoder_heads,
                                 encoder_layers=encoder_layers)
    config._attn_implementation = "sdpa"
    auto = AutoModelForSpeechSeq2Seq if family == "whisper" else AutoModelForSeq2SeqLM
    model = auto.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3 / parameter.shape[1] ** 0.25)
    return model


def decoder_self_attention(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Per decoder layer, the (query projection, output projection) of its SELF-attention, never cross-attention:
    the test's own knowledge of HF layouts (``layers.i.self_attn.{q_proj,out_proj}``;
    T5 ``block.i.layer.0.SelfAttention.{q,o}``)."""
    pairs = []
    for name, module in model.get_decoder().named_modules():
        if name.endswith(".self_attn"):
            pairs.append((module.q_proj, module.out_proj))
        elif name.endswith(".SelfAttention"):
            pairs.append((module.q, module.o))
    return pairs


class Seq2SeqDecodeDriver:
    """Runs the encoder once, prefills the decoder eagerly into a static ``EncoderDecoderCache`` and builds the
    inputs of ``steps`` one-token decode steps (teacher-forced random tokens).

    ``pad`` left-pads the decoder prompt per row; ``source_pad`` the encoder input (not for Whisper, whose
    encoder takes no mask).
    """

    def __init__(self, model: nn.Module, batch: int, *, source_len: int = 6, prompt_len: int = 3,
                 max_cache_len: int = 12, steps: int = 1, pad: list[int] | None = None,
                 source_pad: list[int] | None = None, seed: int = 0) -> None:
        if steps < 1 or prompt_len + steps > max_cache_len:
            raise ValueError(f"prompt {prompt_len} + {steps} steps do not fit a cache of {max_cache_len}")
        generator = torch.Generator().manual_seed(seed)
        self.model, self.prompt_len, self.max_cache_len, self.steps = model, prompt_len, max_cache_len, steps
        config = model.config
        self.source_mask: torch.Tensor | None = None
        if model.main_input_name == "input_features":  # Whisper: log-mel features, fixed length
            if source_pad:
                raise ValueError("Whisper's encoder takes no attention mask; source_pad must be empty")
            frames = 2 * config.max_source_positions
            encoder_inputs = {"input_features": torch.randn(batch, config.num_mel_bins, frames, generator=generator)}
        else:
            self.source_mask = _left_padded_mask(batch, source_len, source_pad)
            source = torch.randint(FIRST_TOKEN, VOCAB, (batch, source_len), generator=generator)
            encoder_inputs = {"input_ids": source, "attention_mask": self.source_mask}
        with torch.no_grad():
            self.encoder_outputs = (model.get_encoder()(**encoder_inputs).last_hidden_state,)
        self.prompt = torch.randint(FIRST_TOKEN, VOCAB, (batch, prompt_len), generator=generator)
        self.next_ids = torch.randint(FIRST_TOKEN, VOCAB, (batch, steps), generator=generator)
        self.decoder_mask = _left_padded_mask(batch, prompt_len + steps, pad)

    def new_cache(self) -> EncoderDecoderCache:
        """An empty cache as ``generate(cache_implementation="static")`` builds it: static self-attention cache of
        ``max_cache_len``, static cross-attention cache of the encoder output's length."""
        decoder_config = self.model.config.get_text_config(decoder=True)
        return EncoderDecoderCache(
            StaticCache(config=decoder_config, max_cache_len=self.max_cache_len),
            StaticCache(config=decoder_config, max_cache_len=self.encoder_outputs[0].shape[1]),
        )

    def prefill(self) -> EncoderDecoderCache:
        """A cache holding the decoder prompt (self-attention) and the encoder K/V (cross-attention)."""
        cache = self.new_cache()
        with torch.no_grad():
            self.model(**self._inputs(self.prompt, cache, 0))
        return cache

    def decode_inputs(self, cache: EncoderDecoderCache, step: int = 0) -> dict:
        """Keyword arguments of decode step ``step`` (0-based): one token at decoder position ``prompt_len + step``."""
        return self._inputs(self.next_ids[:, step: step + 1], cache, self.prompt_len + step)

    def run(self, step: Callable[..., Any]) -> list[torch.Tensor]:
        """Prefill a fresh cache, then every decode step through ``step`` (the model or its compiled forward); the
        ``[B, 1, vocab]`` logits of each step."""
        cache = self.prefill()
        with torch.no_grad():
            return [step(**self.decode_inputs(cache, index)).logits for index in range(self.steps)]

    def reference(self, bank: RouterBank, density: float) -> list[torch.Tensor]:
        """:meth:`run` of the eager model under :func:`gated_decoder_self_attention`."""
        with gated_decoder_self_attention(self.model, bank, density):
            return self.run(self.model)

    def _inputs(self, ids: torch.Tensor, cache: EncoderDecoderCache, start: int) -> dict:
        inputs = dict(encoder_outputs=self.encoder_outputs, decoder_input_ids=ids, past_key_values=cache,
                      decoder_attention_mask=self.decoder_mask[:, : start + ids.shape[1]].contiguous(),
                      use_cache=True)
        if self.source_mask is not None:
            inputs["attention_mask"] = self.source_mask
        return inputs


def _left_padded_mask(batch: int, length: int, pad: list[int] | None) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad_len in enumerate(pad or []):
        mask[row, :pad_len] = 0
    return mask


@contextmanager
def gated_decoder_self_attention(model: nn.Module, bank: RouterBank, density: float) -> Iterator[None]:
    """:func:`tests.models.gated_heads` on the decoder's self-attention only (:func:`decoder_self_attention`; bank
    layer ``i`` = decoder layer ``i``); cross-attention and the encoder are left alone."""
    heads = ModelShape.of(model).num_heads  # the decoder's (MHA: units = heads)
    with gated_attention(decoder_self_attention(model), bank, density, heads, heads):
        yield

"""Tiny sliding-window decoders (Mistral, Gemma-3 text) and a multi-step decode driver that runs past the window.

What transformers 5.24 does with a ``StaticCache`` here: a sliding layer's cache is a ``StaticSlidingWindowLayer``
of ``min(window, max_cache_len)`` slots. Once full, each decode step rolls it left by one (``roll(-1, dims=-2)``),
writes the new K/V at index ``[-1]`` (``setitem``) and ``copy_``s the result back into the cache buffer, which SDPA
then reads whole (through ``repeat_kv`` for GQA) with a ``[B, 1, 1, window]`` mask. Full-attention layers keep a
``StaticLayer`` of ``max_cache_len`` slots written by ``index_copy_``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tests.models import VOCAB, DecodeDriver, TinySpec, gated_heads, tiny_config, tiny_model

SLIDING_FAMILIES = ("mistral", "gemma3_text")


def tiny_sliding_model(spec: TinySpec, window: int, layer_types: Sequence[str] | None = None,
                       seed: int = 0) -> nn.Module:
    """``tiny_model(spec, seed)``'s weights in a model whose attention sees only the last ``window`` tokens.

    Mistral: every layer slides. Gemma-3 text: the layers ``layer_types`` marks ``"sliding_attention"`` (default:
    even layers slide, odd layers are ``"full_attention"``).
    """
    if spec.family not in SLIDING_FAMILIES:
        raise ValueError(f"{spec.family!r} is not one of {SLIDING_FAMILIES}")
    config = tiny_config(spec)
    config.sliding_window = window
    if spec.family == "gemma3_text":
        config.layer_types = list(layer_types or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                                  for i in range(spec.layers)])
    elif layer_types is not None:
        raise ValueError("Mistral slides in every layer; layer_types is for gemma3_text")
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(tiny_model(spec, seed=seed).state_dict())  # sliding changes no parameter shape
    return model


class MultiStepDriver(DecodeDriver):
    """:class:`tests.models.DecodeDriver` with ``steps`` decode steps: step ``i`` feeds one token at position
    ``prompt_len + i`` (teacher-forced random tokens, so two runs see the same inputs whatever they predict)."""

    def __init__(self, model: nn.Module, batch: int, prompt_len: int, max_cache_len: int, steps: int,
                 pad: list[int] | None = None, seed: int = 0) -> None:
        super().__init__(model, batch, prompt_len, max_cache_len, pad=pad, seed=seed)
        if steps < 1 or prompt_len + steps > max_cache_len:
            raise ValueError(f"prompt {prompt_len} + {steps} steps do not fit a cache of {max_cache_len}")
        self.steps = steps
        generator = torch.Generator().manual_seed(seed + 1)
        self.next_ids = torch.randint(1, VOCAB, (batch, steps), generator=generator)
        self.attention_mask = torch.cat(
            [self.attention_mask, torch.ones(batch, steps - 1, dtype=torch.long)], dim=1)

    def decode_inputs(self, cache: Any, step: int = 0) -> dict:
        """Keyword arguments of decode step ``step`` (0-based) on ``cache`` after the prompt and earlier steps."""
        inputs = self._inputs(self.next_ids[:, step: step + 1], cache, self.prompt_len + step)
        # a sliced mask is a non-contiguous view until the last step, whose change of strides recompiles
        inputs["attention_mask"] = inputs["attention_mask"].contiguous()
        return inputs

    def run(self, step: Callable[..., Any]) -> list[torch.Tensor]:
        """Prefill a fresh cache eagerly, then run every decode step through ``step`` (the model, or its
        compiled forward); the ``[B, 1, vocab]`` logits of each step."""
        cache = self.prefill()
        logits = []
        with torch.no_grad():
            for index in range(self.steps):
                logits.append(step(**self.decode_inputs(cache, index)).logits)
        return logits

    def reference(self, bank: Any, density: float) -> list[torch.Tensor]:
        """:meth:`run` of the eager model under :func:`tests.models.gated_heads` (the head-gating reference)."""
        with gated_heads(self.model, bank, density):
            return self.run(self.model)

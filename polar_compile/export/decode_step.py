"""The unit that is exported: one step of a Hugging Face decoder over a static KV cache held outside the model.

:class:`CacheStep` wraps a stock HF causal LM (attached routers and all) as a module of plain tensors, so that
``torch.export`` sees every input and output:

    inputs   input_ids       int64 [B, T]    T = 1: a decode step; T > 1: a (dense) prefill of T tokens
             position_ids    int64 [B, T]    per row: a left-padded row's first real token is at position 0
             attention_mask  int64 [B, L]    over the whole cache (L = max_cache_len): 1 where a slot holds one of
                                             this row's real tokens, now or later (0: left padding)
             cache_position  int64 [T]       the cache slots this step writes, the same for every row
                                             (a decode step at slot t: [t]; a prefill: [0, 1, ..., T-1])
             *cache          [B, Hkv, L, D]  key_0, value_0, key_1, value_1, ... (model dtype), one pair per layer
    outputs  logits          [B, 1, V]       of the step's last token
             (cache_mode="io" only) the updated cache, in the order of the inputs

How the cache travels (``cache_mode``):
- ``"inplace"`` (pt2, aoti): the step writes its K/V into the cache tensors it is given, in place, and returns only
  the logits. The caller allocates the cache once (:func:`new_cache`) and passes the same tensors to every prefill
  and decode call: the two programs share it, nothing is copied, and the artifact holds no cache. Both runtimes keep
  the mutation of an input (``ExportedProgram.module()`` and a loaded AOTInductor package; tested).
- ``"io"`` (ONNX, which has no in-place ops; its maintainers recommend cache in, cache out): the step writes into a
  copy of each cache tensor and returns the copies after the logits; the caller feeds them to the next step.

Slot ``t`` of every row is written at step ``t``, so the cache and the causal mask are shared by all rows, while
``position_ids`` and ``attention_mask`` carry each row's own offset (left-padded or ragged batches). The cache
layers are transformers' ``StaticLayer`` reading the given tensors, writing at ``cache_position`` and reporting it
as their length, which is what HF's mask code reads (transformers 5.17-5.24). Layers with a sliding window are not
supported (:class:`ExportError`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from .errors import ExportError

__all__ = ["CACHE_MODES", "STEP_INPUTS", "CacheStep", "cache_names", "input_names", "cache_shape", "example_inputs", "new_cache"]

CACHE_MODES = ("inplace", "io")


def cache_shape(model: nn.Module, batch_size: int, max_cache_len: int) -> tuple[int, int, int, int]:
    """``[B, Hkv, L, D]``: the shape of one layer's key (and value) cache for ``model``."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return batch_size, kv_heads, max_cache_len, head_dim


STEP_INPUTS = ("input_ids", "position_ids", "attention_mask", "cache_position")


def input_names(num_layers: int) -> list[str]:
    """Every input's name, in order: the step's four, then the cache's."""
    return [*STEP_INPUTS, *cache_names(num_layers)]


def cache_names(num_layers: int) -> list[str]:
    """The cache inputs' names in order: ``key_0, value_0, key_1, value_1, ...``."""
    return [f"{kind}_{layer}" for layer in range(num_layers) for kind in ("key", "value")]


def new_cache(model: nn.Module, batch_size: int, max_cache_len: int) -> list[Tensor]:
    """A zeroed cache for ``model`` (its dtype and device): ``[key_0, value_0, ...]``, each ``[B, Hkv, L, D]``."""
    like = next(model.parameters())
    shape = cache_shape(model, batch_size, max_cache_len)
    layers = model.config.get_text_config().num_hidden_layers
    return [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(2 * layers)]


def example_inputs(model: nn.Module, batch_size: int, max_cache_len: int, tokens: int = 1) -> tuple[Tensor, ...]:
    """Example inputs of a step of ``tokens`` tokens at the start of a cache (positional, as :class:`CacheStep` takes
    them): ids, positions, a full mask, slots ``0..tokens-1``, then a zeroed cache."""
    device = next(model.parameters()).device
    ids = torch.zeros(batch_size, tokens, dtype=torch.long, device=device)
    positions = torch.arange(tokens, device=device).expand(batch_size, tokens).contiguous()
    mask = torch.ones(batch_size, max_cache_len, dtype=torch.long, device=device)
    slots = torch.arange(tokens, device=device)
    return ids, positions, mask, slots, *new_cache(model, batch_size, max_cache_len)


class _SlotLayer(StaticLayer):
    """A ``StaticLayer`` over given tensors that writes a step's K/V at ``slots`` (in place, or into copies when
    ``copy``) and reports ``slots[0]`` as its length (HF's masks read it as the query offset)."""

    def __init__(self, keys: Tensor, values: Tensor, slots: Tensor, copy: bool) -> None:
        super().__init__(max_cache_len=keys.shape[2])
        self.keys, self.values = (keys.clone(), values.clone()) if copy else (keys, values)
        self.slots = slots
        self.cumulative_length = slots[0]
        self.device, self.dtype = keys.device, keys.dtype
        self.batch_size, self.num_heads, _, self.k_head_dim = keys.shape
        self.v_head_dim = values.shape[-1]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
               ) -> tuple[Tensor, Tensor]:
        """Write ``key_states``/``value_states`` ``[B, Hkv, T, D]`` at this step's slots; return the whole cache."""
        self.keys.index_copy_(2, self.slots, key_states)
        self.values.index_copy_(2, self.slots, value_states)
        return self.keys, self.values


class CacheStep(nn.Module):
    """One step (decode or prefill) of ``model`` over a cache passed as tensors; see the module docstring."""

    def __init__(self, model: nn.Module, cache_mode: str = "inplace") -> None:
        super().__init__()
        if cache_mode not in CACHE_MODES:
            raise ExportError(f"cache_mode must be one of {list(CACHE_MODES)}, got {cache_mode!r}")
        self.model = model
        self.cache_mode = cache_mode
        self.num_layers = model.config.get_text_config().num_hidden_layers
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40)
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._check_full_attention()

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, cache_position: Tensor,
                *cache: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Logits ``[B, 1, V]`` of the step's last token (``"io"``: then the updated cache)."""
        if len(cache) != 2 * self.num_layers:
            raise ExportError(f"expected {2 * self.num_layers} cache tensors (key and value of {self.num_layers} "
                              f"layers), got {len(cache)}")
        cache_object = self._cache(cache, cache_position)
        logits = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                            use_cache=True, logits_to_keep=1, **{self._cache_argument: cache_object}).logits
        if self.cache_mode == "inplace":
            return logits
        return logits, *(t for layer in cache_object.layers for t in (layer.keys, layer.values))

    def _cache(self, cache: Sequence[Tensor], slots: Tensor) -> StaticCache:
        key = cache[0]
        static = StaticCache(config=self.model.config, max_cache_len=key.shape[2])
        static.layers = [_SlotLayer(cache[2 * i], cache[2 * i + 1], slots, copy=self.cache_mode == "io")
                         for i in range(self.num_layers)]
        return static

    def _check_full_attention(self) -> None:
        static = StaticCache(config=self.model.config, max_cache_len=2)
        sliding = [i for i, layer in enumerate(static.layers) if type(layer) is not StaticLayer]
        if sliding or len(static.layers) != self.num_layers:
            raise ExportError(
                f"{type(self.model).__name__}: layers {sliding} have a sliding-window (or otherwise non-static) "
                "cache; export supports models whose every layer keeps a full static cache"
            )

"""A toy decoder in plain PyTorch, shaped like Hugging Face's, with knobs that each keep its attention dense.

``ToyModel.layers`` is a ``ModuleList`` of ``ToyLayer``; each layer normalises its input and runs
``self_attn = ToyAttention``: ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears and a static KV cache
``[B, Hkv, L, D]`` in buffers, written at the decode positions with ``index_copy_`` as HF's ``StaticCache`` does,
then read whole by SDPA (through HF's ``repeat_kv`` for GQA). With no knob set a decode step is exactly what the
polar backend rewrites; each knob (:class:`Knobs`) changes one thing the matcher, the routing or a pass refuses.

The cache starts random (a prompt already seen) and a step at positions ``pos`` writes there; writing is
idempotent, so the eager and the compiled model can run the same step on one module in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import polar_compile
from polar_compile.routers import ModelShape


@dataclass(frozen=True)
class Knobs:
    """What a toy attention does differently from HF's static-cache decode attention (defaults: nothing)."""

    three_d: bool = False  # SDPA on [B*H, T, D] (3-D) inputs
    dropout_p: float = 0.0
    is_causal: bool = False  # passed with the mask dropped (SDPA refuses both)
    mask: str = "row"  # "row" [B, 1, T, L] bool | "none" | "per_head" [B, H, T, L] | "short" [B, 1, T, 1]
    #                    (broadcast over the cache) | "float32" additive, fp32 whatever the model's dtype
    cross: bool = False  # K/V projected from the forward's encoder_states (cross-attention, nothing cached)
    kv: str = "repeat_kv"  # how SDPA reads the cache: "repeat_kv" (HF's, a no-op for MHA) | "gqa" (the cache
    #   itself, enable_gqa=True) | "interleave" (K and V by repeat_interleave, not HF's chain) | "interleave_value"
    #   (V only) | "one_query_head" (HF's repeat_kv, but one query, the heads' mean, broadcast over every head)
    query_from_input: bool = False  # SDPA's query is the forward's `query` argument (no projection in the module)
    value_head_dim: int | None = None  # v_proj/o_proj of another head_dim than the keys'
    two_calls: bool = False  # a second SDPA call in the same module (its output added)
    two_modules: bool = False  # a second attention module in each layer (`self_attn_2`, its own cache)
    scale_from_shape: bool = False  # scale=key.shape[-2], an int in the graph
    dropout_from_attribute: bool = False  # dropout_p=self.dropout (0.0): a graph input when compiled dynamic
    external_cache: bool = False  # K/V cache tensors come from the forward's `cache` argument (as HF's StaticCache)
    fixed_heads: bool = False  # view the projections as (B, T, heads, D) instead of HF's (B, T, -1, D)


@dataclass(frozen=True)
class ToySpec:
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    batch: int = 2
    cache_len: int = 6
    hidden_size: int | None = None  # default heads * head_dim

    @property
    def hidden(self) -> int:
        return self.hidden_size or self.heads * self.head_dim


class ToyAttention(nn.Module):
    def __init__(self, spec: ToySpec, knobs: Knobs) -> None:
        super().__init__()
        self.spec, self.knobs = spec, knobs
        self.dropout = 0.0
        h, d, hkv = spec.heads, spec.head_dim, spec.kv_heads
        self.v_dim = knobs.value_head_dim or d
        self.q_proj = nn.Linear(spec.hidden, h * d)
        self.k_proj = nn.Linear(spec.hidden, hkv * d)
        self.v_proj = nn.Linear(spec.hidden, hkv * self.v_dim)
        self.o_proj = nn.Linear(h * self.v_dim, spec.hidden)
        self.register_buffer("k_cache", torch.randn(spec.batch, hkv, spec.cache_len, d))
        self.register_buffer("v_cache", torch.randn(spec.batch, hkv, spec.cache_len, self.v_dim))
        # the test's reference: (weight, bias, k) of a router whose unselected KV groups' heads are zeroed
        self.reference_router: tuple[Tensor, Tensor, int] | None = None

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor | None, encoder_states: Tensor | None = None,
                query: Tensor | None = None, cache: tuple[Tensor, Tensor] | None = None) -> Tensor:
        knobs, spec = self.knobs, self.spec
        b, t, _ = x.shape
        h, hkv, d = spec.heads, spec.kv_heads, spec.head_dim
        kv_in = encoder_states if knobs.cross else x
        s = kv_in.shape[1]
        # HF's (*input_shape, -1, head_dim): the head count follows the projection's width
        q_heads, kv_heads = (h, hkv) if knobs.fixed_heads else (-1, -1)
        q = self.q_proj(x).view(b, t, q_heads, d).transpose(1, 2)
        if knobs.query_from_input:
            q = query
        k = self.k_proj(kv_in).view(b, s, kv_heads, d).transpose(1, 2)
        v = self.v_proj(kv_in).view(b, s, kv_heads, self.v_dim).transpose(1, 2)
        if knobs.cross:
            keys, values = k, v  # the encoder's states: nothing cached
        else:
            keys, values = cache if knobs.external_cache else (self.k_cache, self.v_cache)
            keys.index_copy_(2, pos, k)
            values.index_copy_(2, pos, v)
        out = self._attend(q, keys, values, mask)
        if knobs.two_calls:
            out = out + self._attend(q, keys, values, mask)
        z = out.transpose(1, 2).reshape(b, t, h * self.v_dim)
        if self.reference_router is not None:
            z = self._gate(x, z)
        return self.o_proj(z)

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
        knobs, spec = self.knobs, self.spec
        h, hkv = spec.heads, spec.kv_heads
        gqa = False
        if knobs.kv == "repeat_kv":
            keys, values = repeat_kv(keys, h // hkv), repeat_kv(values, h // hkv)
        elif knobs.kv == "gqa":
            gqa = True
        elif knobs.kv == "interleave":
            keys, values = keys.repeat_interleave(h // hkv, dim=1), values.repeat_interleave(h // hkv, dim=1)
        elif knobs.kv == "interleave_value":
            keys, values = repeat_kv(keys, h // hkv), values.repeat_interleave(h // hkv, dim=1)
        elif knobs.kv == "one_query_head":  # one query for every head, against the repeated cache
            keys, values = repeat_kv(keys, h // hkv), repeat_kv(values, h // hkv)
            q = q.mean(dim=1, keepdim=True)
        kwargs = {}
        if knobs.dropout_p:  # else the literal 0.0 HF passes in eval (a float attribute is a graph input when dynamic)
            kwargs["dropout_p"] = knobs.dropout_p
        if knobs.dropout_from_attribute:
            kwargs["dropout_p"] = self.dropout
        if knobs.scale_from_shape:
            kwargs["scale"] = keys.shape[-2]
        if knobs.three_d:
            b, _, t, d = q.shape
            out = F.scaled_dot_product_attention(q.reshape(b * h, t, d), keys.reshape(b * h, -1, d),
                                                 values.reshape(b * h, -1, values.shape[-1]),
                                                 attn_mask=None if mask is None else mask.expand(b, h, t, -1)
                                                 .reshape(b * h, t, -1))
            return out.view(b, h, t, -1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                              is_causal=knobs.is_causal, enable_gqa=gqa, **kwargs)

    def _gate(self, x: Tensor, z: Tensor) -> Tensor:
        """The reference for a routed step: float64 router scores of the query projection's input, the top-k KV
        groups per sequence, the heads of the others zeroed before ``o_proj``."""
        weight, bias, k = self.reference_router
        scores = x.double() @ weight.double().T + bias.double()  # [B, 1, units]
        chosen = torch.zeros_like(scores).scatter(-1, scores.topk(k, dim=-1).indices, 1.0)
        heads = chosen.repeat_interleave(self.spec.heads // self.spec.kv_heads, dim=-1)  # [B, 1, H]
        return (z.view(*z.shape[:-1], self.spec.heads, -1) * heads[..., None].to(z.dtype)).flatten(-2)


def repeat_kv(x: Tensor, repeats: int) -> Tensor:
    """HF's ``repeat_kv``: ``[B, Hkv, L, D] -> [B, Hkv * repeats, L, D]``."""
    if repeats == 1:
        return x
    b, hkv, length, d = x.shape
    return x[:, :, None, :, :].expand(b, hkv, repeats, length, d).reshape(b, hkv * repeats, length, d)


class RMSNorm(nn.Module):
    """Llama's norm (its width is the weight's, not a constant of the graph)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class ToyLayer(nn.Module):
    def __init__(self, spec: ToySpec, knobs: Knobs) -> None:
        super().__init__()
        self.norm = RMSNorm(spec.hidden)
        self.self_attn = ToyAttention(spec, knobs)
        self.self_attn_2 = ToyAttention(spec, knobs) if knobs.two_modules else None

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor | None, **kwargs) -> Tensor:
        out = x + self.self_attn(self.norm(x), pos, mask, **kwargs)
        return out if self.self_attn_2 is None else out + self.self_attn_2(self.norm(x), pos, mask, **kwargs)


class ToyModel(nn.Module):
    """``layers`` decoder layers and a final norm; ``outside`` adds an attention module after them that is not an
    item of the layer list, ``root_sdpa`` an SDPA call in this module's own forward."""

    def __init__(self, spec: ToySpec = ToySpec(), knobs: Knobs = Knobs(), *, outside: bool = False,
                 root_sdpa: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.spec, self.knobs, self.root_sdpa = spec, knobs, root_sdpa
        with torch.random.fork_rng():  # seeded weights without touching the caller's generator
            torch.manual_seed(seed)
            self.layers = nn.ModuleList([ToyLayer(spec, knobs) for _ in range(spec.layers)])
            self.outside = ToyLayer(spec, Knobs()) if outside else None
            self.norm = RMSNorm(spec.hidden)
        self.config = SimpleNamespace(model_type="toy", num_hidden_layers=spec.layers, hidden_size=spec.hidden,
                                      num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads)
        self.eval()

    def forward(self, x: Tensor, pos: Tensor, valid: Tensor, encoder_states: Tensor | None = None,
                query: Tensor | None = None, cache: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """``x [B, T, hidden]`` at cache positions ``pos [T]``; ``valid [B, L]`` marks the cache entries each
        sequence may attend to (before causality)."""
        mask = self.mask(pos, valid)
        for index, layer in enumerate(self.layers):
            extra = {}
            if encoder_states is not None:
                extra["encoder_states"] = encoder_states
            if query is not None:
                extra["query"] = query
            if cache is not None:
                extra["cache"] = cache[index]
            x = layer(x, pos, mask, **extra)
        if self.outside is not None:
            x = self.outside(x, pos, self.mask(pos, valid, Knobs()))
        if self.root_sdpa:
            q = x.view(x.shape[0], x.shape[1], self.spec.heads, -1).transpose(1, 2)
            x = x + F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(x.shape)
        return self.norm(x)

    def mask(self, pos: Tensor, valid: Tensor, knobs: Knobs | None = None) -> Tensor | None:
        knobs = knobs or self.knobs
        if knobs.mask == "none" or knobs.is_causal:
            return None
        length = valid.shape[-1]
        allowed = valid[:, None, None, :] & (torch.arange(length) <= pos[:, None])  # [B, 1, T, L]
        if knobs.mask == "per_head":
            return allowed.expand(-1, self.spec.heads, -1, -1)
        if knobs.mask == "short":
            return allowed[..., :1]
        if knobs.mask == "float32":
            return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        return allowed


def bank(model: ToyModel, layers: list[int] | None = None, seed: int = 0) -> polar_compile.RouterBank:
    """Random routers for ``layers`` (default: every layer) of ``model``: weight ``[kv_heads, hidden]``."""
    spec = model.spec
    generator = torch.Generator().manual_seed(seed)
    layers = list(range(spec.layers)) if layers is None else layers
    shape = ModelShape(model_type="toy", num_layers=spec.layers, hidden_size=spec.hidden, num_heads=spec.heads,
                       num_kv_heads=spec.kv_heads)
    return polar_compile.RouterBank(
        shape,
        weights={i: torch.randn(spec.kv_heads, spec.hidden, generator=generator) for i in layers},
        biases={i: torch.randn(spec.kv_heads, generator=generator) for i in layers},
    )


def decode_inputs(spec: ToySpec, step: int | None = None, length: int = 1, seed: int = 0, **extra: Tensor
                  ) -> dict[str, Tensor]:
    """Inputs of a step of ``length`` tokens at cache position ``step`` (default: the last ``length``), with the
    first cache entry of sequence 1 padded away."""
    generator = torch.Generator().manual_seed(seed)
    step = spec.cache_len - length if step is None else step
    valid = torch.ones(spec.batch, spec.cache_len, dtype=torch.bool)
    if spec.batch > 1:
        valid[1, 0] = False
    return {"x": torch.randn(spec.batch, length, spec.hidden, generator=generator),
            "pos": torch.arange(step, step + length), "valid": valid, **extra}

"""``torch.library`` ops of polar-compile: schemas, fake impls, reference impls, CUDA kernels.

``polar::route`` is the head router: the ``k`` units of largest score ``x @ W^T + b`` (fp32) per row of ``x``,
in descending score, ties to the lower index.

``polar::select_attention`` is decode attention over the selected KV groups of each sequence only:

    out[b, h] = softmax(scale * q[b, h] . K[b, g]^T + mask[b]) @ V[b, g]   if g = h // (H / Hkv) is in units[b]
    out[b, h] = 0                                                          otherwise

``polar::layer_router`` carries a decoder layer's attached router into the traced graph (see
``backend.attach``): it returns a copy of its input, and the attention pass reads its weight, bias, layer index,
``k`` and cost threshold, then removes it. Outside the polar backend it is that copy (one ``[B, 1, hidden]`` row per
layer and decode step).

On CUDA route and select_attention run Triton kernels (``kernels/``, launched through ``wrap_triton``: ``triton_op`` lets Inductor and
AOTInductor trace into them; the polar backend keeps them opaque, see ``backend.compile_graph``); elsewhere they run
their ``*_reference`` functions, plain PyTorch math.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "SUPPORTED_DTYPES",
    "layer_router",
    "check_route_args",
    "check_select_attention_args",
    "route",
    "route_reference",
    "select_attention",
    "select_attention_reference",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_select_attention_args(
    query: Tensor, key: Tensor, value: Tensor, units: Tensor, attn_mask: Tensor
) -> None:
    """Raise ``ValueError`` naming the argument, the expected and the actual when the op's inputs are malformed."""
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"select_attention: expected query [B, H, 1, D], got {tuple(query.shape)}")
    batch, heads, _, head_dim = query.shape
    if key.dim() != 4 or key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(
            f"select_attention: expected key [B={batch}, Hkv, L, D={head_dim}], got {tuple(key.shape)}"
        )
    if value.shape != key.shape:
        raise ValueError(f"select_attention: expected value of key's shape {tuple(key.shape)}, got {tuple(value.shape)}")
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if heads % kv_heads != 0:
        raise ValueError(f"select_attention: query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    dtypes = {query.dtype, key.dtype, value.dtype}
    if len(dtypes) != 1:
        raise ValueError(
            "select_attention: expected query, key and value of one dtype, got "
            f"{query.dtype}, {key.dtype}, {value.dtype}"
        )
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"select_attention: unsupported dtype {query.dtype}; supported: {SUPPORTED_DTYPES}")
    if units.dim() != 2 or units.shape[0] != batch or units.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"select_attention: expected units [B={batch}, k] int32/int64, got {tuple(units.shape)} {units.dtype}"
        )
    if units.shape[1] > kv_heads:
        raise ValueError(f"select_attention: {units.shape[1]} units selected but only {kv_heads} KV groups exist")
    if attn_mask.dim() != 4 or attn_mask.shape[1:3] != (1, 1) or attn_mask.shape[0] not in (1, batch) or (
        attn_mask.shape[3] != kv_len
    ):
        raise ValueError(
            f"select_attention: expected attn_mask [B={batch} or 1, 1, 1, L={kv_len}], got {tuple(attn_mask.shape)}"
        )
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        raise ValueError(
            f"select_attention: expected a bool attn_mask or an additive one of dtype {query.dtype}, got {attn_mask.dtype}"
        )


def select_attention_reference(
    query: Tensor, key: Tensor, value: Tensor, units: Tensor, attn_mask: Tensor, scale: float
) -> Tensor:
    """Selective decode attention in plain PyTorch (fp32 accumulation): the op's semantics, any device."""
    # query: [B, H, 1, D]   key, value: [B, Hkv, L, D]   units: [B, k]   attn_mask: [B|1, 1, 1, L]
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.float().reshape(batch, kv_heads, group, head_dim)
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [B, Hkv, R, L]
    if attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    else:
        scores = scores + attn_mask.float()
    # A row with every key masked attends to nothing: its output is zero, not NaN.
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, value.float())  # [B, Hkv, R, D]
    keep = torch.zeros(batch, kv_heads, dtype=torch.bool, device=query.device)
    keep = keep.scatter(1, units.long(), True)
    out = out * keep[:, :, None, None]
    return out.reshape(batch, heads, 1, head_dim).to(query.dtype)


@torch.library.triton_op("polar::select_attention", mutates_args=())
def select_attention(
    query: Tensor, key: Tensor, value: Tensor, units: Tensor, attn_mask: Tensor, scale: float
) -> Tensor:
    """Decode attention reading K/V only for the KV groups in ``units`` (per sequence); other heads are zero."""
    check_select_attention_args(query, key, value, units, attn_mask)
    if query.device.type == "cuda":
        from .kernels.select_attention import select_attention_triton

        return select_attention_triton(query, key, value, units, attn_mask, scale)
    return select_attention_reference(query, key, value, units, attn_mask, scale)


@select_attention.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, units: Tensor, attn_mask: Tensor, scale: float) -> Tensor:
    check_select_attention_args(query, key, value, units, attn_mask)
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def check_route_args(x: Tensor, weight: Tensor, bias: Tensor, k: int) -> None:
    """Raise ``ValueError`` naming the argument, the expected and the actual when the router's inputs are malformed."""
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"route: expected x [..., hidden] and weight [units, hidden], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    units = weight.shape[0]
    if bias.shape != (units,):
        raise ValueError(f"route: expected bias [units={units}], got {tuple(bias.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or {weight.dtype, bias.dtype} != {x.dtype}:
        raise ValueError(
            f"route: expected x, weight and bias of one dtype in {SUPPORTED_DTYPES}, got "
            f"{x.dtype}, {weight.dtype}, {bias.dtype}"
        )
    if not 1 <= k <= units:
        raise ValueError(f"route: k must be in [1, {units}] (the number of units), got {k}")


def route_reference(x: Tensor, weight: Tensor, bias: Tensor, k: int) -> Tensor:
    """The router in plain PyTorch: int64 ``[..., k]``, fp32 scores, NaN ranked as -inf, ties to the lower index."""
    scores = torch.nn.functional.linear(x.float(), weight.float(), bias.float())  # [..., units]
    scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k].contiguous()


@torch.library.triton_op("polar::route", mutates_args=())
def route(x: Tensor, weight: Tensor, bias: Tensor, k: int) -> Tensor:
    """The ``k`` units with the largest router scores ``x @ weight.T + bias``, per row of ``x`` (int64 ``[..., k]``)."""
    check_route_args(x, weight, bias, k)
    if x.device.type == "cuda":
        from .kernels.route import route_triton

        return route_triton(x, weight, bias, k)
    return route_reference(x, weight, bias, k)


@route.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, k: int) -> Tensor:
    check_route_args(x, weight, bias, k)
    return x.new_empty((*x.shape[:-1], k), dtype=torch.int64)


@torch.library.custom_op("polar::layer_router", mutates_args=())
def layer_router(hidden: Tensor, weight: Tensor, bias: Tensor, layer: int, k: int, min_saved_bytes: int) -> Tensor:
    """A copy of ``hidden`` that marks, in a traced graph, decoder layer ``layer``'s router ``(weight, bias)``, its
    ``k`` units kept per sequence and its ``min_saved_bytes`` (-1: the device's default)."""
    return hidden.clone()


@layer_router.register_fake
def _(hidden: Tensor, weight: Tensor, bias: Tensor, layer: int, k: int, min_saved_bytes: int) -> Tensor:
    return torch.empty_like(hidden)

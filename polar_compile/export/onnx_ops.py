"""The polar ops in standard ONNX (opset 18): onnxscript translations for ``torch.onnx.export``'s
``custom_translation_table``.

Each translation builds the op's semantics (``ops.py``) from default-domain ONNX operators only — Gather, MatMul,
Gemm, Softmax, TopK, ScatterND, Where, ReduceSum, ... — so any ONNX runtime, and TensorRT's ONNX parser, runs the
model without a plugin; the exported graph holds no custom-domain node.

The saving is kept where it is in the data: ``select_attention`` gathers the selected KV groups of each sequence out
of the cache (one ``Gather`` on the flattened ``[B * Hkv, L, D]`` cache) and runs attention on those only, then
scatters the ``[B, k, R, D]`` result into zeros; the gather-GEMMs gather the selected weight rows before a
``Gemm``. A runtime without gather-into-GEMM fusion (onnxruntime) copies the selected K/V (or weight rows) once
before reading them: at density d it moves about 3d/2 of the dense op's bytes rather than d.

Numerics, against the ``*_reference`` functions:

- The routers (``route``, ``mlp_route``) follow the references exactly: fp32 scores (``mlp_route``'s rank-r
  activation rounded to x's dtype between its two products), NaN ranked lowest, -0.0 equal to +0.0, and the
  ONNX ``TopK`` contract that equal values keep the lower index first (ONNX spec, TopK-11 onwards; onnxruntime's
  CPU kernel does, the tests check it on exact ties), which is the references' stable sort. ``mlp_route``'s
  ascending order comes from a second ``TopK`` (``largest=0``) over the indices cast to fp32, exact below 2**24
  neurons (TensorRT's TopK takes no int64).
- ``select_attention`` and the gather-GEMMs run their products in the model's dtype, as the rest of the exported
  model does (a runtime's half-precision GEMM accumulates in fp32 on GPUs); attention scores, softmax and the
  probabilities' NaN guard (a fully masked row gives zeros, not NaN) are fp32. For fp32 models that is the
  references' math; for fp16/bf16 it differs from them by the rounding of products of half inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from onnxscript import ir
from onnxscript import opset18 as op

from .. import ops  # noqa: F401  (registers the polar ops)

__all__ = [
    "TRANSLATIONS",
    "gather_down",
    "gather_down_partials",
    "gather_gated_up",
    "gather_up",
    "layer_mlp_router",
    "layer_router",
    "mlp_route",
    "route",
    "select_attention",
]

# An onnxscript value while torch.onnx traces a translation (torch's SymbolicTensor, an onnx_ir Value)
Value = Any
_FLOAT = ir.DataType.FLOAT
_INT64 = ir.DataType.INT64


def _ints(*values: int) -> Value:
    return op.Constant(value_ints=list(values))


def _float(x: Value) -> Value:
    """``x`` as fp32 (no node when it already is)."""
    return x if x.dtype == _FLOAT else op.Cast(x, to=_FLOAT)


def _scalar_like(value: float, like: Value) -> Value:
    return op.CastLike(op.Constant(value_float=value), like)


def _top_k(scores: Value, k: int) -> Value:
    """Indices of the ``k`` largest fp32 ``scores`` along the last axis, descending, ties to the lower index; NaN
    ranked as -inf and -0.0 tied with +0.0, as the references' stable sort does."""
    zero = op.Constant(value_float=0.0)
    scores = op.Where(op.IsNaN(scores), op.Constant(value_float=float("-inf")), scores)
    scores = op.Where(op.Equal(scores, zero), zero, scores)  # -0.0 -> +0.0 (a `+ 0.0` is optimised away)
    _, indices = op.TopK(scores, _ints(k), axis=-1, largest=1, sorted=1)
    return indices


def select_attention(query: Value, key: Value, value: Value, units: Value, attn_mask: Value, scale: float) -> Value:
    """``polar::select_attention``: attention over the selected KV groups only, the other heads zero."""
    # query: [B, H, 1, D]   key, value: [B, Hkv, L, D]   units: [B, k]   attn_mask: [B|1, 1, 1, L]
    heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[3]
    group = heads // kv_heads
    kept = units.shape[1]
    batch = op.Squeeze(op.Shape(query, start=0, end=1))  # a scalar, dynamic or not
    first_row = op.Mul(op.Range(op.Constant(value_int=0), batch, op.Constant(value_int=1)),
                       op.Constant(value_int=kv_heads))  # [B]: b * Hkv
    rows = op.Reshape(op.Add(op.Cast(units, to=_INT64), op.Unsqueeze(first_row, _ints(1))), _ints(-1))  # [B*k]

    def selected(cache: Value) -> Value:  # [B, Hkv, L, D] -> its selected groups [B, k, L, D]
        per_group = op.Concat(_ints(-1), op.Shape(cache, start=2), axis=0)  # [B*Hkv, L, D]
        picked = op.Gather(op.Reshape(cache, per_group), rows, axis=0)  # [B*k, L, D]
        return op.Reshape(picked, op.Concat(_ints(-1, kept), op.Shape(cache, start=2), axis=0))

    q = op.Gather(op.Reshape(query, _ints(-1, group, head_dim)), rows, axis=0)  # [B*k, R, D]
    q = op.Reshape(q, _ints(-1, kept, group, head_dim))  # [B, k, R, D]
    k, v = selected(key), selected(value)
    scores = op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2]))  # [B, k, R, L]
    scores = op.Mul(_float(scores), op.Constant(value_float=scale))
    if attn_mask.dtype == ir.DataType.BOOL:
        scores = op.Where(attn_mask, scores, op.Constant(value_float=float("-inf")))
    else:
        scores = op.Add(scores, _float(attn_mask))
    probs = op.Softmax(scores, axis=-1)
    probs = op.Where(op.IsNaN(probs), op.Constant(value_float=0.0), probs)  # a fully masked row: zeros
    out = op.MatMul(op.CastLike(probs, query), v)  # [B, k, R, D]
    flat = op.ScatterND(
        op.Expand(_scalar_like(0.0, query), op.Concat(op.Unsqueeze(op.Mul(batch, op.Constant(value_int=kv_heads)), _ints(0)),
                                   _ints(group, head_dim), axis=0)),  # [B*Hkv, R, D] zeros
        op.Unsqueeze(rows, _ints(1)),  # [B*k, 1]
        op.Reshape(out, _ints(-1, group, head_dim)),  # [B*k, R, D]
    )
    return op.Reshape(flat, op.Shape(query))


def route(x: Value, weight: Value, bias: Value, k: int) -> Value:
    """``polar::route``: per row of ``x``, the ``k`` units of largest fp32 ``x @ W^T + b``, descending."""
    # x: [..., hidden]   weight: [units, hidden]   bias: [units]  ->  int64 [..., k]
    scores = op.Add(op.MatMul(_float(x), op.Transpose(_float(weight), perm=[1, 0])), _float(bias))
    return _top_k(scores, k)


def mlp_route(x: Value, w_in: Value, w_out: Value, k: int) -> Value:
    """``polar::mlp_route``: the ``k`` neurons of largest ``sum_rows relu((x @ w_in^T) @ w_out^T)``, one set for
    all rows, in ascending index order."""
    # x: [..., hidden]   w_in: [r, hidden]   w_out: [ffn, r]  ->  int64 [k]
    rows = op.Reshape(_float(x), op.Concat(_ints(-1), op.Shape(x, start=-1), axis=0))  # [N, hidden]
    low = op.MatMul(rows, op.Transpose(_float(w_in), perm=[1, 0]))  # [N, r]
    if x.dtype != _FLOAT:  # rounded to x's dtype, as the CUDA path's GEMM in x's dtype does
        low = op.Cast(op.CastLike(low, x), to=_FLOAT)
    scores = op.ReduceSum(op.Relu(op.MatMul(low, op.Transpose(_float(w_out), perm=[1, 0]))), _ints(0),
                          keepdims=0)  # [ffn]
    best = op.Cast(_top_k(scores, k), to=_FLOAT)  # exact: ffn < 2**24
    ascending, _ = op.TopK(best, _ints(k), axis=-1, largest=0, sorted=1)
    return op.Cast(ascending, to=_INT64)


def gather_up(x: Value, w: Value, b: Value, idx: Value) -> Value:
    """``polar::gather_up``: ``relu(x @ w[idx]^T + b[idx])``, ``[N, k]``."""
    return op.Relu(op.Gemm(x, op.Gather(w, idx, axis=0), op.Gather(b, idx, axis=0), transB=1))


def gather_gated_up(x: Value, w_gate: Value, b_gate: Value, w_up: Value, b_up: Value, idx: Value) -> Value:
    """``polar::gather_gated_up``: ``relu(x @ w_gate[idx]^T + b_gate[idx]) * (x @ w_up[idx]^T + b_up[idx])``."""
    gate = op.Gemm(x, op.Gather(w_gate, idx, axis=0), op.Gather(b_gate, idx, axis=0), transB=1)
    up = op.Gemm(x, op.Gather(w_up, idx, axis=0), op.Gather(b_up, idx, axis=0), transB=1)
    return op.Mul(op.Relu(gate), up)


def gather_down(h: Value, w_t: Value, b: Value, idx: Value) -> Value:
    """``polar::gather_down``: ``h @ w_t[idx] + b``, ``[N, d_out]``."""
    return op.Gemm(h, op.Gather(w_t, idx, axis=0), b)


def gather_down_partials(h: Value, w_t: Value, idx: Value, split_len: int) -> Value:
    """``polar::gather_down_partials``: ``h[:, part] @ w_t[idx[part]]`` in fp32 for each slice ``part`` of
    ``split_len`` consecutive slots, ``[cdiv(k, split_len), N, d_out]`` (k padded with zero columns and rows to whole
    slices, then one batched MatMul)."""
    length = _ints(split_len)
    pad = op.Mod(op.Sub(length, op.Mod(op.Shape(idx), length)), length)  # [1]: slots to a whole last slice
    zero = _ints(0)
    h = op.Pad(_float(h), op.Concat(zero, zero, zero, pad, axis=0))  # [N, S * L]
    rows = op.Pad(_float(op.Gather(w_t, idx, axis=0)), op.Concat(zero, zero, pad, zero, axis=0))  # [S * L, d_out]
    h = op.Transpose(op.Reshape(h, op.Concat(op.Shape(h, start=0, end=1), _ints(-1, split_len), axis=0)),
                     perm=[1, 0, 2])  # [S, N, L]
    rows = op.Reshape(rows, op.Concat(_ints(-1, split_len), op.Shape(w_t, start=1, end=2), axis=0))  # [S, L, d_out]
    return op.MatMul(h, rows)


def layer_router(hidden: Value, weight: Value, bias: Value, layer: int, k: int, min_saved_bytes: int) -> Value:
    """``polar::layer_router``, a marker the passes remove: a copy of ``hidden`` where one is left."""
    return op.Identity(hidden)


def layer_mlp_router(hidden: Value, w_in: Value, w_out: Value, layer: int, k: int) -> Value:
    """``polar::layer_mlp_router``, a marker the passes remove: a copy of ``hidden`` where one is left."""
    return op.Identity(hidden)


# torch.onnx.export(..., dynamo=True, custom_translation_table=TRANSLATIONS)
TRANSLATIONS: dict[Any, Callable[..., Value]] = {
    torch.ops.polar.select_attention.default: select_attention,
    torch.ops.polar.route.default: route,
    torch.ops.polar.mlp_route.default: mlp_route,
    torch.ops.polar.gather_up.default: gather_up,
    torch.ops.polar.gather_gated_up.default: gather_gated_up,
    torch.ops.polar.gather_down.default: gather_down,
    torch.ops.polar.gather_down_partials.default: gather_down_partials,
    torch.ops.polar.layer_router.default: layer_router,
    torch.ops.polar.layer_mlp_router.default: layer_mlp_router,
}

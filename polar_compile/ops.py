"""``torch.library`` ops of polar-compile: schemas, fake impls, reference impls, CUDA kernels.

``polar::route`` is the head router: the ``k`` units of largest score ``x @ W^T + b`` (fp32) per row of ``x``,
in descending score, ties to the lower index.

``polar::select_attention`` is decode attention over the selected KV groups of each sequence only:

    out[b, h] = softmax(scale * q[b, h] . K[b, g]^T + mask[b]) @ V[b, g]   if g = h // (H / Hkv) is in units[b]
    out[b, h] = 0                                                          otherwise

``polar::layer_router`` carries a decoder layer's attached router into the traced graph (see
``backend.attach``): it returns a copy of its input, and the attention pass reads its weight, bias, layer index,
``k`` and cost threshold, then removes it. Outside the polar backend it is that copy (one ``[B, 1, hidden]`` row per
layer and decode step). ``polar::layer_mlp_router`` does the same for the layer's MLP router and its ``k``.

The sparse MLP (ReLU and gated-ReLU MLPs) selects one neuron set for all N rows (tokens) of a decode step:

    polar::mlp_route(x, w_in, w_out, k)  the k neurons n of largest sum_rows relu((x @ w_in^T) @ w_out^T)[row, n],
                                         int64 [k] in ascending index order
    polar::gather_up(x, w, b, idx)       relu(x @ w[idx]^T + b[idx])                                        [N, k]
    polar::gather_gated_up(x, w_gate, b_gate, w_up, b_up, idx)
                                         relu(x @ w_gate[idx]^T + b_gate[idx]) * (x @ w_up[idx]^T + b_up[idx])
    polar::gather_down(h, w_t, b, idx)   h @ w_t[idx] + b   (w_t [ffn, d_out]: the down weight, transposed)
    polar::gather_down_partials(h, w_t, idx, split_len)
                                         fp32 [S, N, d_out]: h @ w_t[idx] over S consecutive slices of split_len
                                         slots, unsummed (the backend's form of gather_down: see passes/finish.py)

On CUDA route, select_attention and the gather ops run Triton kernels (``kernels/``, launched through
``wrap_triton``: ``triton_op`` lets Inductor and AOTInductor trace into them; the polar backend keeps them opaque,
see ``backend.compile_graph``); mlp_route runs four Triton kernels (cuBLAS for its first GEMM above 16 rows).
Elsewhere each op runs its ``*_reference`` function, plain PyTorch math.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "SUPPORTED_DTYPES",
    "layer_mlp_router",
    "layer_router",
    "check_gather_down_args",
    "check_gather_down_partials_args",
    "check_gather_gated_up_args",
    "check_gather_up_args",
    "check_mlp_route_args",
    "gather_down",
    "gather_down_partials",
    "gather_down_partials_reference",
    "gather_down_reference",
    "gather_gated_up",
    "gather_gated_up_reference",
    "gather_up",
    "gather_up_reference",
    "mlp_route",
    "mlp_route_reference",
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


@torch.library.custom_op("polar::layer_mlp_router", mutates_args=())
def layer_mlp_router(hidden: Tensor, w_in: Tensor, w_out: Tensor, layer: int, k: int) -> Tensor:
    """A copy of ``hidden`` that marks, in a traced graph, decoder layer ``layer``'s MLP router ``(w_in, w_out)`` and
    the ``k`` neurons its MLP keeps at this step's batch size (0: the MLP stays dense)."""
    return hidden.clone()


@layer_mlp_router.register_fake
def _(hidden: Tensor, w_in: Tensor, w_out: Tensor, layer: int, k: int) -> Tensor:
    return torch.empty_like(hidden)


# --- The sparse MLP ------------------------------------------------------------------------------------------------


def _check_operands(op: str, tensors: dict[str, Tensor]) -> None:
    """The first tensor's dtype is supported; every other tensor has its dtype and device."""
    (first, lead), *others = tensors.items()
    if lead.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: expected {first} of dtype float16, bfloat16 or float32, got {lead.dtype}")
    for name, tensor in others:
        if tensor.dtype != lead.dtype:
            raise ValueError(f"{op}: expected {name} of {first}'s dtype {lead.dtype}, got {tensor.dtype}")
        if tensor.device != lead.device:
            raise ValueError(f"{op}: expected {name} on {first}'s device {lead.device}, got {tensor.device}")


def _check_idx(op: str, idx: Tensor, device: torch.device) -> None:
    if idx.dim() != 1 or idx.shape[0] < 1 or idx.dtype != torch.int64:
        raise ValueError(f"{op}: expected idx int64 [k] with k >= 1, got {tuple(idx.shape)} {idx.dtype}")
    if idx.device != device:
        raise ValueError(f"{op}: expected idx on device {device}, got {idx.device}")


def check_mlp_route_args(x: Tensor, w_in: Tensor, w_out: Tensor, k: int) -> None:
    """Raise ``ValueError`` naming the argument, the expected and the actual when the router's inputs are malformed."""
    if x.dim() < 1 or w_in.dim() != 2 or w_in.shape[1] != x.shape[-1]:
        raise ValueError(
            f"mlp_route: expected x [..., hidden] and w_in [r, hidden], got {tuple(x.shape)} and {tuple(w_in.shape)}"
        )
    if w_out.dim() != 2 or w_out.shape[1] != w_in.shape[0]:
        raise ValueError(f"mlp_route: expected w_out [ffn, r={w_in.shape[0]}], got {tuple(w_out.shape)}")
    _check_operands("mlp_route", {"x": x, "w_in": w_in, "w_out": w_out})
    if not 1 <= k <= w_out.shape[0]:
        raise ValueError(f"mlp_route: k must be in [1, {w_out.shape[0]}] (the number of neurons), got {k}")


def _top_k_ascending(scores: Tensor, k: int) -> Tensor:
    """The indices of the ``k`` largest fp32 ``scores`` [ffn] in ascending order; ties to the lower index, NaN
    lowest."""
    # + 0.0 turns -0.0 into +0.0: a radix sort (CUDA) orders -0.0 below +0.0, and the two must tie
    scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")) + 0.0
    best = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(best).values


def mlp_route_reference(x: Tensor, w_in: Tensor, w_out: Tensor, k: int) -> Tensor:
    """The MLP router in plain PyTorch: fp32 products, the rank-r activation rounded to x's dtype between them
    (as the CUDA path's cuBLAS GEMM in x's dtype does), fp32 sum of the ReLU scores over rows, top k."""
    rows = x.reshape(-1, x.shape[-1]).float()  # [N, hidden]
    low = (rows @ w_in.float().T).to(x.dtype).float()  # [N, r]
    scores = torch.relu(low @ w_out.float().T).sum(0)  # [ffn]
    return _top_k_ascending(scores, k)


@torch.library.custom_op("polar::mlp_route", mutates_args=())
def mlp_route(x: Tensor, w_in: Tensor, w_out: Tensor, k: int) -> Tensor:
    """The ``k`` neurons of largest ``sum_rows relu((x @ w_in.T) @ w_out.T)``, one set for all rows of ``x``
    (int64 ``[k]``, ascending index order for the gathers' memory locality)."""
    check_mlp_route_args(x, w_in, w_out, k)
    if x.device.type == "cuda":
        from .kernels.mlp_route import MAX_SELECT_NEURONS, mlp_route_triton

        if w_out.shape[0] <= MAX_SELECT_NEURONS:
            return mlp_route_triton(x, w_in, w_out, k)
    return mlp_route_reference(x, w_in, w_out, k)


@mlp_route.register_fake
def _(x: Tensor, w_in: Tensor, w_out: Tensor, k: int) -> Tensor:
    check_mlp_route_args(x, w_in, w_out, k)
    return x.new_empty((k,), dtype=torch.int64)


def _check_up(op: str, x: Tensor, idx: Tensor, w_name: str, w: Tensor, b_name: str, b: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{op}: expected x [N, d], got {tuple(x.shape)}")
    if w.dim() != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: expected {w_name} [ffn, d={x.shape[1]}], got {tuple(w.shape)}")
    if b.shape != (w.shape[0],):
        raise ValueError(f"{op}: expected {b_name} [ffn={w.shape[0]}], got {tuple(b.shape)}")
    _check_operands(op, {"x": x, w_name: w, b_name: b})
    _check_idx(op, idx, x.device)


def check_gather_up_args(x: Tensor, w: Tensor, b: Tensor, idx: Tensor) -> None:
    """Raise ``ValueError`` naming the argument, the expected and the actual when gather_up's inputs are malformed."""
    _check_up("gather_up", x, idx, "w", w, "b", b)


def gather_up_reference(x: Tensor, w: Tensor, b: Tensor, idx: Tensor) -> Tensor:
    """``relu(x @ w[idx].T + b[idx])`` in plain PyTorch, fp32, in x's dtype."""
    return torch.relu(torch.nn.functional.linear(x.float(), w[idx].float(), b[idx].float())).to(x.dtype)


@torch.library.triton_op("polar::gather_up", mutates_args=())
def gather_up(x: Tensor, w: Tensor, b: Tensor, idx: Tensor) -> Tensor:
    """The MLP's up projection + ReLU for the neurons ``idx`` only: ``relu(x @ w[idx].T + b[idx])``, ``[N, k]``."""
    check_gather_up_args(x, w, b, idx)
    if x.device.type == "cuda":
        from .kernels.gather_gemm import gather_up_triton

        return gather_up_triton(x, w, b, idx)
    return gather_up_reference(x, w, b, idx)


@gather_up.register_fake
def _(x: Tensor, w: Tensor, b: Tensor, idx: Tensor) -> Tensor:
    check_gather_up_args(x, w, b, idx)
    return x.new_empty((x.shape[0], idx.shape[0]))


def check_gather_gated_up_args(
    x: Tensor, w_gate: Tensor, b_gate: Tensor, w_up: Tensor, b_up: Tensor, idx: Tensor
) -> None:
    """Raise ``ValueError`` naming the argument, the expected and the actual when gather_gated_up's inputs are
    malformed."""
    _check_up("gather_gated_up", x, idx, "w_gate", w_gate, "b_gate", b_gate)
    _check_up("gather_gated_up", x, idx, "w_up", w_up, "b_up", b_up)
    if w_up.shape != w_gate.shape:
        raise ValueError(
            f"gather_gated_up: expected w_up of w_gate's shape {tuple(w_gate.shape)}, got {tuple(w_up.shape)}"
        )


def gather_gated_up_reference(
    x: Tensor, w_gate: Tensor, b_gate: Tensor, w_up: Tensor, b_up: Tensor, idx: Tensor
) -> Tensor:
    """``relu(x @ w_gate[idx].T + b_gate[idx]) * (x @ w_up[idx].T + b_up[idx])`` in plain PyTorch, fp32, in x's
    dtype."""
    gate = torch.nn.functional.linear(x.float(), w_gate[idx].float(), b_gate[idx].float())
    up = torch.nn.functional.linear(x.float(), w_up[idx].float(), b_up[idx].float())
    return (torch.relu(gate) * up).to(x.dtype)


@torch.library.triton_op("polar::gather_gated_up", mutates_args=())
def gather_gated_up(x: Tensor, w_gate: Tensor, b_gate: Tensor, w_up: Tensor, b_up: Tensor, idx: Tensor) -> Tensor:
    """A gated-ReLU MLP's gate and up projections for the neurons ``idx`` only, multiplied: ``[N, k]``."""
    check_gather_gated_up_args(x, w_gate, b_gate, w_up, b_up, idx)
    if x.device.type == "cuda":
        from .kernels.gather_gemm import gather_up_triton

        return gather_up_triton(x, w_gate, b_gate, idx, w_up, b_up)
    return gather_gated_up_reference(x, w_gate, b_gate, w_up, b_up, idx)


@gather_gated_up.register_fake
def _(x: Tensor, w_gate: Tensor, b_gate: Tensor, w_up: Tensor, b_up: Tensor, idx: Tensor) -> Tensor:
    check_gather_gated_up_args(x, w_gate, b_gate, w_up, b_up, idx)
    return x.new_empty((x.shape[0], idx.shape[0]))


def _check_down(op: str, h: Tensor, w_t: Tensor, idx: Tensor) -> None:
    _check_idx(op, idx, h.device)
    if h.dim() != 2 or h.shape[1] != idx.shape[0]:
        raise ValueError(f"{op}: expected h [N, k={idx.shape[0]}] (a column per index), got {tuple(h.shape)}")
    if w_t.dim() != 2:
        raise ValueError(f"{op}: expected w_t [ffn, d_out], got {tuple(w_t.shape)}")
    _check_operands(op, {"h": h, "w_t": w_t})


def check_gather_down_args(h: Tensor, w_t: Tensor, b: Tensor, idx: Tensor) -> None:
    """Raise ``ValueError`` naming the argument, the expected and the actual when gather_down's inputs are
    malformed."""
    _check_down("gather_down", h, w_t, idx)
    if b.shape != (w_t.shape[1],):
        raise ValueError(f"gather_down: expected b [d_out={w_t.shape[1]}], got {tuple(b.shape)}")
    _check_operands("gather_down", {"h": h, "b": b})


def gather_down_reference(h: Tensor, w_t: Tensor, b: Tensor, idx: Tensor) -> Tensor:
    """``h @ w_t[idx] + b`` in plain PyTorch, fp32, in h's dtype."""
    return torch.addmm(b.float(), h.float(), w_t[idx].float()).to(h.dtype)


@torch.library.triton_op("polar::gather_down", mutates_args=())
def gather_down(h: Tensor, w_t: Tensor, b: Tensor, idx: Tensor) -> Tensor:
    """The MLP's down projection over the neurons ``idx`` only: ``h @ w_t[idx] + b``, ``[N, d_out]`` (``w_t``: the
    down weight transposed, contiguous, so each selected neuron's row is one read)."""
    check_gather_down_args(h, w_t, b, idx)
    if h.device.type == "cuda":
        from .kernels.gather_gemm import gather_down_triton

        return gather_down_triton(h, w_t, b, idx)
    return gather_down_reference(h, w_t, b, idx)


@gather_down.register_fake
def _(h: Tensor, w_t: Tensor, b: Tensor, idx: Tensor) -> Tensor:
    check_gather_down_args(h, w_t, b, idx)
    return h.new_empty((h.shape[0], w_t.shape[1]))


def check_gather_down_partials_args(h: Tensor, w_t: Tensor, idx: Tensor, split_len: int) -> None:
    """Raise ``ValueError`` naming the argument, the expected and the actual when gather_down_partials' inputs are
    malformed."""
    _check_down("gather_down_partials", h, w_t, idx)
    if split_len < 1:
        raise ValueError(f"gather_down_partials: expected split_len >= 1 (selected neurons a slice), got {split_len}")


def gather_down_partials_reference(h: Tensor, w_t: Tensor, idx: Tensor, split_len: int) -> Tensor:
    """``h[:, slice] @ w_t[idx[slice]]`` for each slice of ``split_len`` consecutive slots, in plain PyTorch, fp32,
    stacked: ``[cdiv(k, split_len), N, d_out]``."""
    slices = [slice(start, start + split_len) for start in range(0, idx.shape[0], split_len)]
    return torch.stack([h[:, part].float() @ w_t[idx[part]].float() for part in slices])


@torch.library.triton_op("polar::gather_down_partials", mutates_args=())
def gather_down_partials(h: Tensor, w_t: Tensor, idx: Tensor, split_len: int) -> Tensor:
    """``gather_down`` without its bias, left as fp32 partial products over consecutive slices of ``split_len``
    selected neurons, ``[cdiv(k, split_len), N, d_out]``: summed in slice order and added to the bias they give
    ``gather_down`` (before its rounding to h's dtype). The polar backend emits it so that Inductor fuses that sum
    into the output's consumer (the residual add) instead of a finishing launch."""
    check_gather_down_partials_args(h, w_t, idx, split_len)
    if h.device.type == "cuda":
        from .kernels.gather_gemm import gather_down_partials_triton

        return gather_down_partials_triton(h, w_t, idx, split_len)
    return gather_down_partials_reference(h, w_t, idx, split_len)


@gather_down_partials.register_fake
def _(h: Tensor, w_t: Tensor, idx: Tensor, split_len: int) -> Tensor:
    check_gather_down_partials_args(h, w_t, idx, split_len)
    return h.new_empty((-(-idx.shape[0] // split_len), h.shape[0], w_t.shape[1]), dtype=torch.float32)

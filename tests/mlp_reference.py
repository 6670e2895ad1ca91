"""The test's own sparse-MLP reference: forward hooks on stock HF modules, written from the bank's tensors alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# family -> per decoder layer, (the module whose input is the MLP input, the down projection): the test's own
# knowledge of HF layouts
_MLP_MODULES = {
    "opt": lambda layer: (layer.fc1, layer.fc2),
    "gpt2": lambda layer: (layer.mlp.c_fc, layer.mlp.c_proj),
    "gpt_neox": lambda layer: (layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h),
    "llama": lambda layer: (layer.mlp.up_proj, layer.mlp.down_proj),
    "mistral": lambda layer: (layer.mlp.up_proj, layer.mlp.down_proj),
    "phi3": lambda layer: (layer.mlp.gate_up_proj, layer.mlp.down_proj),
    "falcon": lambda layer: (layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h),
    "nemotron": lambda layer: (layer.mlp.up_proj, layer.mlp.down_proj),
    "qwen2": lambda layer: (layer.mlp.up_proj, layer.mlp.down_proj),
    "gemma": lambda layer: (layer.mlp.up_proj, layer.mlp.down_proj),
    "glm": lambda layer: (layer.mlp.gate_up_proj, layer.mlp.down_proj),
    "starcoder2": lambda layer: (layer.mlp.c_fc, layer.mlp.c_proj),
    "gpt_bigcode": lambda layer: (layer.mlp.c_fc, layer.mlp.c_proj),
    "gptj": lambda layer: (layer.mlp.fc_in, layer.mlp.fc_out),
    "codegen": lambda layer: (layer.mlp.fc_in, layer.mlp.fc_out),
    "xglm": lambda layer: (layer.fc1, layer.fc2),
    "biogpt": lambda layer: (layer.fc1, layer.fc2),
    "persimmon": lambda layer: (layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h),
}


def decoder_layer_list(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers (by the HF attribute names of the families above)."""
    base = (getattr(model, "model", None) or getattr(model, "transformer", None) or getattr(model, "biogpt", None)
            or model.gpt_neox)
    base = getattr(base, "decoder", base)
    return getattr(base, "layers", None) or base.h


def union_scores(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """float64 ``sum_rows relu(x @ w_in.T @ w_out.T)`` over every token row of ``x`` ``[..., hidden]``: ``[ffn]``."""
    rows = x.reshape(-1, x.shape[-1]).double()
    return torch.relu(rows @ w_in.to(rows).T @ w_out.to(rows).T).sum(0)


def boundary_gap(scores: torch.Tensor, k: int) -> float:
    """Relative gap between the k-th and (k+1)-th largest score (inf when k keeps all): near-ties make the top-k
    depend on rounding, so tests skip them."""
    if k >= scores.numel():
        return float("inf")
    top = scores.sort(descending=True).values
    return float((top[k - 1] - top[k]) / top[0].abs().clamp(min=1e-30))


@contextmanager
def sparse_mlps(model: nn.Module, family: str, mlp, batch_size: int, gaps: list[float] | None = None
                ) -> Iterator[None]:
    """While active, at decode steps (``batch_size`` tokens), every MLP of a layer with a router keeps only the top-k
    neurons of the batch's summed router scores (k from the table row for ``batch_size``; None: dense): the down
    projection's input is zeroed elsewhere. Prefill stays dense.
    Appends each layer's :func:`boundary_gap` to ``gaps``."""
    handles = []
    for index, layer in enumerate(decoder_layer_list(model)):
        k = mlp.k_for(index, batch_size) if index in mlp.w_in else None
        if k is None:
            continue
        first, down = _MLP_MODULES[family](layer)
        chosen = {}

        def capture(module, args, index=index, k=k, chosen=chosen):
            chosen["mask"] = None
            if args[0].numel() // args[0].shape[-1] != batch_size:
                return  # prefill (more tokens than sequences) stays dense
            scores = union_scores(args[0], mlp.w_in[index], mlp.w_out[index])
            chosen["mask"] = torch.zeros_like(scores).index_fill(0, scores.topk(k).indices, 1.0)
            if gaps is not None:
                gaps.append(boundary_gap(scores, k))

        def mask(module, args, chosen=chosen):
            if chosen["mask"] is None:
                return None
            return (args[0] * chosen["mask"].to(args[0].dtype),)

        handles += [first.register_forward_pre_hook(capture), down.register_forward_pre_hook(mask)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

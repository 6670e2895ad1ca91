"""Hands gather_down's finishing sum to Inductor: the last step before the graph goes to Inductor on CUDA.

Where a rewritten MLP's ``polar.gather_down`` runs its reduction over several splits (a small decode batch: too few
output tiles to keep the SMs streaming), its kernel stores fp32 partials and a second launch sums them, adds the bias
and rounds. This step replaces such a call by

    part = polar.gather_down_partials(h, w_t, idx, split_len)    # [S, N, d_out] fp32, the same split
    out  = (part[0] + part[1] + ... + part[S-1] + b.float()).to(h.dtype)

the same sums in the same order, as graph ops that Inductor fuses into the output's consumer (the residual add and the
next layer's norm): one launch less per routed layer (~3 µs at B <= 16 on the H200). Export graphs keep
``gather_down``; the batch size must be static (the split depends on it).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .graph import fake_value, static_int

__all__ = ["split_down_finish"]

_GATHER_DOWN = torch.ops.polar.gather_down.default
_GATHER_DOWN_PARTIALS = torch.ops.polar.gather_down_partials.default


def split_down_finish(gm: fx.GraphModule, device_types: tuple[str, ...] = ("cuda",)) -> int:
    """Rewrite every ``polar.gather_down`` on ``device_types`` whose default launch splits its reduction as above;
    returns how many."""
    from ..kernels.gather_gemm import gather_down_split_len

    graph = gm.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.target not in (_GATHER_DOWN, _GATHER_DOWN.overloadpacket):  # the pass's; a Dynamo graph's
            continue
        h, w_t, b, idx = node.args
        h_value, out_value = fake_value(h), fake_value(node)  # [N, k], [N, d_out]
        if h_value is None or out_value is None or h_value.device.type not in device_types:
            continue
        rows, k = (static_int(size) for size in h_value.shape)
        if rows is None or k is None:
            continue
        split_len = gather_down_split_len(rows, k, out_value.shape[1], h_value.dtype, h_value.device)
        if split_len >= k:  # one split: the kernel adds the bias and rounds in its own epilogue
            continue
        with graph.inserting_before(node):
            part = graph.call_function(_GATHER_DOWN_PARTIALS, (h, w_t, idx, split_len))  # [S, N, d_out] fp32
            total = graph.call_function(operator.getitem, (part, 0))
            for split in range(1, -(-k // split_len)):  # in split order, as the finishing launch sums
                total = graph.call_function(operator.add, (total, graph.call_function(operator.getitem, (part, split))))
            total = graph.call_function(operator.add, (total, graph.call_function(torch.Tensor.float, (b,))))
            out = graph.call_function(torch.Tensor.to, (total, h_value.dtype))  # [N, d_out]
        for new in (part, out):
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        out.meta.update({key: value for key, value in node.meta.items() if key in ("example_value", "val")})
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
    return rewritten

"""ONNX export: each polar op's translation, run in onnxruntime, against the op's reference; no custom domain."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import Tensor, nn

from polar_compile.export.onnx_ops import TRANSLATIONS

ort = pytest.importorskip("onnxruntime")

DRAWS = 3  # fresh random inputs per exported graph


def export(module: nn.Module, args: tuple[Tensor, ...]) -> onnx.ModelProto:
    """``module`` exported with the polar translations; asserts that every node is a default-domain ONNX op."""
    program = torch.onnx.export(module.eval(), args, dynamo=True, custom_translation_table=TRANSLATIONS, verbose=False)
    model = program.model_proto
    assert not model.functions
    assert {opset.domain for opset in model.opset_import} <= {"", "ai.onnx"}
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    return model


def run(model: onnx.ModelProto, args: tuple[Tensor, ...]) -> list[Tensor]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(out) for out in session.run(None, dict(zip(names, (a.numpy() for a in args),
                                                                         strict=True)))]


class Op(nn.Module):
    """Calls one polar op with the tensors it is given and fixed int arguments after them."""

    def __init__(self, op: torch._ops.OpOverload, *constants: int | float) -> None:
        super().__init__()
        self.op, self.constants = op, constants

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.op(*tensors, *self.constants)


def _units(batch: int, kv_heads: int, k: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    """Per row, k distinct KV groups in random order."""
    return torch.stack([torch.randperm(kv_heads, generator=g)[:k] for _ in range(batch)]).to(dtype)


@pytest.mark.parametrize(("heads", "kv_heads", "k", "mask", "units_dtype"), [
    (4, 4, 4, "bool", torch.int64),      # MHA, every unit kept
    (8, 4, 1, "bool", torch.int32),      # GQA, one group
    (8, 2, 1, "additive", torch.int64),  # GQA 4 heads a group, additive mask
    (6, 3, 2, "broadcast", torch.int64),  # one mask row for the batch
])
def test_select_attention(heads, kv_heads, k, mask, units_dtype):
    batch, length, head_dim, scale = 3, 7, 8, 0.4
    g = torch.Generator().manual_seed(heads * 10 + k)

    def draw():
        q = torch.randn(batch, heads, 1, head_dim, generator=g)
        key, value = (torch.randn(batch, kv_heads, length, head_dim, generator=g) for _ in range(2))
        units = _units(batch, kv_heads, k, units_dtype, g)
        if mask == "broadcast":
            m = torch.rand(1, 1, 1, length, generator=g) > 0.3
        else:
            m = torch.ones(batch, 1, 1, length, dtype=torch.bool)
            m[1, ..., :3] = False  # left padding
            m[2] = False  # nothing to attend to: zeros
            m[0, ..., -2:] = False  # unfilled cache tail
            if mask == "additive":
                m = torch.zeros(m.shape).masked_fill(~m, float("-inf"))
        return q, key, value, units, m

    module = Op(torch.ops.polar.select_attention.default, scale)
    model = export(module, draw())
    ops = {node.op_type for node in model.graph.node}
    assert "Gather" in ops and "ScatterND" in ops  # attention on the gathered groups, not all heads masked
    for _ in range(DRAWS):
        args = draw()
        (actual,) = run(model, args)
        torch.testing.assert_close(actual, module(*args), atol=1e-5, rtol=1e-5)


def _route_scores_input(kind: str, g: torch.Generator, rows: int, hidden: int, units: int):
    """x, weight, bias for route: random, or integer valued with exact ties, NaN and -0.0 in the scores."""
    if kind == "random":
        return torch.randn(rows, 1, hidden, generator=g), torch.randn(units, hidden, generator=g), torch.randn(
            units, generator=g)
    x = torch.randint(-2, 3, (rows, 1, hidden), generator=g).float()
    weight = torch.randint(-1, 2, (units, hidden), generator=g).float()
    weight[units // 2:] = weight[: units - units // 2]  # duplicated rows: tied scores
    bias = torch.zeros(units)
    bias[0] = float("nan")
    bias[1] = -0.0
    weight[1] = 0.0
    return x, weight, bias


@pytest.mark.parametrize(("kind", "k"), [("random", 3), ("ties", 1), ("ties", 4), ("ties", 8)])
def test_route(kind, k):
    rows, hidden, units = 5, 16, 8
    g = torch.Generator().manual_seed(k)
    module = Op(torch.ops.polar.route.default, k)
    model = export(module, _route_scores_input(kind, g, rows, hidden, units))
    for _ in range(DRAWS):
        args = _route_scores_input(kind, g, rows, hidden, units)
        (actual,) = run(model, args)
        assert torch.equal(actual, module(*args))


def _mlp_route_input(kind: str, g: torch.Generator, rows: int, hidden: int, rank: int, ffn: int):
    if kind == "random":
        return (torch.randn(rows, 1, hidden, generator=g), torch.randn(rank, hidden, generator=g),
                torch.randn(ffn, rank, generator=g))
    x = torch.randint(-2, 3, (rows, 1, hidden), generator=g).float()
    w_in = torch.randint(-1, 2, (rank, hidden), generator=g).float()
    w_out = torch.randint(-1, 2, (ffn, rank), generator=g).float()
    w_out[ffn // 2:] = w_out[: ffn - ffn // 2]  # duplicated neurons: tied scores
    w_out[3] = 0.0  # a zero score, tied with every ReLU-clipped neuron
    return x, w_in, w_out


@pytest.mark.parametrize(("kind", "k"), [("random", 7), ("ties", 1), ("ties", 9), ("ties", 24)])
def test_mlp_route(kind, k):
    rows, hidden, rank, ffn = 4, 12, 6, 24
    g = torch.Generator().manual_seed(k)
    module = Op(torch.ops.polar.mlp_route.default, k)
    model = export(module, _mlp_route_input(kind, g, rows, hidden, rank, ffn))
    for _ in range(DRAWS):
        args = _mlp_route_input(kind, g, rows, hidden, rank, ffn)
        (actual,) = run(model, args)
        assert torch.equal(actual, module(*args))


@pytest.mark.parametrize("k", [1, 5, 16])
def test_gather_gemms(k):
    rows, hidden, ffn = 3, 8, 16
    g = torch.Generator().manual_seed(k)

    def draw():
        x, h = torch.randn(rows, hidden, generator=g), torch.randn(rows, k, generator=g)
        w_gate, w_up, w_t = (torch.randn(ffn, hidden, generator=g) for _ in range(3))
        b_gate, b_up, b_down = (torch.randn(n, generator=g) for n in (ffn, ffn, hidden))
        idx = torch.randperm(ffn, generator=g)[:k]
        return x, h, w_gate, b_gate, w_up, b_up, w_t, b_down, idx

    class Mlp(nn.Module):
        def forward(self, x, h, w_gate, b_gate, w_up, b_up, w_t, b_down, idx):
            return (torch.ops.polar.gather_up(x, w_up, b_up, idx),
                    torch.ops.polar.gather_gated_up(x, w_gate, b_gate, w_up, b_up, idx),
                    torch.ops.polar.gather_down(h, w_t, b_down, idx))

    model = export(Mlp(), draw())
    for _ in range(DRAWS):
        args = draw()
        for actual, expected in zip(run(model, args), Mlp()(*args), strict=True):
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_router_markers_are_copies():
    hidden, weight, bias = torch.randn(2, 1, 8), torch.randn(4, 8), torch.randn(4)
    model = export(Op(torch.ops.polar.layer_router.default, 1, 2, -1), (hidden, weight, bias))
    torch.testing.assert_close(run(model, (hidden, weight, bias))[0], hidden)

"""ONNX export: each polar op's translation, run in onnxruntime, against the op's reference; the exported decode
step and prefill, run in onnxruntime with the cache carried out -> in, against the eager polar decode step; no
custom domain."""

from __future__ import annotations

import json
import sys

import onnx
import pytest
import torch
from torch import Tensor, nn

import polar_compile
from polar_compile.export import ExportError
from polar_compile.export.decode_step import CacheStep, input_names, new_cache
from polar_compile.export.onnx import PROGRAMS, check_standard_onnx, output_names
from polar_compile.export.onnx_ops import TRANSLATIONS
from polar_compile.testing import random_routers
from tests.models import VOCAB, TinySpec, tiny_model

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
                    torch.ops.polar.gather_down(h, w_t, b_down, idx),
                    torch.ops.polar.gather_down_partials(h, w_t, idx, 2))  # k=5: a last slice of one

    model = export(Mlp(), draw())
    for _ in range(DRAWS):
        args = draw()
        for actual, expected in zip(run(model, args), Mlp()(*args), strict=True):
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_half_precision():
    """fp16 through every op (bf16 has no onnxruntime CPU kernels for MatMul/Gemm: not tested here)."""
    g = torch.Generator().manual_seed(16)

    class Step(nn.Module):
        def forward(self, q, key, value, mask, x, w, b, w_in, w_out, w_up, b_up, w_t, b_down):
            units = torch.ops.polar.route(x, w, b, 2).reshape(q.shape[0], 2)
            rows = x.reshape(-1, x.shape[-1])
            idx = torch.ops.polar.mlp_route(x, w_in, w_out, 5)
            h = torch.ops.polar.gather_gated_up(rows, w_up, b_up, w_up, b_up, idx)
            return (torch.ops.polar.select_attention(q, key, value, units, mask, 0.35), units, idx,
                    torch.ops.polar.gather_down(h, w_t, b_down, idx))

    def draw():
        q = torch.randn(2, 8, 1, 8, generator=g)
        key, value = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(2))
        mask = torch.zeros(2, 1, 1, 6)
        mask[1, ..., :2] = float("-inf")
        x, w, b = torch.randn(2, 1, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(4, generator=g)
        w_in, w_out = torch.randn(6, 16, generator=g), torch.randn(24, 6, generator=g)
        w_up, b_up = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
        w_t, b_down = torch.randn(24, 16, generator=g), torch.randn(16, generator=g)
        return tuple(t.half() for t in (q, key, value, mask, x, w, b, w_in, w_out, w_up, b_up, w_t, b_down))

    model = export(Step(), draw())
    for _ in range(DRAWS):
        args = draw()
        attention, units, idx, down = run(model, args)
        expected = Step()(*args)
        assert torch.equal(units, expected[1]) and torch.equal(idx, expected[2])
        torch.testing.assert_close(attention, expected[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(down, expected[3], atol=2e-2, rtol=2e-3)


def test_every_polar_op_has_a_translation():
    assert {f"polar::{name}" for name in torch.ops.polar._dir} == {op.name() for op in TRANSLATIONS}


def test_router_markers_are_copies():
    hidden, weight, bias = torch.randn(2, 1, 8), torch.randn(4, 8), torch.randn(4)
    model = export(Op(torch.ops.polar.layer_router.default, 1, 2, -1), (hidden, weight, bias))
    torch.testing.assert_close(run(model, (hidden, weight, bias))[0], hidden)


# --- the exported steps -------------------------------------------------------------------------------------------

BATCH, CACHE_LEN, PROMPT, STEPS = 3, 10, 4, 3
PAD = (0, 2, 3)  # left padding per row


def _session(path) -> ort.InferenceSession:
    model = onnx.load(str(path))
    check_standard_onnx(model)  # raises on a custom-domain node or local function
    assert {opset.domain for opset in model.opset_import} <= {"", "ai.onnx"}
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("family", "spec", "mlp"), [
    ("llama", TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=3), False),  # GQA
    ("opt", TinySpec("opt", heads=4, kv_heads=4, head_dim=8, layers=3, bias=True), True),  # ReLU MLP routed
    ("qwen2", TinySpec("qwen2", heads=4, kv_heads=2, head_dim=8, layers=3, bias=True), False),  # q/k/v biases
    ("nemotron", TinySpec("nemotron", heads=4, kv_heads=2, head_dim=8, layers=3), True),  # squared-ReLU MLP routed
])
def test_onnx_steps_match_the_eager_polar_step(family, spec, mlp, tmp_path):
    model = tiny_model(spec, seed=7)
    mlp_routers = {"mlp_rank": 8, "mlp_topk": {BATCH: 0.5}} if mlp else {}
    bank = random_routers(model, seed=7, **mlp_routers)
    polar_compile.export(model, batch_size=BATCH, max_cache_len=CACHE_LEN, prefill_len=PROMPT, path=tmp_path,
                         format="onnx", routers=bank, density=0.5)
    manifest = json.loads((tmp_path / "polar_export.json").read_text())
    assert manifest["cache_mode"] == "io" and manifest["programs"] == PROGRAMS
    assert [line for line in manifest["sites"] if "select_attention" in line or "rewritten" in line]
    decode, prefill = (_session(tmp_path / PROGRAMS[name]) for name in ("decode", "prefill"))
    assert [i.name for i in decode.get_inputs()] == input_names(spec.layers)
    assert [o.name for o in decode.get_outputs()] == output_names(spec.layers)
    ops = [node.op_type for node in onnx.load(str(tmp_path / PROGRAMS["decode"])).graph.node]
    assert ops.count("TopK") == (6 if mlp else 2)  # layers 1, 2 route heads (and neurons: select, then sort)
    assert ops.count("Gemm") >= (4 if mlp else 0)  # the gather-GEMMs

    # the eager polar decode step: CacheStep through the polar backend (reference ops), the cache in place
    step = torch.compile(CacheStep(model), backend=polar_compile.make_backend(bank, 0.5, inductor=False),
                         fullgraph=True)
    generator = torch.Generator().manual_seed(7)
    mask = torch.ones(BATCH, CACHE_LEN, dtype=torch.long)
    for row, pad in enumerate(PAD):
        mask[row, :pad] = 0
    ids = torch.randint(1, VOCAB, (BATCH, PROMPT), generator=generator)
    positions = (mask[:, :PROMPT].cumsum(-1) - 1).clamp(min=0)
    cache = new_cache(model, BATCH, CACHE_LEN)
    names = input_names(spec.layers)

    def feed(*args):
        return dict(zip(names, (a.numpy() for a in args), strict=True))

    with torch.no_grad():
        expected = CacheStep(model)(ids, positions, mask, torch.arange(PROMPT), *cache)  # dense prefill
    logits, *ort_cache = prefill.run(None, feed(ids, positions, mask, torch.arange(PROMPT), *cache))
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)
    prompt, steps = (ids, positions), []
    for slot in range(PROMPT, PROMPT + STEPS):
        ids = torch.randint(1, VOCAB, (BATCH, 1), generator=generator)
        positions = mask[:, : slot + 1].sum(-1, keepdim=True) - 1
        args = (ids, positions, mask, torch.tensor([slot]))
        with torch.no_grad():
            expected = step(*args, *cache)
        logits, *ort_cache = decode.run(None, feed(*args, *(torch.from_numpy(c) for c in ort_cache)))
        torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)
        steps.append((ids, positions, slot, expected))
    written = mask[:, None, : PROMPT + STEPS, None].bool()  # slots holding real tokens (padding's K/V is unused)
    for actual, reference in zip(ort_cache, cache, strict=True):
        actual = torch.from_numpy(actual)[:, :, : PROMPT + STEPS]
        torch.testing.assert_close(actual * written, reference[:, :, : PROMPT + STEPS] * written, atol=1e-4,
                                   rtol=1e-4)

    # the same artifact through export.load: the cache each step returns is copied into the caller's tensors
    deployment = polar_compile.export.load(tmp_path)
    # poisoned (finite: slots after the last step stay unwritten, and masked slots must not turn into NaN)
    loaded_cache = [torch.full_like(c, 1e4) for c in deployment.new_cache()]
    deployment.prefill(*prompt, mask, loaded_cache)
    for ids, positions, slot, expected in steps:
        torch.testing.assert_close(deployment.decode(ids, positions, mask, slot, loaded_cache), expected,
                                   atol=1e-4, rtol=1e-4)
    for actual, reference in zip(loaded_cache, cache, strict=True):
        torch.testing.assert_close(actual[:, :, : PROMPT + STEPS] * written,
                                   reference[:, :, : PROMPT + STEPS] * written, atol=1e-4, rtol=1e-4)


def test_custom_domain_node_is_an_error():
    node = onnx.helper.make_node("select_attention", ["q"], ["out"], domain="polar")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("q", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1])])
    with pytest.raises(ExportError, match=r"outside the standard domain.*polar::select_attention"):
        check_standard_onnx(onnx.helper.make_model(graph), "decode")


def test_missing_onnxscript_is_a_clear_error(monkeypatch, tmp_path):
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=2))
    monkeypatch.setitem(sys.modules, "polar_compile.export.onnx_ops", None)  # as if onnxscript were missing
    with pytest.raises(ExportError, match=r"pip install 'polar-compile\[onnx\]'"):
        polar_compile.export(model, batch_size=1, max_cache_len=4, path=tmp_path, format="onnx",
                             routers=random_routers(model), density=0.5)

"""MLP routers in calibration and evaluation: the instrument's MLP hook, the online trainer, the k table, eval's MLP
sparsity against references written here from the model's own modules."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from polar_compile.calibrate import calibrate
from polar_compile.calibrate_mlp import MlpCalibrator, auto_rank, draw_batches, k_table
from polar_compile.evaluate import EvalReport, Evaluator, Sparsity, evaluate, format_report, plot_report
from polar_compile.instrument import InstrumentError, MlpInfo, instrument
from polar_compile.mlp_routers import MlpRouters
from polar_compile.routers import RouterBank
from polar_compile.testing import random_routers
from tests.calib_models import WIKITEXT, load_shared, needs_shared, random_windows
from tests.models import TinySpec, tiny_config

# family -> (config fields that make its MLP ReLU, ffn field, (up module, down module) names in its MLP's parent)
RELU = {
    "opt": ({}, "ffn_dim", ("fc1", "fc2")),
    "gpt2": ({"activation_function": "relu"}, "n_inner", ("c_fc", "c_proj")),
    "gpt_neox": ({"hidden_act": "relu"}, "intermediate_size", ("dense_h_to_4h", "dense_4h_to_h")),
    "llama": ({"hidden_act": "relu"}, "intermediate_size", ("gate_proj", "down_proj")),
    "phi3": ({"hidden_act": "relu"}, "intermediate_size", ("gate_up_proj", "down_proj")),  # fused gate/up
    "glm": ({"hidden_act": "relu"}, "intermediate_size", ("gate_up_proj", "down_proj")),  # fused gate/up
    "gpt_bigcode": ({"activation_function": "relu"}, "n_inner", ("c_fc", "c_proj")),
}


def relu_model(family: str, ffn: int = 64, layers: int = 2, seed: int = 0, active_bias: float | None = None):
    """A tiny random ReLU-MLP model of ``family``; ``active_bias``: OPT's fc1 biases all set to it (sparser MLPs)."""
    spec = TinySpec(family, heads=4, kv_heads=2 if family == "llama" else 4, head_dim=8, layers=layers,
                    bias=family == "opt")
    config = tiny_config(spec)
    fields, width, _ = RELU[family]
    for name, value in {**fields, width: ffn}.items():
        setattr(config, name, value)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3 / parameter.shape[1] ** 0.25)
        if active_bias is not None:
            for module in mlp_modules(model):
                module[0].bias.fill_(active_bias)
    return model


def mlp_modules(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """Per layer, the (up or gate projection, down projection): the test's own knowledge of HF layouts."""
    family = model.config.model_type
    up, down = RELU[family][2]
    return [(getattr(m, up), getattr(m, down)) for m in model.modules() if hasattr(m, up) and hasattr(m, down)]


def with_down_inputs(model, input_ids, change=None):
    """Logits of ``model`` on ``input_ids`` and each layer's (MLP input, down input) as [B, T, width], through
    forward pre-hooks; ``change(layer, x, h) -> h`` replaces the down projection's input."""
    batch, length = input_ids.shape
    seen, handles = {}, []
    for layer, (up, down) in enumerate(mlp_modules(model)):
        def save_x(module, args, layer=layer):
            seen[layer, "x"] = args[0].reshape(batch, length, -1)

        def on_h(module, args, layer=layer):
            h = args[0]
            seen[layer, "h"] = h.reshape(batch, length, -1)
            if change is not None:
                return (change(layer, seen[layer, "x"], seen[layer, "h"]).reshape(h.shape),)
            return None

        handles += [up.register_forward_pre_hook(save_x), down.register_forward_pre_hook(on_h)]
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits
    for handle in handles:
        handle.remove()
    return logits, seen


def passthrough(site, x, out):
    return out


@pytest.mark.parametrize("family", RELU)
def test_the_mlp_hook_sees_the_mlps_input_and_hidden_activation(family):
    model = relu_model(family, ffn=48, seed=1)
    ids = random_windows(3, 7, seed=2)[:, :-1]
    got = {}

    def record(info, x, h):
        got[info.layer] = (info, x.clone(), h.clone())
        return h

    instrumented = instrument(model, passthrough, mlp_hook=record)
    logits = instrumented(ids)
    reference, seen = with_down_inputs(model, ids)
    torch.testing.assert_close(logits, reference)  # a hook returning h leaves the model dense
    assert instrumented.mlp_layers == [0, 1]
    for layer in (0, 1):
        info, x, h = got[layer]
        assert info == MlpInfo(layer, 32, 48, gated=family in ("llama", "phi3", "glm"))
        assert x.shape == (3, 7, 32) and h.shape == (3, 7, 48)
        torch.testing.assert_close(x, seen[layer, "x"])
        torch.testing.assert_close(h, seen[layer, "h"])


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_a_masking_hook_equals_masking_the_down_projections_input(family):
    model = relu_model(family, ffn=48, seed=3)
    ids = random_windows(2, 9, seed=4)[:, :-1]
    masks = {layer: torch.rand(2, 9, 48, generator=torch.Generator().manual_seed(layer)) > 0.5 for layer in (0, 1)}
    logits = instrument(model, passthrough, mlp_hook=lambda info, x, h: h * masks[info.layer])(ids)
    reference, _ = with_down_inputs(model, ids, change=lambda layer, x, h: h * masks[layer])
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    dense, _ = with_down_inputs(model, ids)
    assert (logits - dense).abs().max() > 1e-3


def test_mlp_calibration_on_a_silu_model_names_the_activation():
    model = relu_model("llama", seed=1)
    model.config.hidden_act = "silu"
    model = transformers.AutoModelForCausalLM.from_config(model.config).eval()
    with pytest.raises(InstrumentError, match=r"no ReLU MLP to route: its MLPs' activation is silu, which has no "
                                              r"exact zeros"):
        calibrate(model, random_windows(4, 8), seq_len=8, progress=False, mlp_rank=32)
    bank = calibrate(model, random_windows(4, 8), seq_len=8, progress=False, mlp_steps=2)  # "auto": none
    assert bank.mlp is None and "silu" in bank.provenance["mlp"]["off"]
    assert calibrate(model, random_windows(4, 8), seq_len=8, progress=False, mlp_rank=0).mlp is None


def test_auto_rank_keeps_the_router_near_three_percent_of_the_mlp():
    assert auto_rank(MlpInfo(0, 4096, 16384)) == 192  # OPT-6.7B: 192 * 20480 / (2 * 4096 * 16384) = 2.9%
    assert auto_rank(MlpInfo(0, 9216, 36864)) == 432  # OPT-66B
    assert auto_rank(MlpInfo(0, 4096, 11008, gated=True)) == 256  # a gated MLP has 3 matrices
    assert auto_rank(MlpInfo(0, 256, 1024)) == 128  # tiny: the floor (31% of the MLP)
    assert auto_rank(MlpInfo(0, 64, 256)) == 64  # never wider than hidden


def test_batches_come_from_different_windows_while_there_are_enough():
    windows = torch.arange(10).repeat_interleave(7)  # 10 windows of 7 tokens
    batches = draw_batches(windows, 8, 50, torch.Generator().manual_seed(0))
    assert all(len(set(windows[row].tolist())) == 8 for row in batches)
    batches = draw_batches(windows, 25, 20, torch.Generator().manual_seed(1))  # every window 2-3 times
    for row in batches:
        assert len(set(row.tolist())) == 25
        assert sorted(torch.bincount(windows[row], minlength=10).tolist())[0] >= 2


def test_k_table_on_a_perfect_and_a_useless_router():
    generator = torch.Generator().manual_seed(0)
    active = torch.zeros(400, 256, dtype=torch.bool)
    active[:, :40] = torch.rand(400, 40, generator=generator) > 0.5  # only the first 40 neurons ever fire
    windows = torch.arange(400)
    perfect = k_table(active.float(), active, windows, batch_sizes=(1, 4, 64), draws=64)
    assert perfect == {1: (64, 1.0), 4: (64, 1.0), 64: (64, 1.0)}
    useless = k_table(torch.rand(400, 256, generator=generator), active, windows, batch_sizes=(1, 4), draws=64)
    assert useless[1][0] is None and useless[4][0] is None  # k = ffn: dense
    first_only = torch.zeros(400, 256)
    first_only[:, 0] = 1.0  # ties everywhere else: the lower index first, as polar::mlp_route
    assert k_table(first_only, active, windows, batch_sizes=(1,), draws=8)[1] == (64, 1.0)


def test_the_calibrator_stores_a_bounded_held_out_sample():
    calibrator = MlpCalibrator(rank=16, dense_layers=(0,), train_windows=6, heldout_windows=30, batch_size=6,
                               seq_len=20, capacity=50, min_steps=2, step_tokens=32)
    info = MlpInfo(1, 8, 64)
    for start in range(0, 36, 6):
        x, h = torch.randn(6, 20, 8), torch.relu(torch.randn(6, 20, 64))
        calibrator.begin_batch(range(start, start + 6))
        assert calibrator(info, x, h) is h and calibrator(MlpInfo(0, 8, 64), x, h) is h
    (layer,) = calibrator.layers.values()
    assert list(calibrator.layers) == [1] and layer.heldout.count == 50 and layer.tokens == 6 * 20
    assert sum(len(x) for x in layer.heldout.x) == 50 and len(set(torch.cat(layer.heldout.windows).tolist())) == 25


def independent_union_recall(model, bank, windows, batch_size, draws=400, seed=0):
    """Mean union recall at the table's k per layer, from forward hooks and float64 scores: tokens of windows
    ``[n, T + 1]``, batches of distinct windows."""
    _, seen = with_down_inputs(model, windows[:, :-1])
    generator = torch.Generator().manual_seed(seed)
    recalls = {}
    for layer in bank.mlp.layers:
        k = bank.mlp.k_for(layer, batch_size)
        x, active = seen[layer, "x"].double(), seen[layer, "h"] != 0  # [n, T, .]
        scores = torch.relu(x @ bank.mlp.w_in[layer].double().T @ bank.mlp.w_out[layer].double().T)
        total = 0.0
        for _ in range(draws):
            rows = torch.randperm(len(windows), generator=generator)[:batch_size]
            cols = torch.randint(0, windows.shape[1] - 1, (batch_size,), generator=generator)
            union = active[rows, cols].any(0)
            top = torch.zeros_like(union)
            top[scores[rows, cols].sum(0).topk(k or union.numel()).indices] = True
            total += (union & top).sum().item() / max(1, union.sum().item())
        recalls[layer] = total / draws
    return recalls


def test_calibration_builds_an_mlp_table_that_reaches_its_recall_on_held_out_text():
    model = relu_model("opt", ffn=256, layers=3, seed=5, active_bias=-0.8)
    windows = random_windows(400, 16, seed=6)
    bank = calibrate(model, windows, seq_len=16, heldout=0.5, batch_size=100, progress=False, mlp_rank=32,
                     mlp_steps=300, mlp_heldout_tokens=2048)
    mlp = bank.mlp
    assert mlp.rank == 32 and mlp.layers == [1, 2] and sorted(mlp.topk) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    reports = bank.provenance["mlp"]["layers"]
    assert [r["layer"] for r in reports] == [1, 2]
    for report in reports:
        assert report["train_tokens"] == 200 * 16 * bank.provenance["mlp"]["passes"] and report["steps"] >= 300
        assert report["heldout_tokens"] == 2048 and report["seconds"] > 0 and math.isfinite(report["loss"])
        ks = [mlp.topk[b][report["layer"]] or 256 for b in sorted(mlp.topk)]
        assert ks == sorted(ks) and all(k % 64 == 0 for k in ks)  # non-decreasing in B, multiples of the tile
        assert all(r >= 0.99 for r in report["recall"].values())
    assert mlp.topk[1][0] is None and mlp.topk[1][1] is not None and mlp.topk[1][1] < 256  # the router is useful
    held_out = windows[200:]
    for size in (1, 4):
        recalls = independent_union_recall(model, bank, held_out, size)
        assert all(r >= 0.985 for r in recalls.values()), (size, recalls)


def mlp_bank(model, k: int, seed: int = 0) -> RouterBank:
    """Random attention routers and random rank-8 MLP routers for layers 1.. with k at batch size 1 (dense at 2)."""
    generator = torch.Generator().manual_seed(seed)
    bank = random_routers(model, seed=seed)
    layers, ffn, hidden = model.config.num_hidden_layers, mlp_modules(model)[0][0].out_features, 32
    w_in = {layer: torch.randn(8, hidden, generator=generator) for layer in range(1, layers)}
    w_out = {layer: torch.randn(ffn, 8, generator=generator) for layer in range(1, layers)}
    topk = {1: (None, *[k] * (layers - 1)), 2: (None,) * layers}
    return RouterBank(bank.shape, bank.weights, bank.biases, bank.densities, mlp=MlpRouters(8, w_in, w_out, topk))


def test_eval_mlp_sparsity_equals_an_independent_masked_reference():
    model = relu_model("opt", ffn=256, layers=3, seed=7)
    windows = random_windows(3, 12, seed=8)
    bank = mlp_bank(model, k=40)

    def top_k(layer, x, h):
        if layer == 0:
            return h
        scores = torch.relu(x.double() @ bank.mlp.w_in[layer].double().T @ bank.mlp.w_out[layer].double().T)
        keep = torch.zeros_like(h).scatter(-1, scores.topk(40, dim=-1).indices, 1.0)
        return h * keep

    logits, _ = with_down_inputs(model, windows[:, :-1], change=top_k)
    reference = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    evaluator = Evaluator(model, bank, batch_size=2, progress=False)
    torch.testing.assert_close(evaluator.token_nll(windows, evaluator.sparsity("mlp", 0.5)), reference,
                               rtol=1e-4, atol=1e-4)
    everything = mlp_bank(model, k=256)
    evaluator = Evaluator(model, everything, batch_size=2, progress=False)
    dense = evaluator.token_nll(windows, Sparsity())
    assert torch.equal(evaluator.token_nll(windows, evaluator.sparsity("mlp", 1.0)), dense)


def test_eval_reports_mlp_perplexity_and_union_recall(tmp_path):
    model = relu_model("opt", ffn=256, layers=3, seed=9)
    windows = random_windows(6, 16, seed=10)
    report = evaluate(model, windows, [1.0, 0.5], mlp_bank(model, k=64), batch_size=3, prompts=2, prompt_len=4,
                      new_tokens=3, progress=False)
    dense = report.perplexity["dense", 1.0]
    assert report.perplexity["mlp", 0.5] == report.perplexity["mlp", 1.0] == report.perplexity["routers+mlp", 1.0]
    assert report.perplexity["mlp", 1.0] != dense != report.perplexity["routers+mlp", 0.5]
    assert sorted(report.union_recall) == [1, 2] and report.union_recall[2] == 1.0 and report.union_kept[2] == 1.0
    assert 0 < report.union_recall[1] < 1 and report.union_kept[1] == 0.25
    table = format_report(report)
    assert "| routers+mlp |" in table and "| union recall |" in table and "| neurons kept | 25% | 100% |" in table
    assert EvalReport.from_json(json.loads(json.dumps(report.to_json()))) == report
    assert plot_report({"tiny": report}, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_a_bank_with_mlp_routers_on_a_silu_model_is_refused():
    relu = relu_model("llama", seed=1)
    bank = mlp_bank(relu, k=16)
    relu.config.hidden_act = "silu"
    silu = transformers.AutoModelForCausalLM.from_config(relu.config).eval()
    evaluator = Evaluator(silu, bank, progress=False)
    with pytest.raises(InstrumentError, match="activation is silu, which has no exact zeros"):
        evaluator.token_nll(random_windows(1, 8), Sparsity())


@needs_shared
def test_tiny_opt_mlp_sparsity_at_batch_size_one_costs_little_perplexity():
    from polar_compile.data import as_windows

    model, tokenizer = load_shared("tiny-opt-wt2")
    bank = calibrate(model, WIKITEXT / "valid.txt", tokenizer=tokenizer, tokens=24 * 512, heldout=0.25,
                     progress=False, mlp_steps=150)
    assert bank.mlp is not None and bank.mlp.layers == [1, 2, 3, 4, 5]
    windows = as_windows(WIKITEXT / "test.txt", tokenizer, max_tokens=8 * 512)
    evaluator = Evaluator(model, bank, progress=False)
    dense = evaluator.token_nll(windows, Sparsity()).double().mean().exp().item()
    sparse = evaluator.token_nll(windows, evaluator.sparsity("mlp", 1.0)).double().mean().exp().item()
    assert abs(sparse / dense - 1) <= 0.05, (dense, sparse)  # measured at rank 128 on all of valid.txt: < 0.1%

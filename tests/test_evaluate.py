"""Evaluation: the sparse path equals zeroing heads before the output projection; report, plot and CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from polar_compile.cli import main
from polar_compile.data import as_windows
from polar_compile.evaluate import EvalReport, Evaluator, evaluate, format_report, plot_report
from polar_compile.routers import ModelShape, kept_units
from polar_compile.testing import random_routers
from tests.calib_models import (
    LLAMA,
    OPT,
    WIKITEXT,
    load_shared,
    needs_shared,
    random_text,
    random_windows,
    tiny_tokenizer,
)
from tests.models import attention_modules, tiny_model


def reference_nll(model, windows, method, density, bank=None, tp=1):
    """Per-token NLL with a pre-hook on each gated layer's output projection zeroing the dropped units' heads; with
    ``tp`` > 1 the units are split into ``tp`` blocks (tensor-parallel ranks), each keeping its own top-k. Scores in
    float64."""
    shape = ModelShape.of(model)
    group, local = shape.num_heads // shape.num_kv_heads, shape.num_kv_heads // tp
    k = kept_units(density, local)
    router_inputs, handles = {}, []
    for layer, (q_proj, o_proj) in enumerate(attention_modules(model)):
        if layer == 0:
            continue

        def save_x(module, args, layer=layer):
            router_inputs[layer] = args[0]

        def gate(module, args, layer=layer):
            heads = args[0].unflatten(-1, (shape.num_heads, -1))  # [B, T, H, D]
            if method == "oracle":
                scores = heads.double().norm(dim=-1).unflatten(-1, (-1, group)).sum(-1)  # [B, T, units]
            else:
                scores = router_inputs[layer].double() @ bank.weights[layer].double().T + bank.biases[layer].double()
            keep = torch.zeros_like(scores)
            for rank in range(tp):
                block = scores[..., rank * local : (rank + 1) * local]
                keep[..., rank * local : (rank + 1) * local].scatter_(-1, block.topk(k, dim=-1).indices, 1.0)
            return (heads * keep.repeat_interleave(group, -1)[..., None].to(heads.dtype)).flatten(-2)

        handles += [q_proj.register_forward_pre_hook(save_x), o_proj.register_forward_pre_hook(gate)]
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1], use_cache=False).logits
    for handle in handles:
        handle.remove()
    return F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")


@settings(max_examples=4)
@given(spec=st.sampled_from([LLAMA, OPT]), method=st.sampled_from(["oracle", "routers"]),
       density=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 1000))
def test_sparse_path_equals_zeroing_heads_before_the_output_projection(spec, method, density, seed):
    torch._dynamo.reset()
    model = tiny_model(spec, seed=seed)
    bank = random_routers(model, seed=seed)
    windows = random_windows(3, 12, seed=seed)
    evaluator = Evaluator(model, bank, batch_size=2, progress=False)
    actual = evaluator.token_nll(windows, evaluator.sparsity(method, density))
    torch.testing.assert_close(actual, reference_nll(model, windows, method, density, bank), rtol=1e-4, atol=1e-4)
    dense = evaluator.token_nll(windows, evaluator.sparsity("dense", density))
    torch.testing.assert_close(dense, reference_nll(model, windows, "oracle", 1.0), rtol=1e-4, atol=1e-4)


def test_report_dedupes_dense_configurations_and_plots(tmp_path):
    model = tiny_model(OPT, seed=2)
    windows = random_windows(4, 16, seed=3)
    report = evaluate(model, windows, [1.0, 0.5], random_routers(model, seed=1), batch_size=4, prompts=2,
                      prompt_len=4, new_tokens=5, progress=False)
    assert report.tokens == 4 * 16
    dense = report.perplexity["dense", 1.0]
    assert report.perplexity["dense", 0.5] == report.perplexity["oracle", 1.0] == report.perplexity["routers", 1.0]
    assert dense == pytest.approx(math.exp(reference_nll(model, windows, "oracle", 1.0).mean().item()), rel=1e-5)
    assert report.perplexity["routers", 0.5] > dense and report.perplexity["oracle", 0.5] > dense
    assert report.agreement["dense", 0.5] == report.agreement["routers", 1.0] == 1.0
    assert 0.0 <= report.agreement["routers", 0.5] <= 1.0
    table = format_report(report)
    assert "| routers |" in table and "density 0.5" in table and f"{dense:.2f} (100%)" in table
    assert EvalReport.from_json(json.loads(json.dumps(report.to_json()))) == report
    png = plot_report({"tiny": report}, tmp_path / "ppl.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_calibrate_then_eval(tmp_path, capsys):
    model_dir, text = tmp_path / "model", tmp_path / "text.txt"
    tiny_model(LLAMA, seed=4).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text.write_text(random_text(600, seed=5))
    common = ["--model", str(model_dir), "--seq-len", "32", "--batch-size", "4"]
    assert main(["calibrate", *common, "--data", str(text), "--out", str(tmp_path / "bank")]) == 0
    assert "saved" in capsys.readouterr().out
    assert main(["eval", *common, "--routers", str(tmp_path / "bank"), "--data", str(text), "--densities", "1,0.5",
                 "--prompts", "2", "--new-tokens", "3", "--plot", str(tmp_path / "p.png"),
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| routers |" in out and (tmp_path / "p.png").is_file()
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {(r["method"], r["density"]) for r in rows} == {(m, d) for m in ("dense", "oracle", "routers")
                                                           for d in (1.0, 0.5)}
    assert main(["plot", str(tmp_path / "r.json"), str(tmp_path / "r.json"), "--out", str(tmp_path / "two.png")]) == 0
    assert (tmp_path / "two.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_calibrates_mlp_routers_and_evals_mlp_sparsity(tmp_path, capsys):
    model_dir, text = tmp_path / "model", tmp_path / "text.txt"
    tiny_model(OPT, seed=4).save_pretrained(model_dir)  # a ReLU MLP
    tiny_tokenizer().save_pretrained(model_dir)
    text.write_text(random_text(600, seed=5))
    common = ["--model", str(model_dir), "--seq-len", "32", "--batch-size", "4"]
    assert main(["calibrate", *common, "--data", str(text), "--out", str(tmp_path / "bank"), "--mlp-rank", "16"]) == 0
    out = capsys.readouterr().out
    assert "MLP routers, rank 16: neurons kept of 128 by batch size" in out and "| layer | B=1 | B=2 |" in out
    assert main(["eval", *common, "--routers", str(tmp_path / "bank"), "--data", str(text), "--densities", "1,0.5",
                 "--prompts", "0", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| mlp |" in out and "| routers+mlp |" in out and "| union recall |" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert {r["method"] for r in report["rows"]} == {"dense", "oracle", "routers", "mlp", "routers+mlp"}
    assert [row["batch_size"] for row in report["mlp_union"]][:2] == [1, 2]


@needs_shared
def test_dense_perplexity_matches_the_models_readme():
    model, tokenizer = load_shared("tiny-llama-wt2")
    windows = as_windows(WIKITEXT / "test.txt", tokenizer, max_tokens=20_480)  # README's CPU check: 54.4949
    evaluator = Evaluator(model, progress=False)
    nll = evaluator.token_nll(windows, evaluator.sparsity("dense", 1.0))
    assert nll.numel() == 20_480
    assert math.exp(nll.double().mean().item()) == pytest.approx(54.4949, abs=2e-3)

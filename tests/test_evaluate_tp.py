"""``eval --tp N``: per-rank selection simulated on one device equals zeroing, per token, every rank's units outside
its own top-k (tests/test_evaluate.py's reference with tp blocks, float64 scores), and the report shows it beside
single-device routing."""

from __future__ import annotations

import pytest
import torch

from polar_compile.evaluate import Evaluator, Sparsity, evaluate, format_report
from polar_compile.testing import random_routers
from tests.calib_models import random_windows
from tests.models import TinySpec, tiny_model
from tests.test_evaluate import reference_nll

GQA = TinySpec("llama", heads=8, kv_heads=4, head_dim=8, layers=3)  # 2 KV groups per rank at TP=2
MHA = TinySpec("opt", heads=8, kv_heads=8, head_dim=8, layers=3, bias=True)


@pytest.mark.parametrize("spec", [GQA, MHA], ids=["gqa", "mha"])
@pytest.mark.parametrize("method", ["routers", "oracle"])
def test_per_rank_selection_matches_reference(spec, method):
    model = tiny_model(spec)
    bank = random_routers(model)
    windows = random_windows(3, 12)
    evaluator = Evaluator(model, bank, progress=False)
    nll = evaluator.token_nll(windows, evaluator.sparsity(method, 0.5, tp=2))
    torch.testing.assert_close(nll, reference_nll(model, windows, method, 0.5, bank, tp=2), atol=1e-4, rtol=1e-4)
    # per rank differs from a global top-k on these random routers (else the test would show nothing)
    assert not torch.allclose(nll, evaluator.token_nll(windows, evaluator.sparsity(method, 0.5)))


def test_sparsity_keys_and_errors():
    layers, units = [1, 2], 4
    assert Sparsity.at_density("routers", 0.5, layers, units, tp=2).kept == ((1, 1), (2, 1))  # k per rank
    assert Sparsity.at_density("routers", 1.0, layers, units, tp=2).key(units) == Sparsity().key(units)
    assert Sparsity.at_density("routers", 0.5, layers, units).key(units) != Sparsity.at_density(
        "routers", 0.5, layers, units, tp=2).key(units)
    with pytest.raises(ValueError, match=r"4 units .* not divisible by the tensor-parallel size 3"):
        Sparsity.at_density("routers", 0.5, layers, units, tp=3)


def test_evaluate_reports_tp_rows_beside_single_device():
    model = tiny_model(GQA)
    report = evaluate(model, random_windows(2, 10), [1.0, 0.5], random_routers(model), methods=("dense", "routers"),
                      prompts=1, prompt_len=4, new_tokens=3, tp=2, progress=False)
    assert {m for m, _ in report.perplexity} == {"dense", "routers", "routers tp=2"}
    assert report.perplexity["routers tp=2", 1.0] == report.perplexity["dense", 1.0]
    table = format_report(report)
    assert table.index("| routers |") < table.index("| routers tp=2 |")
    assert "each of N tensor-parallel ranks keeps its own top-k" in table

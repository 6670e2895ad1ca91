"""``bench --tp``: what can be checked without GPUs (the run itself needs torchrun and CUDA)."""

from __future__ import annotations

import pytest

from polar_compile.bench.tp import TP_CATEGORIES, TP_VARIANTS, tp_markdown, tp_mesh


def test_outside_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RuntimeError, match=r"torchrun --nproc-per-node 2 -m polar_compile\.cli bench --tp 2"):
        tp_mesh(2)


def test_markdown_lists_every_variant_and_category():
    row = {"model": "llama3-8b", "batch": 64, "context": 8192, "tp": 2, "layers": 8, "variants": list(TP_VARIANTS),
           "inductor-gqa": 0.010, "inductor-gqa-tokens/s": 6400.0, "polar-1.0": 0.0101, "polar-1.0-vs-dense": 1.01,
           "polar-0.5": 0.006, "speedup-0.5": 10 / 6, "ideal-0.5-layer0-dense": 1.8, "of-ideal-0.5": 0.926}
    for variant in TP_VARIANTS:
        row[f"{variant}-gpu"] = dict.fromkeys(TP_CATEGORIES, 0.001)
    table = tp_markdown([row])
    assert "| llama3-8b B=64 L=8192 | 2 | 8 | 10.000 (6400) | 10.100 (1.010x) | 6.000 | 1.667x | 1.800x | 92.6% |" in table
    assert all(f"| {variant} | 1.000 |" in table for variant in TP_VARIANTS)


def test_markdown_lists_what_each_polar_variant_routes():
    row = {"model": "llama3-8b", "batch": 64, "context": 8192, "tp": 2, "layers": 4, "variants": list(TP_VARIANTS),
           "inductor-gqa": 0.002, "inductor-gqa-tokens/s": 32000.0, "polar-1.0": 0.002, "polar-1.0-vs-dense": 1.0,
           "polar-0.5": 0.0018, "speedup-0.5": 1.1, "ideal-0.5-layer0-dense": 1.2, "of-ideal-0.5": 0.92,
           "polar-1.0-sites": {"routed": 3, "sites": 4, "gqa": 1, "dense": {"no router for layer 0": [0]}},
           "polar-0.5-sites": {"routed": 0, "sites": 2, "gqa": 0, "dense": {"key is not own K/V": [0, 1]}}}
    for variant in TP_VARIANTS:
        row[f"{variant}-gpu"] = dict.fromkeys(TP_CATEGORIES, 0.001)
    table = tp_markdown([row])
    assert "| llama3-8b B=64 L=8192 | polar-1.0 | 3 of 4 | 1 | no router for layer 0 (0) |" in table
    assert "| llama3-8b B=64 L=8192 | polar-0.5 | 0 of 2 | 0 | key is not own K/V (0, 1) |" in table
    assert "| inductor-gqa | 3" not in table

"""Export's clear errors, and the ``polar-compile export`` command."""

import importlib.util
import json

import pytest

import polar_compile
from polar_compile import PolarConfig
from polar_compile.cli import main
from polar_compile.export import ExportError
from polar_compile.export.decode_step import example_inputs
from polar_compile.export.program import export_decode
from polar_compile.testing import random_routers
from tests.calib_models import tiny_tokenizer
from tests.models import TinySpec, tiny_model

SPEC = TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=2)
SIZES = {"batch_size": 2, "max_cache_len": 8}


@pytest.fixture(scope="module")
def model():
    return tiny_model(SPEC, seed=3)


def test_a_prefill_shaped_example_where_a_decode_step_is_expected(model):
    prefill_shaped = example_inputs(model, 2, 8, tokens=4)
    with pytest.raises(ExportError, match=r"input_ids \[B, 1\].*got \[2, 4\]: a prefill-shaped example"):
        export_decode(model, prefill_shaped, PolarConfig(routers=random_routers(model)))


def test_missing_routers(model, tmp_path):
    with pytest.raises(ExportError, match="export needs routers: pass routers="):
        polar_compile.export(model, **SIZES, path=tmp_path)


def test_an_unknown_format(model, tmp_path):
    with pytest.raises(ExportError, match=r"unknown export format 'tflite'; formats: \['pt2', 'aoti', 'onnx'"):
        polar_compile.export(model, **SIZES, path=tmp_path, format="tflite", routers=random_routers(model))


def test_a_model_whose_attention_the_matcher_cannot_find(tmp_path):
    eager = tiny_model(SPEC, seed=3)
    eager.config._attn_implementation = "eager"  # softmax(q k^T) v by hand: no SDPA call to match
    with pytest.raises(ExportError, match=r"the matcher found no attention in the decode step .*SDPA"):
        polar_compile.export(eager, **SIZES, path=tmp_path, routers=random_routers(eager))


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None, reason="torch_tensorrt is installed")
def test_tensorrt_without_torch_tensorrt_names_the_package(model, tmp_path):
    with pytest.raises(ExportError, match=r"format='tensorrt' needs the torch_tensorrt package"):
        polar_compile.export(model, **SIZES, path=tmp_path / "trt", format="tensorrt", routers=random_routers(model))
    assert not (tmp_path / "trt").exists()  # refused before any work


@pytest.mark.parametrize(("sizes", "message"), [
    ({"batch_size": 0, "max_cache_len": 8}, "batch_size must be a positive int, got 0"),
    ({"batch_size": 2, "max_cache_len": 8, "prefill_len": 8}, r"prefill_len \(8\) must be below max_cache_len"),
])
def test_bad_sizes(model, tmp_path, sizes, message):
    with pytest.raises(ExportError, match=message):
        polar_compile.export(model, **sizes, path=tmp_path, routers=random_routers(model))


def test_cli_exports_pt2_and_reports_mistakes_in_one_line(model, tmp_path, capsys):
    folder, banks = tmp_path / "model", tmp_path / "routers"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    random_routers(model, seed=4).save(banks)
    common = ["export", "--model", str(folder), "--batch-size", "2", "--max-cache-len", "8"]

    assert main([*common, "--routers", str(banks), "--out", str(tmp_path / "art"), "--density", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "rewritten" in out and "exported pt2 to" in out
    manifest = json.loads((tmp_path / "art" / "polar_export.json").read_text())
    assert (manifest["format"], manifest["batch_size"], manifest["max_cache_len"]) == ("pt2", 2, 8)
    assert polar_compile.export.load(tmp_path / "art").manifest == manifest

    assert main([*common, "--out", str(tmp_path / "none")]) == 2  # no routers
    assert "polar-compile export: error: export needs routers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--routers", str(banks), "--out", str(tmp_path / "x"), "--format", "tflite"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err

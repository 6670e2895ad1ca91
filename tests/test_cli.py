"""The ``polar-compile`` command: a user's mistake is one line on stderr and exit status 2; a bug keeps its
traceback; every ``--help`` is plain text."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import polar_compile.evaluate
from polar_compile.cli import main, plain_text
from polar_compile.testing import random_routers
from tests.calib_models import LLAMA, OPT, random_text, tiny_tokenizer
from tests.models import tiny_model

COMMANDS = ("calibrate", "eval", "plot", "bench")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit status, stdout, stderr), whether it returned or raised SystemExit."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_user_error(argv: list[str], message: str, capsys) -> str:
    """Exit status 2 and one line ``polar-compile <command>: error: ...`` holding ``message``, no traceback."""
    status, _, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("polar-compile")]  # transformers may log too
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"polar-compile {argv[0]}: error: "), lines[0]
    assert message in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (GQA, 128 positions) and its word-level tokenizer, saved as a model folder."""
    directory = tmp_path_factory.mktemp("model")
    tiny_model(LLAMA, seed=1).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(random_text(300, seed=2))
    return path


# -- --help ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_every_help_is_plain_text(command, capsys):
    status, out, _ = run([command, "--help"] if command else ["--help"], capsys)
    assert status == 0
    assert out.startswith(f"usage: polar-compile {command}".rstrip())
    assert "``" not in out and not re.search(r":\w+:`", out), out
    if command:
        assert len(out.split("options:")[0].strip().splitlines()) > 1  # a description under the usage line


def test_bench_help_keeps_its_docstring_as_plain_text(capsys):
    _, out, _ = run(["bench", "--help"], capsys)
    assert "Decode-throughput benchmark (polar-compile bench)" in out and "(see DecodeStep.time)" in out


def test_plain_text_strips_rst_markup():
    assert plain_text("``polar-compile bench`` by :func:`run` (:meth:`~bench.DecodeStep.time`, :class:`a.B`)") == (
        "polar-compile bench by run (time, a.B)")
    assert plain_text("no markup, `one` backtick") == "no markup, `one` backtick"


# -- option values: rejected while parsing, before anything loads ---------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["calibrate", "--density", "0"], "argument --density: density must be a number in (0, 1], got 0.0"),
    (["calibrate", "--density", "half"], "argument --density: density 'half' is not a number"),
    (["calibrate", "--heldout", "1"], "argument --heldout: must be a share strictly between 0 and 1, got 1"),
    (["calibrate", "--dense-layers", "0,one"], "argument --dense-layers: layer 'one' is not an integer"),
    (["calibrate", "--dense-layers", "0,-1"], "argument --dense-layers: layers must be >= 0"),
    (["calibrate", "--seq-len", "0"], "argument --seq-len: --seq-len must be at least 1, got 0"),
    (["calibrate", "--tokens", "many"], "argument --tokens: --tokens 'many' is not an integer"),
    (["calibrate", "--target-loss-increase", "-0.1"], "argument --target-loss-increase: must be > 0, got -0.1"),
    (["calibrate", "--mlp-rank", "big"], "argument --mlp-rank: MLP router rank 'big' is not an integer"),
    (["calibrate", "--mlp-rank", "-16"], "argument --mlp-rank: MLP router rank must be 'auto', 0 (no MLP routers) or "
                                         "a positive int, got -16"),
    (["calibrate", "--device", "gpu"], "argument --device: device 'gpu' is not usable here"),
    (["calibrate", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["eval", "--densities", "1,1.5"], "argument --densities: density must be a number in (0, 1], got 1.5"),
    (["eval", "--densities", ","], "argument --densities: no densities in ','"),
    (["eval", "--prompts", "-1"], "argument --prompts: --prompts must be at least 0, got -1"),
    (["eval", "--batch-size", "0"], "argument --batch-size: --batch-size must be at least 1, got 0"),
])
def test_bad_option_values_are_one_line(argv, message, capsys, tmp_path):
    required = {"calibrate": ["--out", str(tmp_path / "bank")], "eval": []}[argv[0]]
    argv = [*argv, "--model", str(tmp_path / "never-loaded"), "--data", "x.txt", *required]
    line = assert_user_error(argv, message, capsys)
    assert line.endswith(f"(see polar-compile {argv[0]} --help)")
    assert not (tmp_path / "bank").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_one_line(capsys, tmp_path):
    assert_user_error(["eval", "--model", "m", "--data", "x.txt", "--device", "cuda"],
                      "argument --device: device 'cuda' is not usable here (", capsys)


def test_missing_arguments_and_commands_are_one_line(capsys):
    assert_user_error(["calibrate", "--data", "x.txt"], "the following arguments are required: --model, --out",
                      capsys)
    status, _, err = run(["calibrated"], capsys)
    assert status == 2 and err.startswith("polar-compile: error: argument command: invalid choice: 'calibrated'")
    assert err.count("\n") == 1


def test_output_paths_are_checked_before_the_run(capsys, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    common = ["--model", "m", "--data", "x.txt"]
    assert_user_error(["calibrate", *common, "--out", str(a_file)], f"argument --out: {a_file} exists and is not a folder",
                      capsys)
    assert_user_error(["calibrate", *common, "--out", "bank", "--cache-dir", str(tmp_path / "nope")],
                      f"argument --cache-dir: folder {tmp_path / 'nope'} does not exist", capsys)
    assert_user_error(["eval", *common, "--json", str(tmp_path / "nope" / "r.json")],
                      f"argument --json: folder {tmp_path / 'nope'} does not exist", capsys)
    assert_user_error(["eval", *common, "--plot", str(tmp_path)], f"argument --plot: {tmp_path} is a folder", capsys)
    assert_user_error(["plot", "r.json", "--out", str(tmp_path / "nope" / "p.png")],
                      f"argument --out: folder {tmp_path / 'nope'} does not exist", capsys)


# -- the model --------------------------------------------------------------------------------------------------------


def test_model_paths_that_are_not_models_are_one_line(capsys, tmp_path, model_dir, text_file):
    no_weights, no_tokenizer, empty, a_file = (tmp_path / n for n in ("no_weights", "no_tokenizer", "empty", "f"))
    for directory in (no_weights, no_tokenizer, empty):
        directory.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((model_dir / name).read_bytes())
    a_file.write_text("{}")
    data = ["--data", str(text_file)]
    for model, message in [
        (tmp_path / "missing", "--model {}: no such folder"),
        (empty, "--model {}: not a model folder (it has no config.json)"),
        (a_file, "--model {}: a file, not a model folder or hub id"),
        (no_weights, "--model {}: cannot load the model: "),
        (no_tokenizer, "--model {}: cannot load its tokenizer: "),
    ]:
        assert_user_error(["eval", "--model", str(model), *data], message.format(model), capsys)
    assert_user_error(["calibrate", "--model", str(model_dir), *data, "--out", str(tmp_path / "bank")],
                      "--seq-len 512 is longer than the model's 128 positions", capsys)
    assert not (tmp_path / "bank").exists()


# -- router banks and data --------------------------------------------------------------------------------------------


def test_router_banks_that_are_missing_malformed_or_for_another_model_are_one_line(capsys, tmp_path, model_dir,
                                                                                    text_file):
    malformed = random_routers(tiny_model(LLAMA)).save(tmp_path / "malformed")
    (malformed / "polar_config.json").write_text("{not json")
    other = random_routers(tiny_model(OPT)).save(tmp_path / "other")
    common = ["eval", "--model", str(model_dir), "--data", str(text_file), "--seq-len", "16", "--prompts", "0"]
    assert_user_error([*common, "--routers", str(tmp_path / "missing")], "missing polar_config.json", capsys)
    assert_user_error([*common, "--routers", str(malformed)], "polar_config.json is not valid JSON", capsys)
    assert_user_error([*common, "--routers", str(other)], "router bank does not fit this model", capsys)


def test_bad_data_is_one_line(capsys, tmp_path, model_dir):
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    common = ["--model", str(model_dir), "--seq-len", "16"]
    assert_user_error(["eval", *common, "--data", str(tmp_path / "missing.txt")],
                      f"data file {tmp_path / 'missing.txt'} does not exist", capsys)
    assert_user_error(["eval", *common, "--data", str(short)], "too few for one window of 16 tokens", capsys)
    assert_user_error(["calibrate", *common, "--data", str(short), "--out", str(tmp_path / "bank")],
                      "too few for one window of 16 tokens", capsys)
    assert not (tmp_path / "bank").exists()


# -- plot ------------------------------------------------------------------------------------------------------------


def test_plot_inputs_that_are_not_reports_are_one_line(capsys, tmp_path):
    not_json, not_report = tmp_path / "a.json", tmp_path / "b.json"
    not_json.write_text("perplexity: 12")
    not_report.write_text(json.dumps({"rows": []}))
    out = ["--out", str(tmp_path / "p.png")]
    assert_user_error(["plot", str(tmp_path / "missing.json"), *out], f"report {tmp_path / 'missing.json'} does not exist",
                      capsys)
    assert_user_error(["plot", str(not_json), *out], f"report {not_json} is not a readable JSON file", capsys)
    assert_user_error(["plot", str(not_report), *out],
                      f"report {not_report} was not written by polar-compile eval --json (KeyError: 'model')", capsys)
    assert not (tmp_path / "p.png").exists()


# -- bugs are not user errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bug", [ValueError, KeyError, RuntimeError])
def test_a_bug_during_the_run_keeps_its_traceback(bug, monkeypatch, model_dir, text_file):
    def broken(*args, **kwargs):
        raise bug("a bug, not the user's input")

    monkeypatch.setattr(polar_compile.evaluate, "evaluate", broken)
    with pytest.raises(bug, match="a bug, not the user's input"):
        main(["eval", "--model", str(model_dir), "--data", str(text_file), "--seq-len", "16"])


def test_the_console_script_exits_with_status_2(tmp_path):
    """The real process: exit status 2 and the one line on stderr (``python -m`` runs ``sys.exit(main())``)."""
    result = subprocess.run(
        [sys.executable, "-m", "polar_compile.cli", "eval", "--model", str(tmp_path / "missing"), "--data", "x.txt"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"polar-compile eval: error: --model {tmp_path / 'missing'}: no such folder\n"


def test_a_model_without_sdpa_attention_is_one_line(capsys, tmp_path, text_file):
    directory = tmp_path / "mamba"
    config = transformers.MambaConfig(vocab_size=len(tiny_tokenizer()), hidden_size=16, state_size=4, num_hidden_layers=2)
    transformers.MambaForCausalLM(config).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    assert_user_error(["calibrate", "--model", str(directory), "--data", str(text_file), "--seq-len", "16",
                       "--out", str(tmp_path / "bank")],
                      "does not support an attention implementation through "
                      "torch.nn.functional.scaled_dot_product_attention", capsys)


def test_mlp_rank_on_a_model_without_relu_mlps_is_one_line(capsys, tmp_path, model_dir, text_file):
    common = ["calibrate", "--model", str(model_dir), "--data", str(text_file), "--seq-len", "16"]
    assert_user_error([*common, "--out", str(tmp_path / "bank"), "--mlp-rank", "32"],
                      "has no ReLU MLP to route: its MLPs' activation is silu, which has no exact zeros", capsys)
    status, out, _ = run([*common, "--out", str(tmp_path / "auto")], capsys)  # auto: attention routers only
    assert status == 0 and "no MLP routers: " in out and "silu" in out

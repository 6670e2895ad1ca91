"""The documented examples run as written: the README's Python recipes and ``examples/demo.py`` (on a tiny model)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import CompileConfig

from polar_compile.testing import random_routers
from tests.calib_models import LLAMA, tiny_tokenizer
from tests.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
README_PATH = 'path = "meta-llama/Llama-3.1-8B"'


def readme_blocks() -> list[str]:
    """The ```python blocks of the README's Quickstart, in order: Quickstart, explain, generate (the sections after
    it show fragments; ``examples/deploy.py`` and ``examples/tp_generate.py`` are their runnable forms)."""
    quickstart = (ROOT / "README.md").read_text().split("\n## Calibrate routers")[0]
    return re.findall(r"```python\n(.*?)```", quickstart, re.S)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tests' tiny Llama with a word-level tokenizer (eos doubles as pad), and random routers beside it."""
    directory = tmp_path_factory.mktemp("readme")
    model = tiny_model(LLAMA, seed=3)
    model.save_pretrained(directory / "model")
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "<s>"
    tokenizer.save_pretrained(directory / "model")
    random_routers(model, seed=4).save(directory / "routers")
    return directory


@pytest.mark.slow
def test_readme_recipes_run_as_written(model_dir, capsys):
    """Only the model path and the routers directory are replaced; every other name is the README's own."""
    blocks = readme_blocks()
    assert len(blocks) == 3 and README_PATH in blocks[0] and '"routers/"' in blocks[0]
    namespace: dict = {}
    for index, block in enumerate(blocks):
        source = block.replace(README_PATH, f"path = {str(model_dir / 'model')!r}")
        source = source.replace('"routers/"', repr(str(model_dir / "routers")))
        exec(compile(source, f"README.md python block {index}", "exec"), namespace)
    tokens = torch.cat(namespace["tokens"], dim=1)
    assert tokens.shape == (3, 32)
    report = namespace["report"]  # on a CPU every routed layer is rewritten (min_saved_mib is 0 there)
    assert [site.layer for site in report.rewritten] == [1, 2] and len(report.sites) == 3
    out, prompt_len = namespace["out"], namespace["prompt_len"]
    # generate decodes the same batch with the same routers and density: the same tokens as the Quickstart's loop
    assert torch.equal(out[:, prompt_len:], tokens)
    assert "dense: no router for layer 0" in capsys.readouterr().out


def test_readme_generate_rules_hold_in_this_transformers(model_dir):
    """What the README says transformers' generate does with a compile_config: nothing on a CPU without
    ``_compile_all_devices``, and nothing in beam search even with it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir / "model").eval()
    ids = torch.randint(2, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    never = CompileConfig(backend=_must_not_compile, fullgraph=True)
    beam = CompileConfig(backend=_must_not_compile, fullgraph=True)
    beam._compile_all_devices = True
    common = dict(max_new_tokens=3, do_sample=False, pad_token_id=1, cache_implementation="static")
    with torch.no_grad():
        model.generate(ids, compile_config=never, **common)
        model.generate(ids, num_beams=2, compile_config=beam, **common)


def _must_not_compile(gm, example_inputs):
    raise AssertionError("generate compiled where the README says it does not")


@pytest.mark.slow
def test_demo_runs_on_cpu(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("polar_demo", ROOT / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--device", "cpu", "--batch", "2", "--context", "12",
                                      "--new-tokens", "4"])
    demo.main()
    out = capsys.readouterr().out
    assert "sites rewritten: 5 of 6" in out and "batch 2  context 12 (prompt 8 + 4 new tokens)" in out
    assert "token agreement polar vs dense" in out and "say nothing about polar's speed" in out

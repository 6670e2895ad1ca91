"""Export: the polar rewrite on torch.export ATen graphs, and pt2 / aoti artifacts that decode a left-padded batch as
the polar backend does, with the cache carried by each runtime (tensors written in place)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import StaticCache
from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

import polar_compile
from polar_compile import PolarConfig
from polar_compile.export.decode_step import CacheStep, new_cache
from polar_compile.passes.manager import run_passes
from polar_compile.testing import random_routers
from tests.models import VOCAB, DecodeDriver, TinySpec, tiny_model

BATCH, CACHE_LEN, STEPS = 2, 8, 3
# a left-padded batch: rows padded by 0, 2 and 4 tokens in front of a 6-token prompt slot
B, L, P, PAD, DECODE_STEPS = 3, 16, 6, (0, 2, 4), 4
FAMILIES = {
    "llama": TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=3),  # GQA, gated SiLU MLP (dense)
    "opt": TinySpec("opt", heads=4, kv_heads=4, head_dim=8, layers=3, bias=True),  # MHA, ReLU MLP: sparse MLP too
    "gpt_neox": TinySpec("gpt_neox", heads=4, kv_heads=4, head_dim=8, layers=3),  # fused QKV, partial rotary
}


def exported_decode_step(model):
    model.generation_config.cache_implementation = "static"
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=BATCH, max_cache_len=CACHE_LEN)
    program = wrapper.export(input_ids=torch.zeros(BATCH, 1, dtype=torch.long), cache_position=torch.tensor([0]))
    return program.module()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_export_graph_rewrite_matches_dynamo_rewrite(family):
    model = tiny_model(TinySpec(family, heads=4, kv_heads=2, head_dim=8, layers=3), seed=5)
    bank = random_routers(model, seed=5)
    tokens = torch.randint(0, VOCAB, (STEPS, BATCH, 1), generator=torch.Generator().manual_seed(5))

    exported = exported_decode_step(model)
    records = run_passes(exported, PolarConfig(routers=bank, density=0.5))
    assert [s.layer for s in records[0].sites if s.rewritten] == [1, 2]
    targets = {n.target for n in exported.graph.nodes}
    assert torch.ops.polar.select_attention.default in targets
    assert torch.ops.aten.scaled_dot_product_attention.default in targets  # layer 0 stays dense

    cache = StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    step = torch.compile(model.forward, backend=polar_compile.make_backend(bank, 0.5, inductor=False), fullgraph=True)
    with torch.no_grad():
        for position in range(STEPS):
            expected = step(input_ids=tokens[position], past_key_values=cache, use_cache=True,
                            cache_position=torch.tensor([position])).logits
            actual = exported(input_ids=tokens[position], cache_position=torch.tensor([position]))
            torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


# -- artifacts --------------------------------------------------------------------------------------------------------


def model_and_bank(family, seed):
    model = tiny_model(FAMILIES[family], seed=seed)
    mlp = {"mlp_rank": 8, "mlp_topk": {B: 0.5}} if family == "opt" else {}
    return model, random_routers(model, seed=seed, **mlp)


def left_padded_batch(seed):
    """Prompts [B, P], the mask over the whole cache [B, L] and each row's positions [B, L]."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, VOCAB, (B, P), generator=generator)
    mask = torch.ones(B, L, dtype=torch.long)
    for row, pad in enumerate(PAD):
        mask[row, :pad] = 0
    return prompts, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def polar_reference(model, bank, prompts, mask, positions):
    """Per step the logits of the eager polar decode step (the backend's passes, no Inductor) after a dense eager
    prefill, greedy tokens, and the final cache."""
    cache = new_cache(model, B, L)
    step = torch.compile(CacheStep(model), backend=polar_compile.make_backend(bank, 0.5, inductor=False),
                         fullgraph=True)
    with torch.no_grad():
        logits = [CacheStep(model)(prompts, positions[:, :P], mask, torch.arange(P), *cache)]
        for slot in range(P, P + DECODE_STEPS):
            token = logits[-1].argmax(-1)
            logits.append(step(token, positions[:, slot:slot + 1], mask, torch.tensor([slot]), *cache))
    return logits, cache


def run_deployment(deployment, tokens, prompts, mask, positions):
    """The artifact's logits for the reference's tokens, the cache living in the artifact's own tensors."""
    cache = deployment.new_cache()
    with torch.no_grad():
        logits = [deployment.prefill(prompts, positions[:, :P], mask, cache)]
        for slot, token in zip(range(P, P + DECODE_STEPS), tokens, strict=True):
            logits.append(deployment.decode(token, positions[:, slot:slot + 1], mask, slot, cache))
    return logits, cache


def assert_matches_reference(model, bank, folder, seed):
    prompts, mask, positions = left_padded_batch(seed)
    expected, expected_cache = polar_reference(model, bank, prompts, mask, positions)
    tokens = [step.argmax(-1) for step in expected[:-1]]
    actual, cache = run_deployment(polar_compile.export.load(folder), tokens, prompts, mask, positions)
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")
    for got, want in zip(cache, expected_cache, strict=True):  # every write persisted, none lost
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return prompts, mask, positions, actual


def routed_sites(report):
    """(pass, layer, kept) of every rewritten site, attention then MLP."""
    return [(site.pass_name, site.layer, site.kept) for name in ("attention", "mlp")
            for site in report.sites_of(name) if site.rewritten]


def compiled_model_sites(model, bank):
    driver = DecodeDriver(model, batch=B, prompt_len=P, max_cache_len=L, pad=list(PAD))
    inputs = driver.decode_inputs(driver.prefill())
    return routed_sites(polar_compile.explain(model, **inputs, options={"routers": bank, "density": 0.5}))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pt2_decodes_a_left_padded_batch_as_the_polar_backend(family, tmp_path):
    model, bank = model_and_bank(family, seed=11)
    folder = polar_compile.export(model, routers=bank, density=0.5, batch_size=B, max_cache_len=L, prefill_len=P,
                                  path=tmp_path / "art")
    _, mask, positions, actual = assert_matches_reference(model, bank, folder, seed=12)

    program = torch.export.load(folder / "decode.pt2")
    sites = routed_sites(polar_compile.explain(program))
    kept = 1 if family == "llama" else 2  # half of 2 KV groups or of 4 heads
    expected_sites = [("attention", 1, kept), ("attention", 2, kept)]
    if family == "opt":  # half of ffn = 2 * hidden neurons
        expected_sites += [("mlp", 1, FAMILIES["opt"].hidden), ("mlp", 2, FAMILIES["opt"].hidden)]
    assert sites == expected_sites
    assert sites == compiled_model_sites(model, bank)
    ops = {node.target for node in program.graph.nodes}
    assert torch.ops.polar.select_attention.default in ops
    assert (torch.ops.polar.gather_down.default in ops) == (family == "opt")

    dense = CacheStep(model)  # routing changes the numbers: the comparison above can fail
    cache = new_cache(model, B, L)
    with torch.no_grad():
        dense(left_padded_batch(12)[0], positions[:, :P], mask, torch.arange(P), *cache)
        token = actual[0].argmax(-1)
        dense_logits = dense(token, positions[:, P:P + 1], mask, torch.tensor([P]), *cache)
    assert not torch.allclose(dense_logits, actual[1], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_aoti_package_decodes_as_the_polar_backend_and_keeps_cache_writes(family, tmp_path):
    model, bank = model_and_bank(family, seed=21)
    folder = polar_compile.export(model, routers=bank, density=0.5, batch_size=B, max_cache_len=L, prefill_len=P,
                                  path=tmp_path / "art", format="aoti")
    manifest = json.loads((folder / "polar_export.json").read_text())
    assert manifest["format"] == "aoti" and manifest["cache_mode"] == "inplace"
    assert sum("rewritten" in line for line in manifest["sites"]) >= 2
    assert_matches_reference(model, bank, folder, seed=22)


def test_pt2_loads_in_a_fresh_process_with_only_polar_compile_imported(tmp_path):
    model, bank = model_and_bank("llama", seed=31)
    folder = polar_compile.export(model, routers=bank, density=0.5, batch_size=B, max_cache_len=L, prefill_len=P,
                                  path=tmp_path / "art")
    prompts, mask, positions = left_padded_batch(32)
    expected, _ = polar_reference(model, bank, prompts, mask, positions)
    torch.save({"prompts": prompts, "mask": mask, "positions": positions,
                "tokens": [step.argmax(-1) for step in expected[:-1]]}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        import polar_compile
        assert "tests" not in sys.modules
        deployment = polar_compile.export.load({str(folder)!r})
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        prompts, mask, positions = inputs["prompts"], inputs["mask"], inputs["positions"]
        cache = deployment.new_cache()
        logits = [deployment.prefill(prompts, positions[:, :{P}], mask, cache)]
        for slot, token in zip(range({P}, {P + DECODE_STEPS}), inputs["tokens"]):
            logits.append(deployment.decode(token, positions[:, slot:slot + 1], mask, slot, cache))
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
    """)
    package_root = str(Path(polar_compile.__file__).parents[1])  # this checkout, installed or not
    env = {**os.environ, "PYTHONPATH": package_root}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env)
    for got, want in zip(torch.load(tmp_path / "logits.pt"), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

"""The attention rewrite on a torch.export (ATen) graph of the decode step gives the Dynamo path's numbers."""

import pytest
import torch
from transformers import StaticCache
from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

import polar_compile
from polar_compile import PolarConfig
from polar_compile.passes.manager import run_passes
from polar_compile.testing import random_routers
from tests.models import VOCAB, TinySpec, tiny_model

BATCH, CACHE_LEN, STEPS = 2, 8, 3


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

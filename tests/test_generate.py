"""HF generate() with CompileConfig(backend="polar"): decode steps rewritten, prefill dense, no recompiles."""

import pytest
import torch
from transformers import CompileConfig

import polar_compile
from polar_compile.testing import random_routers
from tests.models import VOCAB, TinySpec, gated_heads, tiny_model


@pytest.mark.slow
def test_generate_with_compile_config_matches_gated_eager_generation():
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=3), seed=11)
    bank = random_routers(model, seed=11)
    generator = torch.Generator().manual_seed(11)
    input_ids = torch.randint(1, VOCAB, (3, 6), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding
    attention_mask[2, :4] = 0
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                  cache_implementation="static", pad_token_id=0)

    with gated_heads(model, bank, 0.5):
        expected = model.generate(**kwargs, disable_compile=True)
    dense = model.generate(**kwargs, disable_compile=True)

    polar_compile.attach(model, bank, density=0.5)
    config = CompileConfig(backend="polar", fullgraph=True)
    config._compile_all_devices = True  # HF compiles only on accelerators unless told otherwise
    with torch._dynamo.config.patch(error_on_recompile=True):
        actual = model.generate(**kwargs, compile_config=config)
    assert torch.equal(actual, expected)
    assert not torch.equal(actual, dense)

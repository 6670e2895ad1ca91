"""On a CUDA device: generate() through the compiled polar path (Inductor, CUDA graphs, Triton kernel) against
eager generation with the test's own head gating. Runs on the GPU machine; CPU CI has no CUDA device."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CompileConfig

import polar_compile
from polar_compile import PolarConfig
from polar_compile.testing import random_routers
from tests.mlp_reference import sparse_mlps
from tests.models import gated_heads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPO = Path(__file__).resolve().parents[1]
MODEL_DIRS = [REPO / "shared" / "models" / "tiny-llama-wt2", REPO.parent / "shared" / "models" / "tiny-llama-wt2"]


def tiny_llama():
    directory = next((d for d in MODEL_DIRS if d.is_dir()), None)
    if directory is None:
        pytest.skip("tiny-llama-wt2 is not available")
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).cuda().eval()


def test_compiled_generate_agrees_with_gated_eager():
    model = tiny_llama()
    routers = os.environ.get("POLAR_TEST_ROUTERS")
    bank = polar_compile.RouterBank.load(routers) if routers else random_routers(model, seed=0)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, model.config.vocab_size, (16, 24), generator=generator).cuda()
    attention_mask = torch.ones_like(input_ids)
    for row in range(16):
        attention_mask[row, : row % 7] = 0  # left padding
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=64, do_sample=False,
                  cache_implementation="static", pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with gated_heads(model, bank, 0.5):
        expected = model.generate(**kwargs, disable_compile=True)
    # min_saved_mib=0: at this tiny size the default cost model would keep every site dense (no kernel to test)
    polar_compile.attach(model, bank, density=0.5, min_saved_mib=0)
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        actual = model.generate(**kwargs, compile_config=CompileConfig(backend="polar", fullgraph=True))
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    new_actual = actual.sequences[:, input_ids.shape[1]:]
    new_expected = expected.sequences[:, input_ids.shape[1]:]
    agreement = (new_actual == new_expected).float().mean().item()
    print(f"token agreement compiled polar vs gated eager: {agreement:.4f}")
    assert agreement >= 0.99
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        same_prefix = (new_actual[:, :step] == new_expected[:, :step]).all(dim=1)
        torch.testing.assert_close(a[same_prefix], e[same_prefix], atol=2e-3, rtol=2e-3)


def tiny_opt():
    directory = next((d.parent / "tiny-opt-wt2" for d in MODEL_DIRS if (d.parent / "tiny-opt-wt2").is_dir()), None)
    if directory is None:
        pytest.skip("tiny-opt-wt2 is not available")
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).cuda().eval()


def test_compiled_generate_with_sparse_mlps_agrees_with_masked_eager():
    """OPT's ReLU MLPs through mlp_route + the gather kernels (and attention routed too), under CUDA graphs."""
    model = tiny_opt()
    density, batch = 0.25, 16
    mlp_bytes = 2 * model.config.hidden_size * model.config.ffn_dim * model.dtype.itemsize
    # the kernels must run: a k past the measured break-even would keep the MLPs dense (the test failed that way)
    assert density <= PolarConfig().mlp_break_even("cuda", batch, mlp_bytes)
    bank = random_routers(model, seed=0, mlp_rank=32, mlp_topk={batch: density})
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, model.config.vocab_size, (batch, 24), generator=generator).cuda()
    attention_mask = torch.ones_like(input_ids)
    for row in range(batch):
        attention_mask[row, : row % 5] = 0
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=32, do_sample=False,
                  cache_implementation="static", pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with gated_heads(model, bank, 0.5), sparse_mlps(model, "opt", bank.mlp, batch):
        expected = model.generate(**kwargs, disable_compile=True)
    polar_compile.attach(model, bank, density=0.5, min_saved_mib=0)
    torch._dynamo.utils.counters.clear()
    # profiled on the first compiled call: CUDA-graph trees run each graph eagerly once before capturing it, and
    # the profiler names kernels only there (a replay of a captured graph shows none of them)
    actual, kernels = _with_kernel_names(
        lambda: model.generate(**kwargs, compile_config=CompileConfig(backend="polar", fullgraph=True)))
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    new_actual = actual.sequences[:, input_ids.shape[1]:]
    new_expected = expected.sequences[:, input_ids.shape[1]:]
    agreement = (new_actual == new_expected).float().mean().item()
    print(f"token agreement compiled polar (attention + MLP) vs masked eager: {agreement:.4f}")
    assert agreement >= 0.99
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        same_prefix = (new_actual[:, :step] == new_expected[:, :step]).all(dim=1)
        torch.testing.assert_close(a[same_prefix], e[same_prefix], atol=2e-3, rtol=2e-3)
    assert {"_gather_up_kernel", "_gather_down_kernel"} <= kernels, sorted(kernels)


def _with_kernel_names(fn):
    """``fn()`` and the names of the CUDA kernels it launched."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        result = fn()
        torch.cuda.synchronize()
    return result, {event.name for event in profile.events()}


def test_split_gather_down_sums_in_the_consumer_kernel():
    """A gather_down whose kernel splits its reduction compiles to gather_down_partials, its sum fused by Inductor
    into the residual add: no finishing launch, the values of eager gather_down + residual."""
    generator = torch.Generator().manual_seed(2)
    rows, k, ffn, d_out = 4, 1600, 4096, 1024
    h = torch.randn(rows, k, generator=generator).relu().bfloat16().cuda()
    w_t = (torch.randn(ffn, d_out, generator=generator) * k**-0.5).bfloat16().cuda()
    b, residual = (torch.randn(*shape, generator=generator).bfloat16().cuda() for shape in ((d_out,), (rows, d_out)))
    idx = torch.randperm(ffn, generator=generator)[:k].sort().values.cuda()

    def mlp_end(h, w_t, b, idx, residual):
        return residual + torch.ops.polar.gather_down(h, w_t, b, idx)

    expected = mlp_end(h, w_t, b, idx, residual)
    actual, kernels = _with_kernel_names(lambda: torch.compile(mlp_end, backend="polar")(h, w_t, b, idx, residual))
    assert "_gather_down_kernel" in kernels and "_finish_kernel" not in kernels, sorted(kernels)
    torch.testing.assert_close(actual, expected, atol=2**-7, rtol=2**-7)

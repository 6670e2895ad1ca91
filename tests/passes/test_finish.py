"""split_down_finish: gather_down calls whose kernel splits the reduction become gather_down_partials + a sum in
split order + bias, with the values of the call they replace; the rest stay as they are."""

import math

import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from polar_compile import RouterBank, make_backend
from polar_compile.config import PolarConfig
from polar_compile.kernels.gather_gemm import gather_down_split_len
from polar_compile.passes.finish import split_down_finish
from polar_compile.passes.manager import run_passes
from polar_compile.testing import random_routers
from tests.budget import examples
from tests.models import DecodeDriver, TinySpec, tiny_config

ops = torch.ops.polar


def residual_mlp_out(h, w_t, b, idx, residual):
    """The MLP's end as a decoder layer has it: the down projection's output added to the residual stream."""
    return residual + ops.gather_down(h, w_t, b, idx)


def float64_out(h, w_t, b, idx, residual):
    """residual + (sum_j h[:, j] (outer) w_t[idx[j]] + b), one neuron at a time, in float64."""
    out = b.double().expand(h.shape[0], -1).clone()
    for j, neuron in enumerate(idx.tolist()):
        out += h[:, j : j + 1].double() * w_t[neuron].double()[None, :]
    return residual.double() + out.to(h.dtype).double()


@settings(max_examples=examples(12), deadline=None)
@given(rows=st.integers(1, 8), k=st.integers(200, 1200), d_out=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_split_calls_become_partials_with_the_same_values(rows, k, d_out, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    ffn = k + 37
    args = (torch.randn(rows, k, generator=generator).relu().to(dtype),
            (torch.randn(ffn, d_out, generator=generator) * k**-0.5).to(dtype),
            torch.randn(d_out, generator=generator).to(dtype),
            torch.randperm(ffn, generator=generator)[:k].sort().values,
            torch.randn(rows, d_out, generator=generator).to(dtype))
    gm = make_fx(residual_mlp_out, tracing_mode="fake")(*args)
    expected = gm(*args)

    split_len = gather_down_split_len(rows, k, d_out, dtype, torch.device("cpu"))
    assert split_down_finish(gm, device_types=("cuda",)) == 0  # these tensors are on the CPU
    assert split_down_finish(gm, device_types=("cpu",)) == (split_len < k)
    targets = [node.target for node in gm.graph.nodes]
    assert (ops.gather_down.default in targets) == (split_len >= k)
    assert (ops.gather_down_partials.default in targets) == (split_len < k)

    actual = gm(*args)
    assert actual.dtype == dtype
    # the same fp32 sums in another order at most, then one rounding to dtype each for the down output and the sum
    reference = float64_out(*args)
    tolerance = 2e-5 if dtype == torch.float32 else 2**-7
    assert ((actual.double() - reference).abs() <= tolerance * (1 + reference.abs())).all()
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


def test_a_dynamic_batch_size_stays_whole():
    """The split depends on the batch size: with a symbolic one the call is left as gather_down."""
    args = (torch.rand(4, 900), torch.randn(950, 8), torch.randn(8), torch.arange(900), torch.randn(4, 8))
    gm = make_fx(residual_mlp_out, tracing_mode="symbolic")(*args)
    assert math.isfinite(gm(*args).sum().item())
    assert split_down_finish(gm, device_types=("cpu",)) == 0
    assert ops.gather_down.default in [node.target for node in gm.graph.nodes]


def test_an_mlp_rewrite_with_a_split_down_keeps_its_logits():
    """On an MLP pass graph (OPT, 1024 neurons, k = 614 at B=2: 3 splits), the backend's step after the passes
    finds the gather_down from the values the pass records, and the decode logits stay those of gather_down."""
    config = tiny_config(TinySpec("opt", heads=4, kv_heads=4, head_dim=8, layers=2))
    config.ffn_dim = 1024
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    bank = random_routers(model, seed=1, mlp_rank=8, mlp_topk={2: 0.6})
    bank = RouterBank(bank.shape, {}, {}, mlp=bank.mlp)
    driver = DecodeDriver(model, batch=2, prompt_len=3, max_cache_len=8, pad=[1, 0], seed=0)
    splits = []

    def passes_then_split(gm, example_inputs):
        run_passes(gm, PolarConfig.from_options({"routers": bank}), example_inputs)
        splits.append(split_down_finish(gm, device_types=("cpu",)))
        return gm.forward

    logits = {}
    for name, backend in (("whole", make_backend(bank, inductor=False)), ("split", passes_then_split)):
        torch._dynamo.reset()
        with torch.no_grad():
            step = torch.compile(model.forward, backend=backend, fullgraph=True)
            logits[name] = step(**driver.decode_inputs(driver.prefill())).logits
    assert splits == [len(bank.mlp.w_in)] and splits[0] >= 1  # every routed MLP
    torch.testing.assert_close(logits["split"], logits["whole"], rtol=1e-5, atol=1e-5)

"""split_down_finish: gather_down calls whose kernel splits the reduction become gather_down_partials + a sum in
split order + bias, with the values of the call they replace; the rest stay as they are."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from polar_compile.kernels.gather_gemm import gather_down_split_len
from polar_compile.passes.finish import split_down_finish
from tests.budget import examples

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

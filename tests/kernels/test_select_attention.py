"""The Triton selective decode attention kernel against an independent float64 reference.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``),
so shapes stay tiny. Every call writes into an output poisoned with NaN, so an element the kernels never write
fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polar_compile.kernels.select_attention import (
    SelectAttentionConfig,
    select_attention_config,
    select_attention_triton,
)
from tests.budget import examples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Largest |out - ref| allowed, relative to max(1, |ref|) of the same head (outputs are averages of N(0, 1) rows).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
MASK_KINDS = ("full", "left_padding", "ragged", "all_but_one", "random", "one_row_empty")


def reference_float64(query, key, value, units, attn_mask, scale):
    """out[b, h] = softmax(scale q K^T + mask) V over group h // R if that group is in units[b], else 0; float64."""
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    out = torch.zeros(batch, heads, head_dim, dtype=torch.float64)
    mask = attn_mask.expand(batch, 1, 1, -1).cpu()
    for b in range(batch):
        for g in units[b].tolist():
            k, v = key[b, g].cpu().double(), value[b, g].cpu().double()  # [L, D]
            if mask.dtype == torch.bool:
                bias = torch.zeros(k.shape[0], dtype=torch.float64).masked_fill(~mask[b, 0, 0], -math.inf)
            else:
                bias = mask[b, 0, 0].double()
            for h in range(g * group, (g + 1) * group):
                scores = scale * (k @ query[b, h, 0].cpu().double()) + bias  # [L]
                if torch.isneginf(scores).all():
                    continue  # every key masked: the output row is zero
                out[b, h] = torch.softmax(scores, dim=0) @ v
    return out.reshape(batch, heads, 1, head_dim)


def make_mask(kind: str, batch: int, kv_len: int, generator: torch.Generator) -> torch.Tensor:
    """A [batch, 1, 1, kv_len] bool mask (True = attend) of one of MASK_KINDS."""
    pos = torch.arange(kv_len)
    if kind == "full":
        mask = torch.ones(batch, kv_len, dtype=torch.bool)
    elif kind == "left_padding":  # sequence b starts at pad[b]; a static cache's tail past length is unfilled
        pad = torch.randint(0, kv_len, (batch,), generator=generator)
        length = pad + torch.randint(1, kv_len + 1, (batch,), generator=generator).clamp(max=kv_len - pad)
        mask = (pos[None, :] >= pad[:, None]) & (pos[None, :] < length[:, None])
    elif kind == "ragged":  # the filled prefix of a static cache, ragged over the batch
        length = torch.randint(1, kv_len + 1, (batch,), generator=generator)
        mask = pos[None, :] < length[:, None]
    elif kind == "all_but_one":
        only = torch.randint(0, kv_len, (batch,), generator=generator)
        mask = pos[None, :] == only[:, None]
    elif kind == "random":
        mask = torch.rand(batch, kv_len, generator=generator) < 0.5
        mask[:, 0] = True
    else:  # "one_row_empty": the first sequence attends to nothing and must get zeros, not NaN
        mask = torch.rand(batch, kv_len, generator=generator) < 0.7
        mask[0] = False
    return mask[:, None, None, :]


def run_case(
    batch, kv_heads, group, kv_len, head_dim, num_units, dtype, mask_kind, additive, broadcast, config, seed,
    units_dtype=torch.int64, strided=False,
):
    generator = torch.Generator().manual_seed(seed)
    heads = kv_heads * group

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)

    query = randn(batch, heads, 1, head_dim)
    if strided:  # a view with padded rows and heads interleaved, as a slice of a larger cache might be
        key = randn(batch, kv_len + 3, kv_heads, head_dim + 8).transpose(1, 2)[:, :, 2 : kv_len + 2, 4 : head_dim + 4]
        value = randn(batch, kv_heads, kv_len * 2, head_dim)[:, :, ::2]
    else:
        key, value = randn(batch, kv_heads, kv_len, head_dim), randn(batch, kv_heads, kv_len, head_dim)
    units = torch.stack([torch.randperm(kv_heads, generator=generator)[:num_units] for _ in range(batch)])
    units = units.to(units_dtype).to(DEVICE)
    mask = make_mask(mask_kind, 1 if broadcast else batch, kv_len, generator)
    if additive:  # HF-style additive mask: 0 where attended, -inf (or the dtype's most negative value) elsewhere
        masked_value = -math.inf if seed % 2 else torch.finfo(dtype).min
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, masked_value)
    mask = mask.to(DEVICE)
    scale = head_dim**-0.5

    out = torch.full((batch, heads, 1, head_dim), math.nan, dtype=dtype, device=DEVICE)
    result = select_attention_triton(query, key, value, units, mask, scale, config=config, out=out)
    assert result.data_ptr() == out.data_ptr() and result.dtype == dtype

    expected = reference_float64(query, key, value, units, mask, scale)
    got = result.cpu().double()
    assert not got.isnan().any(), "an output element was never written (or is NaN)"
    selected = torch.zeros(batch, kv_heads, dtype=torch.bool).scatter(1, units.cpu().long(), True)
    unselected_heads = ~selected.repeat_interleave(group, dim=1)  # [B, H]
    assert (got[unselected_heads] == 0).all(), "heads of unselected groups must be exactly zero"
    error = (got - expected).abs().amax(dim=(2, 3))  # [B, H]
    allowed = TOLERANCE[dtype] * expected.abs().amax(dim=(2, 3)).clamp(min=1.0)
    assert (error <= allowed).all(), f"max error {error.max().item():.3g} (allowed {allowed.min().item():.3g})"


@settings(max_examples=examples(80), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    group=st.sampled_from([1, 2, 4, 8]),
    kv_heads=st.sampled_from([1, 2, 4]),
    density=st.floats(0.01, 1.0),
    batch=st.integers(1, 3),
    kv_len=st.integers(1, 80),
    head_dim=st.sampled_from([16, 24, 32, 40, 64]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    mask_kind=st.sampled_from(MASK_KINDS),
    additive=st.booleans(),
    broadcast=st.booleans(),
    num_splits=st.sampled_from([1, 2, 3, 4]),
    block_n=st.sampled_from([16, 32]),
    units_dtype=st.sampled_from([torch.int32, torch.int64]),
    strided=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_reference(
    group, kv_heads, density, batch, kv_len, head_dim, dtype, mask_kind, additive, broadcast, num_splits,
    block_n, units_dtype, strided, seed,
):
    num_units = max(1, round(density * kv_heads))
    config = SelectAttentionConfig(num_splits, block_n, num_warps=4, num_stages=2)
    run_case(
        batch, kv_heads, group, kv_len, head_dim, num_units, dtype, mask_kind, additive, broadcast, config, seed,
        units_dtype=units_dtype, strided=strided,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [80, 96, 128])
def test_model_head_dims_with_default_config(head_dim, dtype):
    """The head dims of real models (non-powers of two masked in the D tile), launched by the heuristic."""
    run_case(2, 2, 4, 50, head_dim, 1, dtype, "left_padding", False, False, None, seed=head_dim)


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_split_count_does_not_change_the_result(mask_kind):
    """Splits cover the keys exactly once: results agree across 1..5 splits (incl. splits with no keys)."""
    generator = torch.Generator().manual_seed(7)
    batch, heads, kv_heads, kv_len, head_dim = 2, 4, 2, 45, 16
    query = torch.randn(batch, heads, 1, head_dim, generator=generator).to(DEVICE)
    key = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator).to(DEVICE)
    value = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator).to(DEVICE)
    units = torch.tensor([[1], [0]], device=DEVICE)
    mask = make_mask(mask_kind, batch, kv_len, generator).to(DEVICE)
    outs = [
        select_attention_triton(query, key, value, units, mask, 0.25, config=SelectAttentionConfig(s, 16))
        for s in (1, 2, 5)
    ]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=1e-5, rtol=1e-5)


def test_heuristic_config_is_static_and_sane():
    """1..16 splits of >= 256 keys, chosen for full waves of 4 programs per SM (132 SMs off the GPU)."""
    cpu = torch.device("cpu")
    for batch in (1, 16, 64, 256):
        for kv_len in (512, 4096, 32768):
            for num_units in (1, 4, 16, 32):
                config = select_attention_config(batch, num_units, kv_len, 128, torch.bfloat16, cpu)
                assert 1 <= config.num_splits <= 16
                assert config.num_splits == 1 or config.num_splits * 256 <= kv_len
    splits = {pairs: select_attention_config(pairs, 1, 8192, 128, torch.bfloat16, cpu).num_splits
              for pairs in (64, 256, 384, 512, 1024, 2048)}
    assert splits == {64: 8, 256: 2, 384: 4, 512: 1, 1024: 1, 2048: 1}

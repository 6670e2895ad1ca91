"""polar::select_attention: opcheck, and the reference impl against float64 math written here."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polar_compile  # noqa: F401  (registers the ops)
from tests.budget import examples

select_attention = torch.ops.polar.select_attention.default


def float64_attention(query, key, value, units, mask, scale):
    """Per sequence and head: softmax attention over unmasked keys, zero for heads of unselected groups."""
    batch, heads, _, _ = query.shape
    kv_heads = key.shape[1]
    out = torch.zeros(query.shape, dtype=torch.float64)
    for b in range(batch):
        allowed = mask[min(b, mask.shape[0] - 1), 0, 0]
        for h in range(heads):
            g = h // (heads // kv_heads)
            if g not in units[b].tolist():
                continue
            scores = (key[b, g].double() @ query[b, h, 0].double()) * scale
            scores = scores.masked_fill(~allowed, float("-inf")) if mask.dtype == torch.bool else scores + allowed.double()
            if torch.isinf(scores).all():
                continue
            out[b, h, 0] = torch.softmax(scores, -1) @ value[b, g].double()
    return out


@st.composite
def attention_inputs(draw):
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 4))
    group = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8, 12]))
    kv_len = draw(st.integers(1, 24))
    kept = draw(st.integers(1, kv_heads))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, 1, head_dim, generator=generator)
    key = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator)
    value = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator)
    units = torch.stack([torch.randperm(kv_heads, generator=generator)[:kept] for _ in range(batch)])
    # masks: left padding and ragged fill per row, at least one key visible
    visible = torch.zeros(batch, kv_len, dtype=torch.bool)
    for b in range(batch):
        start = draw(st.integers(0, kv_len - 1))
        end = draw(st.integers(start + 1, kv_len))
        visible[b, start:end] = True
    mask = visible[:, None, None, :]
    if draw(st.booleans()):
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    return query, key, value, units, mask, draw(st.floats(0.05, 1.0))


@settings(max_examples=examples(150))
@given(attention_inputs())
def test_reference_matches_float64(args):
    expected = float64_attention(*args)
    actual = select_attention(*args)
    torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 1, 8, generator=generator, dtype=dtype)
    key, value = (torch.randn(2, 2, 6, 8, generator=generator, dtype=dtype) for _ in range(2))
    units = torch.tensor([[1], [0]])
    for mask in (torch.rand(1, 1, 1, 6, generator=generator) > 0.3, torch.randn(2, 1, 1, 6, dtype=dtype)):
        mask[..., 0] = True if mask.dtype == torch.bool else 0.0
        torch.library.opcheck(select_attention, (query, key, value, units, mask, 0.3))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(key=torch.randn(2, 2, 6, 8, dtype=torch.bfloat16)), "one dtype, got torch.float32, torch.bfloat16"),
        (dict(query=torch.randn(2, 4, 1, 8, dtype=torch.float64)), "one dtype"),
        (dict(units=torch.tensor([[0, 1, 0]] * 2)), "3 units selected but only 2 KV groups"),
        (dict(mask=torch.ones(2, 4, 1, 6, dtype=torch.bool)), r"attn_mask \[B=2 or 1, 1, 1, L=6\], got \(2, 4, 1, 6\)"),
        (dict(query=torch.randn(2, 3, 1, 8)), r"query heads \(3\) must be a multiple of KV heads \(2\)"),
    ],
)
def test_bad_inputs_name_expected_and_actual(change, message):
    args = dict(query=torch.randn(2, 4, 1, 8), key=torch.randn(2, 2, 6, 8), value=torch.randn(2, 2, 6, 8),
                units=torch.tensor([[0], [1]]), mask=torch.ones(2, 1, 1, 6, dtype=torch.bool))
    args.update(change)
    if change.keys() == {"key"}:
        args["value"] = args["key"]
    with pytest.raises(ValueError, match=message):
        select_attention(args["query"], args["key"], args["value"], args["units"], args["mask"], 0.5)

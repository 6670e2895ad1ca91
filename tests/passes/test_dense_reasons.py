"""Every reason polar gives for keeping an attention site dense, produced by a real graph (issue: "every reason the
matcher can give for keeping a site dense is produced by at least one test").

The graphs come from the toy decoder of ``tests/passes/toy.py``: HF's layout in plain PyTorch, with one knob per
reason. Each test reads the reason from the public report (``polar_compile.explain``, or ``ExplainReport`` over the
records of ``compile_graph`` where the step must compile with dynamic shapes, which ``explain`` does not), and for
decode steps also checks the numbers: the polar-compiled step equals the eager toy where a site stays dense, and
the toy with the test's own head gating (``ToyAttention._gate``: float64 router scores, top-k) where one is routed.

Reasons no graph can produce are listed at the end of this file, with why.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polar_compile
from polar_compile.backend import compile_graph
from polar_compile.config import PolarConfig
from polar_compile.routers import kept_units
from tests.budget import examples
from tests.passes.toy import Knobs, ToyModel, ToySpec, bank, decode_inputs

DENSITY = 0.5
SPEC = ToySpec()  # 2 layers, 4 heads, 2 KV heads, head_dim 8, batch 2, cache 6
MHA = ToySpec(kv_heads=4)
# Dynamo then gives parameters symbolic sizes too (by default they are static under dynamic=True)
DYNAMIC_PARAMETERS = {"force_parameter_static_shapes": False, "force_nn_module_property_static_shapes": False}


def attn(layer: int) -> str:
    return f"layers.{layer}.self_attn"


def expected_output(model: ToyModel, routers: polar_compile.RouterBank, routed: list[int], inputs: dict
                    ) -> torch.Tensor:
    """The eager toy with the heads of layers ``routed`` gated by the test's own reference router."""
    for layer in routed:
        k = kept_units(DENSITY, model.spec.kv_heads)
        model.layers[layer].self_attn.reference_router = (routers.weights[layer], routers.biases[layer], k)
    try:
        with torch.no_grad():
            return model(**inputs)
    finally:
        for layer in model.layers:
            layer.self_attn.reference_router = None


def polar_output(model: ToyModel, routers: polar_compile.RouterBank, inputs: dict, *, dynamic: bool = False,
                 dynamo_config: dict | None = None, **options) -> torch.Tensor:
    """The step compiled by the polar backend (no Inductor); ``dynamo_config`` patches Dynamo's config."""
    torch._dynamo.reset()
    backend = polar_compile.make_backend(routers, DENSITY, inductor=False, **options)
    patch = torch._dynamo.config.patch(**dynamo_config) if dynamo_config else nullcontext()
    with patch, torch.no_grad():
        return torch.compile(model, backend=backend, dynamic=dynamic or None)(**inputs)


def check_numbers(model: ToyModel, routers: polar_compile.RouterBank, report: polar_compile.ExplainReport,
                  inputs: dict, **options) -> None:
    """Polar's step equals the eager toy, gated only at the layers the report says were rewritten."""
    expected = expected_output(model, routers, [s.layer for s in report.rewritten], inputs)
    torch.testing.assert_close(polar_output(model, routers, inputs, **options), expected, atol=1e-5, rtol=1e-5)


def explained(model: ToyModel, routers: polar_compile.RouterBank, inputs: dict, **options
              ) -> polar_compile.ExplainReport:
    return polar_compile.explain(model, options={"routers": routers, "density": DENSITY, **options}, **inputs)


def reasons(records) -> list[tuple[int | None, str, str]]:
    return [(s.layer, s.module, s.reason) for s in records]


def dynamic_report(model: ToyModel, routers: polar_compile.RouterBank, inputs: dict,
                   dynamo_config: dict | None = None) -> polar_compile.ExplainReport:
    """``explain`` for a step compiled with ``dynamic=True``, which ``explain`` never does: the records of
    ``compile_graph`` under the config ``make_backend(routers, DENSITY, inductor=False)`` builds."""
    config = PolarConfig.from_options({"routers": routers, "density": DENSITY, "inductor": False})
    graphs = []

    def recording(gm, example_inputs):
        return compile_graph(gm, example_inputs, config, records=graphs)

    torch._dynamo.reset()
    patch = torch._dynamo.config.patch(**dynamo_config) if dynamo_config else nullcontext()
    with patch, torch.no_grad():
        torch.compile(model, backend=recording, dynamic=True)(**inputs)
    return polar_compile.ExplainReport(graphs)


# --- the positive control: the toy with no knob is routed, and computes what the test's own gating computes ---


@settings(max_examples=examples(4), suppress_health_check=[HealthCheck.too_slow])
@given(heads_kv=st.sampled_from([(2, 2), (4, 2), (4, 4), (8, 2), (6, 3)]), head_dim=st.sampled_from([4, 8]),
       batch=st.integers(1, 3), cache_len=st.integers(2, 9), layers=st.integers(1, 2), seed=st.integers(0, 99))
def test_toy_without_knobs_is_rewritten_and_matches_the_reference(heads_kv, head_dim, batch, cache_len, layers, seed):
    heads, kv_heads = heads_kv
    spec = ToySpec(layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, batch=batch, cache_len=cache_len)
    model, inputs = ToyModel(spec, seed=seed), decode_inputs(spec, seed=seed)
    routers = bank(model, seed=seed)
    report = explained(model, routers, inputs)
    assert [(s.layer, s.module, s.kept) for s in report.rewritten] == [
        (i, attn(i), kept_units(DENSITY, kv_heads)) for i in range(layers)]
    assert not report.dense
    check_numbers(model, routers, report, inputs)
    with torch.no_grad():
        dense = model(**inputs)
    if kept_units(DENSITY, kv_heads) < kv_heads:  # the reference really drops heads
        assert (expected_output(model, routers, list(range(layers)), inputs) - dense).abs().max() > 1e-3


# --- the matcher (match.py): one knob per reason ---


@dataclass(frozen=True)
class Case:
    """A toy whose knob gives ``reason``: a str is every layer's reason (``{module}``: the site's module); a list
    of (layer, module, reason) is the reason of a site beside the layers, which are then routed."""

    reason: str | list[tuple[int | None, str, str]]
    knobs: Knobs = field(default_factory=Knobs)
    spec: ToySpec = SPEC
    model: dict = field(default_factory=dict)  # ToyModel keywords
    inputs: dict = field(default_factory=dict)  # extra forward inputs: name -> shape
    length: int = 1  # query tokens
    dtype: torch.dtype = torch.float32


OWN_KV = ("{name} is not {{module}}'s own self-attention K/V (not computed or written in this graph from its projection "
          "of the router input): cross-attention, an outside cache, or K/V from another input (such as a latent "
          "projection)")
MATCHER_CASES = {
    # _match_site
    "3-D SDPA inputs": Case("query/key shapes unknown or not 4-D [B, H, T, D]", Knobs(three_d=True)),
    # _why_not_owned
    "SDPA outside any module": Case(
        [(None, "", "the graph records no module for this SDPA call (no nn_module_stack), so nothing owns it")],
        model={"root_sdpa": True}),
    "SDPA outside the layer list": Case(
        [(None, "outside.self_attn", "outside.self_attn is not inside an item of a module list (a decoder layer), so "
          "it has no layer index for a router")], model={"outside": True}),
    "query not projected in the module": Case(
        "no linear/addmm/matmul-by-weight query projection inside {module} above the SDPA query (router input "
        "unknown)", Knobs(query_from_input=True), inputs={"query": (2, 4, 1, 8)}),
    "one query broadcast over MHA keys": Case("key/value are neither the KV cache nor HF's repeat_kv of it",
                                              Knobs(kv="one_query_head"), MHA),
    "cross-attention": Case(OWN_KV.format(name="key"), Knobs(cross=True, mask="none"),
                            inputs={"encoder_states": (2, 5, 32)}),
    "K/V repeated by repeat_interleave": Case(OWN_KV.format(name="key"), Knobs(kv="interleave")),
    "V repeated by repeat_interleave": Case(OWN_KV.format(name="value"), Knobs(kv="interleave_value")),
    # _why_not_decode
    "prefill": Case("prefill (query length 3); only decode steps are rewritten", length=3),
    "is_causal at one query": Case("is_causal=True with a single query", Knobs(is_causal=True)),
    "dropout": Case("dropout_p=0.25 (attention dropout is not supported)", Knobs(dropout_p=0.25)),
    "value head_dim": Case("value shape (2, 4, 6, 6) differs from key's (head_dim 8)", Knobs(value_head_dim=6)),
    "one query against GQA keys": Case("1 query heads are not a multiple of 2 KV heads", Knobs(kv="one_query_head")),
    "per-head mask": Case("attn_mask shape (2, 4, 1, 6) is not [B|1, 1, 1, L] (per-head or per-query masks stay "
                          "dense)", Knobs(mask="per_head")),
    "mask of length 1": Case("attn_mask length 1 differs from the cache length 6", Knobs(mask="short")),
    "fp32 mask, bf16 model": Case("attn_mask dtype torch.float32 is neither bool nor the query dtype torch.bfloat16",
                                  Knobs(mask="float32"), dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", list(MATCHER_CASES))
def test_matcher_reason(name):
    case = MATCHER_CASES[name]
    model = ToyModel(case.spec, case.knobs, **case.model).to(case.dtype)
    generator = torch.Generator().manual_seed(1)
    extra = {key: torch.randn(shape, generator=generator) for key, shape in case.inputs.items()}
    inputs = {key: value.to(case.dtype) if value.is_floating_point() else value
              for key, value in decode_inputs(case.spec, length=case.length, **extra).items()}
    routers = bank(model)
    report = explained(model, routers, inputs)

    if isinstance(case.reason, str):  # the knob is in every layer: every site says why
        assert reasons(report.sites) == [
            (i, attn(i), case.reason.format(module=attn(i))) for i in range(case.spec.layers)]
    else:
        assert reasons(report.dense) == case.reason
        assert [s.layer for s in report.rewritten] == list(range(case.spec.layers))
    # the GQA pass leaves the same sites as they are, for the same reasons
    assert reasons(report.sites_of("gqa")) == reasons(report.dense)
    # (a 3-D site has no query length the matcher can read: its record says "prefill")
    assert all(s.kind == ("prefill" if case.length > 1 else "decode") for s in report.sites if s.heads is not None)

    if name == "dropout":  # the same random draws in both runs
        torch.manual_seed(0)
        expected = expected_output(model, routers, [], inputs)
        torch.manual_seed(0)
        torch.testing.assert_close(polar_output(model, routers, inputs), expected)
    else:
        check_numbers(model, routers, report, inputs)


# --- routing (routing.py) ---


def test_layer_without_router_stays_dense_options_and_attached():
    model, inputs = ToyModel(SPEC), decode_inputs(SPEC)
    routers = bank(model, layers=[1])
    report = explained(model, routers, inputs)
    assert reasons(report.dense) == [(0, attn(0), "no router for layer 0")]
    assert [s.layer for s in report.rewritten] == [1]
    check_numbers(model, routers, report, inputs)
    # the same through routers attached to the model (polar::layer_router markers: none in layer 0)
    torch._dynamo.reset()
    polar_compile.attach(model, routers, density=DENSITY)
    try:
        attached = polar_compile.explain(model, **inputs)
        assert reasons(attached.dense) == [(0, attn(0), "no router for layer 0")]
        assert [s.layer for s in attached.rewritten] == [1]
    finally:
        polar_compile.detach(model)


def test_two_attention_modules_in_one_layer_share_its_router():
    model, inputs = ToyModel(SPEC, Knobs(two_modules=True)), decode_inputs(SPEC)
    routers = bank(model)
    report = explained(model, routers, inputs)
    pairs = {i: f"{attn(i)}, {attn(i)}_2" for i in (0, 1)}
    assert reasons(report.sites) == [
        (i, module, f"2 attention modules ({pairs[i]}) in layer {i}, and a bank holds one router per layer")
        for i in (0, 1) for module in (attn(i), f"{attn(i)}_2")]
    check_numbers(model, routers, report, inputs)


def test_two_sdpa_calls_added_in_one_module_stay_dense():
    """Their sum is not head-wise zero for an unselected head unless both calls are gated: kept dense, like any op
    other than reshapes and scalings between SDPA and the output projection."""
    model, inputs = ToyModel(SPEC, Knobs(two_calls=True)), decode_inputs(SPEC)
    routers = bank(model)
    report = explained(model, routers, inputs)
    assert [(s.layer, s.reason.split(" acts on")[0]) for s in report.sites] == [(i, "add") for i in (0, 0, 1, 1)]
    check_numbers(model, routers, report, inputs)


# --- the attention pass (attention.py) ---


def test_one_kv_head_multi_query_stays_dense():
    spec = ToySpec(kv_heads=1)
    model, inputs = ToyModel(spec), decode_inputs(spec)
    routers = bank(model)
    report = explained(model, routers, inputs)
    assert reasons(report.sites) == [
        (i, attn(i), "one KV head (multi-query): every query head reads the same K/V, so there is nothing to select")
        for i in range(2)]
    check_numbers(model, routers, report, inputs)


def test_float64_model_stays_dense():
    model, inputs = ToyModel(SPEC).double(), decode_inputs(SPEC)
    inputs["x"] = inputs["x"].double()
    routers = bank(model)
    report = explained(model, routers, inputs)
    assert reasons(report.sites) == [
        (i, attn(i), "dtype torch.float64 is not supported (supported: ['torch.float16', 'torch.bfloat16', "
         "'torch.float32'])") for i in range(2)]
    check_numbers(model, routers, report, inputs)


@settings(max_examples=examples(3), suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), cache_len=st.integers(2, 9), kv_heads=st.sampled_from([2, 4]))
def test_site_that_would_skip_too_few_bytes_stays_dense(batch, cache_len, kv_heads):
    """``min_saved_mib``: dense at exactly the bytes routing would skip, routed one byte below."""
    spec = ToySpec(layers=1, kv_heads=kv_heads, batch=batch, cache_len=cache_len)
    model, inputs = ToyModel(spec), decode_inputs(spec)
    routers = bank(model)
    skipped = (kv_heads - kept_units(DENSITY, kv_heads)) * batch * cache_len * spec.head_dim * 2 * 4  # K+V, fp32
    report = explained(model, routers, inputs, min_saved_mib=skipped / 2**20)
    assert reasons(report.sites) == [(0, attn(0), (
        f"routing would skip only {skipped / 2**20:.1f} MiB of K/V reads per step (B={batch}, L={cache_len}), not "
        f"more than min_saved_mib={skipped / 2**20:g}"))]
    check_numbers(model, routers, report, inputs, min_saved_mib=skipped / 2**20)
    torch._dynamo.reset()
    assert [s.layer for s in explained(model, routers, inputs, min_saved_mib=(skipped - 1) / 2**20).rewritten] == [0]


# --- the GQA pass (gqa.py) ---


@pytest.mark.parametrize(("spec", "knobs"), [(MHA, Knobs()), (SPEC, Knobs(kv="gqa"))], ids=["MHA", "enable_gqa"])
def test_dense_site_reading_the_cache_as_it_is_keeps_its_sdpa(spec, knobs):
    model, inputs = ToyModel(spec, knobs), decode_inputs(spec)
    routers = bank(model, layers=[])
    report = explained(model, routers, inputs)
    assert reasons(report.sites) == [(i, attn(i), f"no router for layer {i}") for i in range(2)]
    assert reasons(report.sites_of("gqa")) == [
        (i, attn(i), "K/V are read as the cache holds them (no repeat_kv)") for i in range(2)]
    check_numbers(model, routers, report, inputs)


# --- reasons only dynamic shapes give (explain compiles with dynamic=False; these compile with dynamic=True) ---


def test_dynamic_query_length():
    model, inputs = ToyModel(SPEC), decode_inputs(SPEC, length=3)
    routers = bank(model)
    report = dynamic_report(model, routers, inputs)
    assert reasons(report.sites) == [(i, attn(i), "query length is dynamic") for i in range(2)]
    assert reasons(report.sites_of("gqa")) == reasons(report.sites)
    check_numbers(model, routers, report, inputs, dynamic=True)


def test_dynamic_heads():
    """HF views the projections as ``(B, T, -1, head_dim)``: with parameters of symbolic size, so are the heads."""
    model, inputs = ToyModel(SPEC), decode_inputs(SPEC)
    routers = bank(model)
    report = dynamic_report(model, routers, inputs, DYNAMIC_PARAMETERS)
    assert [(s.layer, s.module) for s in report.dense] == [(0, attn(0)), (1, attn(1))]
    for site in report.sites:  # the symbolic sizes are Dynamo's names
        assert site.reason.startswith("heads or head_dim are dynamic ((")
    check_numbers(model, routers, report, inputs, dynamic=True, dynamo_config=DYNAMIC_PARAMETERS)


def test_dynamic_router_input_width():
    """Heads fixed in the view, so the query is static, but the hidden width stays symbolic (40, not heads x
    head_dim: Dynamo's duck sizing would give both one symbol, and the view makes the query width a constant)."""
    spec = ToySpec(hidden_size=40)
    model, inputs = ToyModel(spec, Knobs(fixed_heads=True)), decode_inputs(spec)
    routers = bank(model)
    report = dynamic_report(model, routers, inputs, DYNAMIC_PARAMETERS)
    assert reasons(report.sites) == [(i, attn(i), "router input width is unknown or dynamic") for i in range(2)]
    check_numbers(model, routers, report, inputs, dynamic=True, dynamo_config=DYNAMIC_PARAMETERS)


def external_cache(model: ToyModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the model's caches, to hand in as forward arguments (as HF's StaticCache tensors are)."""
    return [(layer.self_attn.k_cache.clone(), layer.self_attn.v_cache.clone()) for layer in model.layers]


def test_no_mask_and_a_dynamic_cache_length_stays_dense():
    """A cache handed in has a symbolic length under ``dynamic=True``; without a mask the rewrite would have to
    build one of that length."""
    model = ToyModel(SPEC, Knobs(mask="none", external_cache=True))
    routers = bank(model)
    inputs = decode_inputs(SPEC, cache=external_cache(model))
    report = dynamic_report(model, routers, inputs)
    assert reasons(report.sites) == [(i, attn(i), "no attention mask and a dynamic cache length") for i in range(2)]
    check_numbers(model, routers, report, inputs, dynamic=True)
    # with the mask, the same dynamic step is routed
    masked = ToyModel(SPEC, Knobs(external_cache=True))
    inputs = decode_inputs(SPEC, cache=external_cache(masked))
    report = dynamic_report(masked, routers, inputs)
    assert [s.layer for s in report.rewritten] == [0, 1]
    check_numbers(masked, routers, report, inputs, dynamic=True)


def test_scale_that_is_an_int_in_the_graph():
    """``scale=key.shape[-2]`` of a cache handed in under ``dynamic=True``: a graph node whose value is an int
    (Dynamo specialises the length it converts to the float argument, but keeps the node)."""
    spec = ToySpec(layers=1)
    model = ToyModel(spec, Knobs(external_cache=True, scale_from_shape=True))
    routers = bank(model)
    inputs = decode_inputs(spec, cache=external_cache(model))
    report = dynamic_report(model, routers, inputs)
    [site] = report.sites
    assert site.layer == 0 and site.reason.startswith("scale is neither a number nor a float in the graph (")
    check_numbers(model, routers, report, inputs, dynamic=True)


# Reasons no graph produces, so no test here:
# - "attn_mask is a constant {type}" (match.py, _why_not_decode): every tensor a traced program hands SDPA is a
#   node of the graph. Dynamo makes a global tensor a placeholder (g_mask_), a module's tensor attribute a
#   placeholder, and torch.tensor(...) in forward a call_function node; torch.export lifts constants to
#   placeholders too; SDPA refuses an attn_mask that is not a tensor before any graph exists.


def test_dropout_probability_traced_as_a_float_input():
    """Under dynamic=True Dynamo traces a float attribute as a graph input: its value is unknown when compiling."""
    model, inputs = ToyModel(SPEC, Knobs(dropout_from_attribute=True)), decode_inputs(SPEC)
    routers = bank(model)
    report = dynamic_report(model, routers, inputs)
    assert reasons(report.sites) == [
        (i, attn(i), "dropout_p is a float traced as a graph input (its value is unknown when compiling)")
        for i in range(2)]
    check_numbers(model, routers, report, inputs, dynamic=True)

"""A compiled graph runs only with the routers, density and model it was given: re-attach, detach, other models,
other options, each against the test's own hook reference, without ``torch._dynamo.reset()`` in between."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CompileConfig

import polar_compile
from polar_compile.testing import random_routers
from tests.budget import examples
from tests.models import VOCAB, DecodeDriver, TinySpec, gated_heads, tiny_model

SPEC = TinySpec("llama", heads=4, kv_heads=4, head_dim=8, layers=3)


def reference(model, bank, density, driver):
    """Decode logits of the eager model gated by the test's own hooks (``bank=None``: the dense model)."""
    with torch.no_grad():
        if bank is None:
            return model(**driver.decode_inputs(driver.prefill())).logits
        with gated_heads(model, bank, density):
            return model(**driver.decode_inputs(driver.prefill())).logits


def polar_step(model):
    """The README's path: the model's forward compiled with backend="polar" (eager after the rewrite, for speed)."""
    return torch.compile(model.forward, backend="polar", options={"inductor": False}, fullgraph=True)


def run(step, driver):
    with torch.no_grad():
        return step(**driver.decode_inputs(driver.prefill())).logits


@settings(max_examples=examples(5))
@given(actions=st.lists(st.tuples(st.integers(0, 1), st.sampled_from([None, 0, 1]), st.sampled_from([0.25, 0.5, 1.0])),
                        min_size=2, max_size=4))
def test_every_step_runs_with_the_routers_attached_at_that_time(actions):
    """Two models of one class, banks attached, replaced, detached in any order: each call equals the reference
    of what that model holds at that moment."""
    models = [tiny_model(SPEC, seed=seed) for seed in (1, 2)]
    banks = [[random_routers(model, seed=10 * m + b) for b in range(2)] for m, model in enumerate(models)]
    drivers = [DecodeDriver(model, batch=3, prompt_len=4, max_cache_len=9, pad=[0, 2, 1], seed=m)
               for m, model in enumerate(models)]
    steps = [polar_step(model) for model in models]
    held = [(None, 1.0), (None, 1.0)]
    for target, bank_index, density in actions:
        bank = None if bank_index is None else banks[target][bank_index]
        polar_compile.attach(models[target], bank, density=density)
        held[target] = (bank, density)
        for m in (0, 1):
            expected = reference(models[m], *held[m], drivers[m])
            torch.testing.assert_close(run(steps[m], drivers[m]), expected, atol=2e-5, rtol=1e-4)


def test_reattach_density_detach_and_a_never_attached_model():
    model, other = tiny_model(SPEC, seed=3), tiny_model(SPEC, seed=4)
    first, second = random_routers(model, seed=3), random_routers(model, seed=4)
    driver, other_driver = (DecodeDriver(m, batch=2, prompt_len=4, max_cache_len=8, seed=5) for m in (model, other))
    step, other_step = polar_step(model), polar_step(other)

    polar_compile.attach(model, first, density=0.5)
    sparse_first = run(step, driver)
    torch.testing.assert_close(sparse_first, reference(model, first, 0.5, driver), atol=2e-5, rtol=1e-4)
    assert (sparse_first - reference(model, None, 1.0, driver)).abs().max() > 1e-3  # routing changed the numbers
    torch.testing.assert_close(run(other_step, other_driver), reference(other, None, 1.0, other_driver))

    polar_compile.attach(model, second, density=0.5)  # same shapes: the buffers are refilled in place
    torch.testing.assert_close(run(step, driver), reference(model, second, 0.5, driver), atol=2e-5, rtol=1e-4)
    polar_compile.attach(model, second, density=0.25)  # another k: another graph
    torch.testing.assert_close(run(step, driver), reference(model, second, 0.25, driver), atol=2e-5, rtol=1e-4)
    polar_compile.detach(model)
    torch.testing.assert_close(run(step, driver), reference(model, None, 1.0, driver), atol=2e-5, rtol=1e-4)
    assert not [name for name, _ in model.named_buffers() if "polar" in name]


def test_attached_routers_stay_out_of_the_checkpoint_and_follow_the_model():
    model = tiny_model(SPEC, seed=6)
    keys = set(model.state_dict())
    polar_compile.attach(model, random_routers(model, seed=6), density=0.5)
    assert set(model.state_dict()) == keys
    model.to(torch.float16)
    layer = model.model.layers[1]
    assert layer.polar_router_weight.dtype == torch.float16 and layer.polar_router_k == 2
    assert not hasattr(model.model.layers[0], "polar_router_weight")  # layer 0 has no router


def test_options_banks_are_compared_by_identity_and_checked_against_the_graph():
    model = tiny_model(SPEC, seed=7)
    driver = DecodeDriver(model, batch=2, prompt_len=4, max_cache_len=8, seed=7)
    bank = random_routers(model, seed=7)
    twin = polar_compile.RouterBank(bank.shape, dict(bank.weights), dict(bank.biases))
    assert twin != bank
    other = random_routers(model, seed=8)
    for routers, density, equivalent in ((bank, 0.5, bank), (twin, 0.5, bank), (other, 0.5, other), (bank, 0.25, bank)):
        step = torch.compile(model.forward, backend="polar", fullgraph=True,
                             options={"routers": routers, "density": density, "inductor": False})
        want = reference(model, equivalent, density, driver)
        torch.testing.assert_close(run(step, driver), want, atol=2e-5, rtol=1e-4)

    for family, layers, message in (
            ("llama", 4, r"router bank is for a model of 4 layers, this graph's decoder \(model\.layers\) has 3"),
            ("llama", 2, r"layer 2 \(model\.layers\.2\.self_attn\): the router bank is for a model of 2 layers"),
            ("qwen2", 3, r"the router bank is for model_type 'qwen2', this graph runs 'llama'")):
        other_model = tiny_model(TinySpec(family, heads=4, kv_heads=4, head_dim=8, layers=layers), seed=7)
        step = torch.compile(model.forward, backend="polar", fullgraph=True,
                             options={"routers": random_routers(other_model), "inductor": False})
        with pytest.raises(Exception, match=message):
            run(step, driver)


def test_a_wrapped_decoder_routes_each_layer_with_its_own_router():
    """Layer indices come from the decoder's layer list, not the first integer of the path."""
    model = tiny_model(SPEC, seed=9)
    bank = random_routers(model, seed=9)
    wrapper = torch.nn.Module()
    wrapper.members = torch.nn.ModuleList([model])
    driver = DecodeDriver(model, batch=2, prompt_len=4, max_cache_len=8, seed=9)

    def forward(**inputs):
        return wrapper.members[0](**inputs)

    polar_compile.attach(model, bank, density=0.5)
    report = polar_compile.explain(forward, **driver.decode_inputs(driver.prefill()))
    assert [(s.layer, s.module) for s in report.rewritten] == [(1, "members.0.model.layers.1.self_attn"),
                                                                (2, "members.0.model.layers.2.self_attn")]
    torch._dynamo.reset()
    polar_compile.detach(model)
    step = torch.compile(forward, backend="polar", options={"routers": bank, "density": 0.5, "inductor": False})
    torch.testing.assert_close(run(step, driver), reference(model, bank, 0.5, driver), atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_generate_follows_reattach_and_a_second_model():
    """The README's generate() path (CPU: transformers compiles on accelerators only unless told otherwise)."""
    models = [tiny_model(SPEC, seed=seed) for seed in (12, 13)]
    generator = torch.Generator().manual_seed(12)
    input_ids = torch.randint(1, VOCAB, (3, 5), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
    config = CompileConfig(backend="polar", fullgraph=True)
    config._compile_all_devices = True

    def expected(model, bank, density):
        if bank is None:
            return model.generate(**kwargs, disable_compile=True)
        with gated_heads(model, bank, density):
            return model.generate(**kwargs, disable_compile=True)

    first, second = random_routers(models[0], seed=1), random_routers(models[0], seed=2)
    polar_compile.attach(models[0], first, density=0.5)
    assert torch.equal(models[0].generate(**kwargs, compile_config=config), expected(models[0], first, 0.5))
    polar_compile.attach(models[0], second, density=0.25)
    assert torch.equal(models[0].generate(**kwargs, compile_config=config), expected(models[0], second, 0.25))
    assert torch.equal(models[1].generate(**kwargs, compile_config=config), expected(models[1], None, 1.0))
    polar_compile.detach(models[0])
    assert torch.equal(models[0].generate(**kwargs, compile_config=config), expected(models[0], None, 1.0))

    def options_config(routers):  # torch.compile takes options only without a mode
        options = CompileConfig(backend="polar", fullgraph=True, mode=None, options={"routers": routers,
                                                                                     "density": 0.5})
        options._compile_all_devices = True
        return options

    assert torch.equal(models[0].generate(**kwargs, compile_config=options_config(first)), expected(models[0], first, 0.5))
    deeper = random_routers(tiny_model(TinySpec("llama", heads=4, kv_heads=4, head_dim=8, layers=4)))
    with pytest.raises(Exception, match=r"router bank is for a model of 4 layers, this graph's decoder"):
        models[0].generate(**kwargs, compile_config=options_config(deeper))


def test_an_options_density_list_shorter_than_the_attached_layers_is_refused_naming_it():
    model = tiny_model(SPEC, seed=11)
    driver = DecodeDriver(model, batch=2, prompt_len=4, max_cache_len=8, seed=11)
    polar_compile.attach(model, random_routers(model, seed=11), density=0.5)
    step = torch.compile(model.forward, backend="polar", fullgraph=True,
                         options={"density": [0.5], "inductor": False})
    with pytest.raises(Exception, match=r"density has 1 per-layer entries, but the graph routes layer 1"):
        run(step, driver)


def test_a_router_directory_in_torch_compile_options_is_refused(tmp_path):
    """A path compares equal after its files change, so torch.compile would reuse a graph of the old bank."""
    model = tiny_model(SPEC, seed=12)
    driver = DecodeDriver(model, batch=2, prompt_len=4, max_cache_len=8, seed=12)
    random_routers(model, seed=12).save(tmp_path)
    step = torch.compile(model.forward, backend="polar", fullgraph=True,
                         options={"routers": str(tmp_path), "inductor": False})
    with pytest.raises(Exception, match=r"options\['routers'\] must be a RouterBank .* a path compares equal after "
                                        r"its files change"):
        run(step, driver)


def test_an_attached_model_survives_torch_save_and_deepcopy_still_routed(tmp_path):
    model = tiny_model(SPEC, seed=13)
    bank = random_routers(model, seed=13)
    polar_compile.attach(model, bank, density=0.5)
    torch.save(model, tmp_path / "model.pt")
    for copy_ in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(model)):
        driver = DecodeDriver(copy_, batch=2, prompt_len=4, max_cache_len=8, seed=13)
        routed = run(polar_step(copy_), driver)
        polar_compile.detach(copy_)
        torch.testing.assert_close(routed, reference(copy_, bank, 0.5, driver), atol=2e-5, rtol=1e-4)

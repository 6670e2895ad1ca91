"""The polar backend through torch.compile: entry point, options, attach, modes, Inductor."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import polar_compile
from polar_compile.testing import random_routers
from tests.models import DecodeDriver, TinySpec, gated_heads, tiny_model


def test_backend_resolves_by_name_without_import():
    script = textwrap.dedent("""
        import sys, warnings, torch
        warnings.simplefilter("ignore")
        fn = torch.compile(lambda x: torch.nn.functional.relu(x) * 2, backend="polar", options={"inductor": False})
        x = torch.randn(5)
        assert torch.equal(fn(x), torch.relu(x) * 2)
        from torch._dynamo import lookup_backend
        print(lookup_backend("polar").__module__, "polar_compile" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["polar_compile.backend", "True"]


def decode(model, backend, driver, **compile_kwargs):
    step = torch.compile(model.forward, backend=backend, fullgraph=True, **compile_kwargs)
    with torch.no_grad():
        return step(**driver.decode_inputs(driver.prefill())).logits


@pytest.mark.slow
def test_inductor_reduce_overhead_with_attached_routers_matches_eager_rewrite():
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=2), seed=3)
    driver = DecodeDriver(model, batch=3, prompt_len=4, max_cache_len=8, pad=[0, 1, 2], seed=3)
    bank = random_routers(model, seed=3)
    eager = decode(model, polar_compile.make_backend(bank, 0.5, inductor=False), driver)
    torch._dynamo.reset()
    polar_compile.attach(model, bank, density=0.5)
    inductor, codes = run_and_get_code(decode, model, "polar", driver, mode="reduce-overhead")
    torch.testing.assert_close(inductor, eager, atol=1e-4, rtol=1e-4)
    # Inductor calls the ops whole (backend.compile_graph) instead of tracing into their kernels
    assert all(f"torch.ops.polar.{op}.default(" in codes[0] for op in ("route", "select_attention"))
    with torch.no_grad():
        dense = model(**driver.decode_inputs(driver.prefill())).logits
    assert (inductor - dense).abs().max() > 1e-3


def test_options_reach_the_backend():
    model = tiny_model(TinySpec("qwen3", heads=4, kv_heads=2, head_dim=8, layers=2))
    driver = DecodeDriver(model, batch=2, prompt_len=3, max_cache_len=8)
    bank = random_routers(model)
    polar = decode(model, "polar", driver, options={"routers": bank, "density": 0.5, "inductor": False})
    torch._dynamo.reset()
    factory = decode(model, polar_compile.make_backend(bank, 0.5, inductor=False), driver)
    torch.testing.assert_close(polar, factory, atol=0, rtol=0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"unknown polar option\(s\) \['dens'\]"):
        decode(model, "polar", driver, options={"dens": 0.5})


def test_attach_checks_density_and_model():
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=2))
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\], got 1.5"):
        polar_compile.attach(model, random_routers(model), density=1.5)


def test_dynamic_batch_is_rewritten_and_matches_the_hook_reference():
    """Under dynamic=True Dynamo traces the attention scale as a float in the graph; the rewrite must still apply."""
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=3), seed=2)
    bank = random_routers(model, seed=2)
    step = torch.compile(model.forward, backend=polar_compile.make_backend(bank, 0.5, inductor=False), dynamic=True,
                         fullgraph=True)
    for batch in (2, 3, 5):
        driver = DecodeDriver(model, batch=batch, prompt_len=4, max_cache_len=10, seed=batch)
        with gated_heads(model, bank, 0.5), torch.no_grad():
            expected = model(**driver.decode_inputs(driver.prefill())).logits
        with torch.no_grad():
            dense = model(**driver.decode_inputs(driver.prefill())).logits
            actual = step(**driver.decode_inputs(driver.prefill())).logits
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
        assert (actual - dense).abs().max() > 1e-3


def test_backend_module_is_not_hidden_and_the_old_factory_name_warns():
    import polar_compile.backend as module

    assert module.__name__ == "polar_compile.backend" and module.make_backend is polar_compile.make_backend
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=2), seed=4)
    driver = DecodeDriver(model, batch=2, prompt_len=3, max_cache_len=8, seed=4)
    bank = random_routers(model, seed=4)
    with pytest.warns(DeprecationWarning, match=r"polar_compile\.backend\(\.\.\.\) is deprecated, use "
                                                r"polar_compile\.make_backend"):
        old = polar_compile.backend(bank, 0.5, inductor=False)
    expected = decode(model, polar_compile.make_backend(bank, 0.5, inductor=False), driver)
    torch._dynamo.reset()
    torch.testing.assert_close(decode(model, old, driver), expected, atol=0, rtol=0)


def test_a_step_compiled_with_autograd_recording_stays_dense_and_says_why():
    """The polar ops have no backward: with grad mode on (no torch.no_grad()) the graph stays dense, with a warning,
    instead of failing in AOTAutograd."""
    model = tiny_model(TinySpec("llama", heads=4, kv_heads=2, head_dim=8, layers=2), seed=5)
    driver = DecodeDriver(model, batch=2, prompt_len=3, max_cache_len=8, seed=5)
    step = torch.compile(model.forward, backend="polar", fullgraph=True,
                         options={"routers": random_routers(model, seed=5), "density": 0.5})
    with pytest.warns(UserWarning, match=r"every site stays dense: autograd is recording this step .* "
                                         r"torch\.no_grad\(\) or torch\.inference_mode\(\)"):
        actual = step(**driver.decode_inputs(driver.prefill())).logits
    with torch.no_grad():
        expected = model(**driver.decode_inputs(driver.prefill())).logits
    torch.testing.assert_close(actual.detach(), expected, atol=2e-5, rtol=1e-4)

"""`polar-compile bench` on the CPU: option parsing, the ideal (Amdahl) speedup, the writers, the model shapes, the
decode-step setup and the no-CUDA error. Nothing here times anything or compiles."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from polar_compile import PolarConfig, bench
from polar_compile.bench import (
    KERNEL_CATEGORIES,
    SHAPES,
    VARIANTS,
    Case,
    CudaUnavailableError,
    DecodeStep,
    add_ideals,
    breakdown_markdown,
    compile_variant,
    grid,
    ideal_speedup,
    is_attention_kernel,
    kernel_category,
    layers_that_fit,
    markdown,
    parse_cases,
    parse_models,
    parse_sizes,
    plot,
    require_cuda,
    tables,
    write_results,
)
from polar_compile.cli import main
from polar_compile.testing import random_routers

# The first row of benchmarks/decode.json (H200) and its line in benchmarks/RESULTS.md, as committed in c2754c3
# (plus a router share, a column added since; the compile column now divides by (3)'s first call, not (2)'s).
H200_ROW = {
    "model": "llama2-7b", "layers": 16, "batch": 64, "context": 4096,
    "eager": 0.021447999954223633, "eager-first-call": 0.02312590199998965,
    "inductor": 0.018745903968811033, "inductor-first-call": 20.483541683,
    "inductor-gqa": 0.018609855651855467, "inductor-gqa-first-call": 7.863287481,
    "polar-1.0": 0.01868742370605469, "polar-1.0-first-call": 26.614841322000004,
    "polar-0.5": 0.011740848064422608, "polar-0.5-first-call": 27.458286808999986,
    "attention-share": 0.8363190079168394, "ideal-0.5": 1.718684084045839,
    "ideal-0.5-layer0-dense": 1.6448032157611543, "router-share": 0.0081,
}
H200_LINE = ("| llama2-7b (16 layers) | 64 | 4096 | 21.448 | 18.746 | 18.610 | 18.687 | 11.741 | 1.59x | 1.72x | 92.2% | "
             "1.64x | 96.4% | 1.60x | 1.004 | 84% | 0.8% | 3.49 | — |")  # measured before host-synced timing was split out


def synthetic_row(model: str = "llama3-8b", batch: int = 16, context: int = 1024, layers: int = 4,
                  **times: float) -> dict:
    """A row with round numbers: ms per step 40/20/10/10/5 (eager/inductor/gqa/polar 1.0/polar 0.5) back to back,
    each 1 ms more host-synced."""
    row = {"model": model, "layers": layers, "batch": batch, "context": context}
    for variant, seconds in zip(VARIANTS, (0.040, 0.020, 0.010, 0.010, 0.005), strict=True):
        row[variant] = times.get(variant, seconds)
        row[f"{variant}-synced"] = row[variant] + 0.001
        row[f"{variant}-first-call"] = 10.0
    row["router-share"] = 0.02
    return add_ideals(row, attn_seconds=0.008, routed_share=0.75)


# -- parsing -------------------------------------------------------------------------------------------------------


def test_parse_cases_in_order():
    cases = parse_cases("llama2-7b:64:4096, llama3-8b:1:8192,opt-6.7b:128:2048")
    assert cases == [("llama2-7b", 64, 4096), ("llama3-8b", 1, 8192), ("opt-6.7b", 128, 2048)]
    assert cases[1] == Case(model="llama3-8b", batch=1, context=8192)


@pytest.mark.parametrize(("spec", "message"), [
    ("llama2-7b:x:4096", "case 'llama2-7b:x:4096': batch 'x' is not a positive integer"),
    ("llama2-7b:64:4096,llama2-7b:64:0", "case 'llama2-7b:64:0': context '0' is not a positive integer"),
    ("llama2-7b:-3:4096", "batch '-3'"),
    ("llama2-7b:64:4k", "context '4k'"),
    ("gpt2:1:128", f"case 'gpt2:1:128': model 'gpt2' is not one of {', '.join(SHAPES)}"),
    ("llama2-7b:64", "expected MODEL:BATCH:CONTEXT (3 fields), got 2"),
    ("llama2-7b:64:4096:1", "got 4"),
    (" , ", "no cases"),
])
def test_parse_cases_names_the_bad_field(spec, message):
    with pytest.raises(ValueError) as error:
        parse_cases(spec)
    assert message in str(error.value)


def test_grid_runs_batch_fastest_then_context_then_model():
    models, batches, contexts = parse_models("opt-6.7b,llama2-7b"), parse_sizes("1,64", "batch"), parse_sizes("2048,8")
    assert grid(models, batches, contexts) == [
        ("opt-6.7b", 1, 2048), ("opt-6.7b", 64, 2048), ("opt-6.7b", 1, 8), ("opt-6.7b", 64, 8),
        ("llama2-7b", 1, 2048), ("llama2-7b", 64, 2048), ("llama2-7b", 1, 8), ("llama2-7b", 64, 8),
    ]
    with pytest.raises(ValueError, match="batch '0' is not a positive integer"):
        parse_sizes("1,0", "batch")
    with pytest.raises(ValueError, match="model 'llama' is not one of"):
        parse_models("llama2-7b,llama")


@pytest.mark.parametrize(("argv", "message"), [
    (["--cases", "llama2-7b:64:x"], "argument --cases: case 'llama2-7b:64:x': context 'x' is not a positive integer"),
    (["--cases", "llama-7b:64:4096"], "model 'llama-7b' is not one of"),
    (["--batch", "1,sixteen"], "argument --batch: batch 'sixteen' is not a positive integer"),
    (["--context", "1024,,-1"], "argument --context: context '-1' is not a positive integer"),
    (["--models", "llama2-7b,mistral"], "argument --models: model 'mistral'"),
    (["--layers", "0"], "argument --layers: layers '0' is not a positive integer"),
    (["--repeats", "many"], "argument --repeats: repeats 'many' is not a positive integer"),
])
def test_cli_rejects_bad_options_before_anything_runs(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_options_and_defaults_match_the_old_script(monkeypatch, tmp_path):
    """Same names and defaults as benchmarks/decode.py had; the parsed cases reach run_benchmark unchanged."""
    calls = []
    monkeypatch.setattr(bench, "require_cuda", lambda: None)
    monkeypatch.setattr(bench, "run_benchmark", lambda cases, **kw: calls.append((list(cases), kw)))
    assert main(["bench"]) == 0
    cases, kwargs = calls.pop()
    assert cases == grid(["llama2-7b", "llama3-8b", "opt-6.7b"], [1, 16, 64, 128], [1024, 4096, 8192])
    assert kwargs["max_layers"] is None and kwargs["repeats"] == 30 and str(kwargs["out"]) == "out"  # all layers
    assert kwargs["variants"] is None and kwargs["attn_density"] is None  # every variant, each shape's density
    # --cases wins over the grid, as in the script
    assert main(["bench", "--models", "opt-6.7b", "--cases", "llama3-8b:64:8192,llama2-7b:1:4096", "--layers", "16",
                 "--repeats", "20", "--out", str(tmp_path)]) == 0
    cases, kwargs = calls.pop()
    assert cases == [("llama3-8b", 64, 8192), ("llama2-7b", 1, 4096)]
    assert (kwargs["max_layers"], kwargs["repeats"], kwargs["out"]) == (16, 20, tmp_path)
    assert main(["bench", "--models", "opt-6.7b", "--batch", "64", "--context", "2048,4096"]) == 0
    assert calls.pop()[0] == [("opt-6.7b", 64, 2048), ("opt-6.7b", 64, 4096)]


# -- no CUDA -------------------------------------------------------------------------------------------------------


def test_no_cuda_is_a_clear_error_not_a_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CudaUnavailableError, match="needs a CUDA GPU"):
        require_cuda()
    status = main(["bench", "--cases", "llama2-7b:1:16", "--layers", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("polar-compile bench: error: the decode benchmark needs a CUDA GPU")
    assert "torch.cuda.is_available() is False" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_help_builds_without_transformers_or_matplotlib():
    code = ("import sys\nfrom polar_compile.cli import main\n"
            "for argv in (['--help'], ['bench', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('transformers', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "polar-compile bench" in result.stdout and "--cases CASES" in result.stdout


# -- ideal speedup -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.0, 0.19, 0.5, 0.86, 0.96, 1.0])
@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("routed", [1.0, 15 / 16, 0.5])
def test_ideal_is_amdahls_law(share, density, routed):
    """Amdahl: the fraction p = routed * share of the step speeds up by 1/density, the rest is unchanged."""
    step = 0.0123
    p = routed * share
    amdahl = 1 / ((1 - p) + p * density)
    assert ideal_speedup(step, share * step, density, routed) == pytest.approx(amdahl, rel=1e-12)


def test_ideal_caps_attention_at_the_step_and_matches_the_issue_anchor():
    assert ideal_speedup(1.0, 3.0, 0.5) == pytest.approx(2.0)  # attention measured above the step: at most 1/d
    assert ideal_speedup(8.93e-3, 0.86 * 8.93e-3, 0.5) == pytest.approx(1.75, abs=0.005)  # issue: "ideal ≈ 1.75x"


def test_add_ideals_reproduces_the_committed_h200_row():
    row = {k: v for k, v in H200_ROW.items() if not k.startswith(("ideal", "attention"))}
    t_attn = H200_ROW["attention-share"] * H200_ROW["inductor-gqa"]
    add_ideals(row, t_attn, routed_share=15 / 16)  # 16 layers, layer 0 dense
    for key in ("attention-share", "ideal-0.5", "ideal-0.5-layer0-dense"):
        assert row[key] == pytest.approx(H200_ROW[key], rel=1e-12), key


# -- writers -------------------------------------------------------------------------------------------------------


def test_markdown_reproduces_the_results_table_line():
    lines = markdown([H200_ROW]).splitlines()
    assert lines[2] == H200_LINE
    assert len(lines) == 3 and lines[0].count("|") == lines[1].count("|") == H200_LINE.count("|") == 20


def test_markdown_on_synthetic_rows():
    rows = [synthetic_row(), synthetic_row(batch=64, **{"polar-0.5": 0.008})]
    lines = markdown(rows).splitlines()
    assert len(lines) == 4
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    # ideal: T=10 ms, T_attn=8 ms -> 10/(10-4)=1.67x; layer 0 dense (3/4 routed) -> 10/(10-3)=1.43x
    assert cells == ["llama3-8b (4 layers)", "16", "1024", "40.000", "20.000", "10.000", "10.000", "5.000",
                     "2.00x", "1.67x", "120.0%", "1.43x", "140.0%", "4.00x", "1.000", "80%", "2.0%", "1.00", "1.83x"]
    assert lines[3].split("|")[9].strip() == "1.25x"


def test_write_results_round_trips(tmp_path):
    rows = [synthetic_row(), synthetic_row(model="opt-6.7b", context=2048)]
    json_path, md_path = write_results(rows, tmp_path)
    assert (json_path, md_path) == (tmp_path / "decode.json", tmp_path / "decode.md")
    assert json.loads(json_path.read_text()) == rows
    assert md_path.read_text() == markdown(rows) + "\n"  # no breakdown table: no row has one


def with_breakdown(row: dict, dense: tuple[float, ...], sparse: tuple[float, ...]) -> dict:
    row["inductor-gqa-gpu"] = dict(zip(KERNEL_CATEGORIES, dense, strict=True))
    row["polar-0.5-gpu"] = dict(zip(KERNEL_CATEGORIES, sparse, strict=True))
    return row


def test_breakdown_table_lists_the_rows_that_have_one():
    rows = [with_breakdown(synthetic_row(), (0.008, 0.0015, 0.0, 0.0, 0.0005), (0.0042, 0.0015, 0.0001, 0.0, 0.00051)),
            synthetic_row(batch=64)]  # measured before the breakdown existed
    lines = breakdown_markdown(rows).splitlines()
    assert len(lines) == 4 and {line.count("|") for line in lines} == {11}
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == [
        "llama3-8b (4 layers)", "16", "1024", "inductor-gqa", "8.000", "1.500", "0.000", "0.000", "0.500", "10.000"]
    assert [c.strip() for c in lines[3].split("|")[4:-1]] == [
        "polar-0.5", "4.200", "1.500", "0.100", "0.000", "0.510", "6.310"]
    assert breakdown_markdown(rows[1:]) == ""
    # a row profiled before the "mlp" category existed
    old = synthetic_row()
    old["polar-0.5-gpu"] = {"attention": 0.004, "GEMMs": 0.001, "router": 0.0001, "other": 0.0005}
    assert [c.strip() for c in breakdown_markdown([old]).splitlines()[2].split("|")[4:-1]] == [
        "polar-0.5", "4.000", "1.000", "0.100", "—", "0.500", "5.600"]
    assert tables(rows) == markdown(rows) + "\n\n" + breakdown_markdown(rows)
    assert tables(rows[1:]) == markdown(rows[1:])


def test_report_merges_runs_without_cuda(tmp_path, monkeypatch, capsys):
    """--report: rows of several runs in one table, one per case: the one with the most layers, else the later."""
    def no_cuda():
        raise AssertionError("--report must not need a GPU")

    monkeypatch.setattr(bench, "require_cuda", no_cuda)
    first = [synthetic_row(model="opt-6.7b", batch=64), synthetic_row(batch=64), synthetic_row(batch=16, layers=8),
             synthetic_row(batch=128)]
    second = [synthetic_row(batch=64, **{"polar-0.5": 0.004}), synthetic_row(batch=16, context=4096),
              synthetic_row(batch=16, **{"polar-0.5": 0.003}), synthetic_row(batch=128, layers=6)]
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, rows in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(rows))
    assert main(["bench", "--report", *map(str, paths), "--out", str(tmp_path / "out")]) == 0
    merged = json.loads((tmp_path / "out" / "decode.json").read_text())
    assert [(r["model"], r["batch"], r["context"], r["layers"]) for r in merged] == [
        ("llama3-8b", 16, 1024, 8), ("llama3-8b", 64, 1024, 4), ("llama3-8b", 128, 1024, 6),
        ("llama3-8b", 16, 4096, 4), ("opt-6.7b", 64, 1024, 4)]
    assert merged[0]["polar-0.5"] == 0.005  # 8 layers beat the later file's 4
    assert merged[1]["polar-0.5"] == 0.004  # as many layers: the later file's
    assert (tmp_path / "out" / "decode.md").read_text().strip() == markdown(merged)
    assert (tmp_path / "out" / "decode.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out.strip() == markdown(merged)


def test_report_names_a_file_that_is_not_a_benchmark(tmp_path, capsys):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"perplexity": 60.0}))
    assert main(["bench", "--report", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"polar-compile bench: error: {path}: expected a list of benchmark rows" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_plot_writes_a_png(tmp_path):
    rows = [synthetic_row(model=m, batch=b, context=c, layers=8 if b > 16 and c > 1024 else 32)
            for m in ("llama2-7b", "opt-6.7b") for c in (1024, 4096) for b in (1, 64)]
    plot(rows, tmp_path / "decode.png")
    assert (tmp_path / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- shapes and the decode step ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), [
    ("llama2-7b", 6_738_415_616),  # Llama-2-7B's published count
    ("llama3-8b", 8_030_261_248),  # Llama-3.1-8B's
    ("llama2-13b", 13_015_864_320),  # Llama-2-13B's (its 40 layers)
    ("opt-6.7b", 6_658_473_984 + (16384 - 2048) * 4096),  # OPT-6.7B's, positions widened from 2048 to 16384
])
def test_shapes_are_the_real_models(name, params):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(SHAPES[name]())
    assert sum(p.numel() for p in model.parameters()) == params


PUBLISHED = {"llama2-7b": (6_738_415_616, 32000), "llama3-8b": (8_030_261_248, 128256)}  # parameters, vocab


@pytest.mark.parametrize(("name", "batch", "context", "kv_heads"),
                         [("llama2-7b", 64, 4096, 32), ("llama3-8b", 16, 8192, 8)])
def test_layers_that_fit_counts_weights_cache_and_repeated_kv(name, batch, context, kv_heads):
    total, vocab = PUBLISHED[name]
    fixed = 2 * vocab * 4096 + 4096  # embeddings, LM head, final norm
    per_layer = (total - fixed) // 32
    layer_bytes = 2 * per_layer + 2 * batch * context * kv_heads * 128 * 2  # bf16 weights, K and V
    repeated = 0 if kv_heads == 32 else 2 * batch * context * 32 * 128 * 2  # one layer's repeat_kv

    def needs(layers: int) -> int:
        return 2 * fixed + repeated + bench.MEMORY_MARGIN + layers * layer_bytes

    assert layers_that_fit(name, batch, context, needs(10)) == 10
    assert layers_that_fit(name, batch, context, needs(10) - 1) == 9
    assert layers_that_fit(name, batch, context, needs(40)) == 32  # never more than the model has
    assert layers_that_fit(name, batch, context, needs(40), max_layers=16) == 16
    with pytest.raises(ValueError, match=rf"{name} B={batch} L={context}: one layer needs .* GiB of GPU memory"):
        layers_that_fit(name, batch, context, needs(1) - 1)


def tiny(name: str, layers: int = 2):
    """The shape's config class and options, shrunk to hidden 64, 4 heads (GQA ratio kept), vocab 128."""
    config = SHAPES[name](layers)
    heads = config.num_attention_heads
    kv = 4 * getattr(config, "num_key_value_heads", heads) // heads
    small = dict(hidden_size=64, num_attention_heads=4, vocab_size=128)
    if config.model_type == "opt":
        small.update(ffn_dim=128, word_embed_proj_dim=64)
    else:
        small.update(intermediate_size=128, num_key_value_heads=kv, head_dim=16)
    config.update(small)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(SHAPES))
def test_decode_step_on_tiny_models(name):
    model = tiny(name)
    step = DecodeStep(model, batch=3, context=12, device="cpu")
    assert step.inputs["input_ids"].shape == (3, 1)
    assert step.inputs["attention_mask"].shape == (3, 12)
    for layer in step.cache.layers:
        assert layer.keys.shape[2] == 12 and layer.keys.std() > 0.5 and layer.values.std() > 0.5  # random K/V
    with torch.no_grad():
        step.reset()
        first = model(**step.inputs).logits
        assert all(int(layer.cumulative_length) == 12 for layer in step.cache.layers)  # the step advanced it
        step.reset()
        assert all(int(layer.cumulative_length) == 11 for layer in step.cache.layers)
        again = model(**step.inputs).logits
    assert first.shape == (3, 1, 128) and torch.equal(first, again)


@pytest.mark.parametrize("name", list(SHAPES))
def test_gqa_native_attention_equals_hf_sdpa(name):
    """Variant (3) computes what (2) computes: only the attention function differs."""
    model = tiny(name)
    step = DecodeStep(model, batch=2, context=10, device="cpu")
    bank = random_routers(model)
    outputs = {}
    with torch.no_grad():
        for variant in ("eager", "inductor-gqa"):
            compile_variant(model, variant, bank)  # sets the attention implementation; the compiled step is not run
            assert model.config._attn_implementation == ("sdpa" if variant == "eager" else "sdpa_gqa")
            step.reset()
            outputs[variant] = model(**step.inputs).logits
    torch.testing.assert_close(outputs["inductor-gqa"], outputs["eager"], rtol=1e-5, atol=1e-5)


def test_compile_variant_rejects_unknown_variants():
    model = tiny("llama2-7b")
    with pytest.raises(ValueError, match=r"variant 'polar-0\.3' is not one of"):
        compile_variant(model, "polar-0.3", random_routers(model))


def test_attention_kernels_are_told_from_inductor_kernels_named_after_sdpa():
    assert is_attention_kernel("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_35_16x128x128")
    assert is_attention_kernel("fmha_cutlassF_bf16_aligned_64x128_rf_sm80")
    assert is_attention_kernel("void flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>>")
    assert not is_attention_kernel("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add_arange")
    assert not is_attention_kernel("nvjet_sm90_tst_144x64_64x8_4x1_v_bz_TNN")
    assert not is_attention_kernel("_select_attention_split_kernel")


@pytest.mark.parametrize(("kernel", "category"), [
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("void flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>>", "attention"),
    ("_select_attention_split_kernel", "attention"),
    ("_select_attention_merge_kernel", "attention"),
    ("_route_kernel", "router"),
    ("nvjet_sm90_tst_144x64_64x8_4x1_v_bz_TNN", "GEMMs"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMMs"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>", "GEMMs"),
    ("triton_tem_fused_mm_3", "GEMMs"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_2", "other"),
    ("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add_arange", "other"),
    ("void at::native::index_elementwise_kernel<128, 4>", "other"),
])
def test_kernel_categories(kernel, category):
    assert kernel_category(kernel) == category


# -- the MLP half: shapes, k tables, rank, variants -----------------------------------------------------------------


def test_opt_66b_shape():
    config = SHAPES["opt-66b"]()
    assert (config.hidden_size, config.ffn_dim, config.num_attention_heads, config.num_hidden_layers) == (
        9216, 36864, 72, 64)
    assert config.activation_function == "relu" and SHAPES["opt-66b"](3).num_hidden_layers == 3


def test_union_densities_keep_the_listed_and_interpolate_in_log2_batch():
    for name, listed in bench.MLP_UNION_DENSITIES.items():
        full = bench.union_densities(name)
        assert sorted(full) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
        assert all(full[b] == d for b, d in listed.items())
    full = bench.union_densities("opt-66b")
    # independent: numpy's linear interpolation on log2 B between the listed batch sizes 1 and 8
    sizes = sorted(bench.MLP_UNION_DENSITIES["opt-66b"])
    for batch in (2, 4):
        expected = np.interp(np.log2(batch), np.log2(sizes), [bench.MLP_UNION_DENSITIES["opt-66b"][b] for b in sizes])
        assert full[batch] == pytest.approx(expected, rel=1e-12)
    assert full[2] == pytest.approx(0.075 + 0.1 / 3) and full[4] == pytest.approx(0.075 + 0.2 / 3)
    with pytest.raises(KeyError):
        bench.union_densities("llama2-7b")  # SiLU MLP: no union densities


@pytest.mark.parametrize("name", list(bench.MLP_UNION_DENSITIES))
def test_k_table_from_the_means(name):
    ffn = SHAPES[name]().ffn_dim
    densities = bench.union_densities(name)
    table = bench.mlp_topk(densities, ffn, num_layers=5)
    assert sorted(table) == sorted(densities)
    for batch, row in table.items():
        assert len(row) == 5 and row[0] is None  # layer 0 dense
        k = row[1]
        assert set(row[1:]) == {k}  # one k for every routed layer
        assert k % 64 == 0 and k - 64 < densities[batch] * ffn <= k  # rounded up to the tile
    assert table[1][1] == (1600 if name == "opt-6.7b" else 2816)  # 0.095 * 16384 = 1556.5; 0.075 * 36864 = 2764.8
    assert bench.mlp_topk({1: 1.0}, 100, 2) == {1: [None, 100]}  # never past ffn
    assert bench.mlp_topk({1: 0.1}, 640, 3, first_layer=2) == {1: [None, None, 64]}
    with pytest.raises(ValueError, match="density must be a number in"):
        bench.mlp_topk({1: 1.5}, 640, 3)


@pytest.mark.parametrize(("hidden", "ffn", "rank"), [(4096, 16384, 192), (9216, 36864, 384), (64, 128, 64)])
def test_mlp_router_rank_keeps_its_bytes_within_3_percent(hidden, ffn, rank):
    assert bench.mlp_router_rank(hidden, ffn) == rank
    budget = 0.03 * 2 * hidden * ffn
    if rank > 64:  # the largest multiple of 64 under the budget (64 is the floor)
        assert rank * (hidden + ffn) <= budget < (rank + 64) * (hidden + ffn)


def test_variants_per_shape():
    assert bench.variants_for("llama3-8b") == VARIANTS
    for name in ("opt-6.7b", "opt-66b"):
        assert bench.variants_for(name) == (*VARIANTS, "polar-attn", "polar-mlp", "polar-both")
    chosen = ["polar-both", "inductor-gqa", "polar-attn"]
    assert bench.variants_for("opt-66b", chosen) == ("inductor-gqa", "polar-attn", "polar-both")  # in run order
    assert bench.variants_for("llama2-7b", chosen) == ("inductor-gqa",)  # no MLP variants for a SiLU MLP
    assert bench.attention_density("opt-66b") == 0.3
    assert bench.attention_density("opt-6.7b") == bench.attention_density("llama2-7b") == 0.5


@pytest.mark.parametrize(("spec", "message"), [
    ("inductor-gqa,polar-mlp,polar-all", "variant 'polar-all' is not one of eager, inductor, inductor-gqa"),
    ("polar-attn,polar-both", "variants must include inductor-gqa"),
    (" , ", "no variants given"),
])
def test_parse_variants_names_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_variants(spec)


@pytest.mark.parametrize(("argv", "message"), [
    (["--variants", "inductor-gqa,polar-0.3"], "argument --variants: variant 'polar-0.3' is not one of"),
    (["--variants", "polar-both"], "argument --variants: variants must include inductor-gqa"),
    (["--attn-density", "0"], "argument --attn-density: attn-density must be a number in (0, 1], got 0.0"),
    (["--attn-density", "1.5"], "attn-density must be a number in (0, 1]"),
    (["--attn-density", "half"], "argument --attn-density: attn-density 'half' is not a number"),
    (["--models", "opt-65b"], f"model 'opt-65b' is not one of {', '.join(SHAPES)}"),
])
def test_cli_rejects_bad_mlp_options(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_passes_variants_and_attention_density(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "require_cuda", lambda: None)
    monkeypatch.setattr(bench, "run_benchmark", lambda cases, **kw: calls.append((list(cases), kw)))
    assert main(["bench", "--models", "opt-66b", "--batch", "1,16,64", "--context", "1920", "--variants",
                 "inductor-gqa,polar-attn,polar-mlp,polar-both", "--attn-density", "0.25"]) == 0
    cases, kwargs = calls.pop()
    assert cases == [("opt-66b", 1, 1920), ("opt-66b", 16, 1920), ("opt-66b", 64, 1920)]
    assert kwargs["variants"] == ["inductor-gqa", "polar-attn", "polar-mlp", "polar-both"]
    assert kwargs["attn_density"] == 0.25


def test_layers_that_fit_counts_the_sparse_mlp_state():
    """With the MLP variants, a layer also holds its MLP router and the transposed down projection's copy."""
    free = 12 * 2**30
    dense = layers_that_fit("opt-6.7b", 1, 1024, free)
    sparse = layers_that_fit("opt-6.7b", 1, 1024, free, sparse_mlp=True)
    hidden, ffn, rank = 4096, 16384, 192
    layer = 2 * (12 * hidden**2 + 9 * hidden + 4 * hidden + 2 * ffn) + 2 * 1 * 1024 * hidden * 2  # weights, K/V
    extra = 2 * (ffn * hidden + rank * (hidden + ffn))
    fixed_room = (free - bench.MEMORY_MARGIN) - 2 * (50272 * 4096 + 16386 * 4096 + 2 * 4096)  # embeddings, norm
    assert dense == min(32, fixed_room // layer)
    assert sparse == min(32, fixed_room // (layer + extra)) < dense


# -- the MLP half: routers, densities that run, the baseline's MLP share ---------------------------------------------


def test_case_routers_build_the_k_table_and_rank():
    model = tiny("opt-6.7b", layers=3)  # hidden 64, ffn 128
    bank = bench.case_routers(model, "opt-6.7b")
    assert bank.mlp.rank == 64 and sorted(bank.weights) == bank.mlp.layers == [1, 2]
    assert bank.mlp.topk[1] == (None, 64, 64) and bank.mlp.topk[32] == (None, 128, 128)  # .095 / .517 of 128
    assert bench.case_routers(tiny("llama2-7b"), "llama2-7b").mlp is None


def test_variant_banks_and_run_densities(monkeypatch):
    from polar_compile.bench import variants as v

    model = tiny("opt-6.7b", layers=4)
    bank = bench.case_routers(model, "opt-6.7b")
    assert v.attention_only(bank).mlp is None and v.attention_only(bank).weights is bank.weights
    assert v.mlp_only(bank).weights == {} and v.mlp_only(bank).mlp is bank.mlp
    with pytest.raises(ValueError, match="need a bank with MLP routers"):
        v.mlp_only(v.attention_only(bank))
    # attention: 4 heads of 16 at 0.5 keep 2; K+V bf16 saved per layer = 2 * B * L * 16 * 2 * 2 bytes
    assert v.attention_density_run(bank, 0.5, 1, 16) == 1.0  # far below 32 MiB: the pass keeps it dense
    assert v.attention_density_run(bank, 0.5, 1, 16, thresholds=False) == pytest.approx((1 + 3 * 0.5) / 4)
    assert v.attention_density_run(bank, 0.5, 64, 2**14) == pytest.approx((1 + 3 * 0.5) / 4)  # 128 MiB saved
    # MLP: with a break-even of 0.3 of ffn the tiny table's k (64 and 128 of 128) stays dense; with 0.6 the B=1
    # row runs
    monkeypatch.setattr(PolarConfig, "mlp_break_even", lambda self, device_type, batch, weight_bytes: 0.3)
    assert v.mlp_table_ks(bank, 64) == [None, 128, 128, 128] and v.mlp_ks_run(bank, 64) == [None] * 4
    assert v.mlp_table_ks(bank, 1) == [None, 64, 64, 64] and v.mlp_ks_run(bank, 1) == [None] * 4
    monkeypatch.setattr(PolarConfig, "mlp_break_even", lambda self, device_type, batch, weight_bytes: 0.6)
    assert v.mlp_ks_run(bank, 1) == [None, 64, 64, 64] and v.mlp_ks_run(bank, 64) == [None] * 4
    assert v.mlp_density([None, 64, 64, 64], 128) == pytest.approx((1 + 3 * 0.5) / 4)
    assert v.mlp_ks_run(v.attention_only(bank), 1) == [None] * 4


def test_compile_variant_attaches_what_each_mlp_variant_routes(monkeypatch):
    from polar_compile.bench import variants as v

    attached = []
    monkeypatch.setattr(v, "attach", lambda model, bank, **kw: attached.append((bank, kw)))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: ("compiled", kw["backend"]))
    model = tiny("opt-6.7b", layers=3)
    bank = bench.case_routers(model, "opt-6.7b")
    for variant in ("polar-attn", "polar-mlp", "polar-both", "polar-0.5"):
        assert compile_variant(model, variant, bank, attn_density=0.3) == ("compiled", "polar")
    (attn, kw_attn), (mlp, kw_mlp), (both, kw_both), (half, kw_half) = attached
    assert attn.mlp is None and attn.weights is bank.weights and kw_attn == {"density": 0.3}
    assert mlp.weights == {} and mlp.mlp is bank.mlp and kw_mlp == {}
    assert both is bank and kw_both == {"density": 0.3}
    assert half.mlp is None and kw_half == {"density": 0.5, "min_saved_mib": None}  # attention only, as before


def test_mlp_gemm_fraction_is_the_mlp_share_of_linear_weights():
    model = tiny("opt-6.7b", layers=3)  # hidden 64, ffn 128, vocab 128
    hidden, ffn, vocab = 64, 128, 128
    mlp = 3 * 2 * hidden * ffn
    assert bench.mlp_gemm_fraction(model) == pytest.approx(mlp / (3 * 4 * hidden**2 + mlp + vocab * hidden))


# -- the MLP half: ideals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attn_share", "mlp_share"), [(0.0, 0.0), (0.1, 0.7), (0.5, 0.3), (0.3, 0.0), (0.0, 0.9)])
@pytest.mark.parametrize(("d_attn", "d_mlp"), [(0.3, 0.1), (0.5, 0.6), (1.0, 1.0)])
def test_amdahl_with_both_halves(attn_share, mlp_share, d_attn, d_mlp):
    """Independent form: fractions p_a, p_m of the step run at d_a, d_m of their time, the rest unchanged."""
    step = 0.021
    expected = 1 / ((1 - attn_share - mlp_share) + attn_share * d_attn + mlp_share * d_mlp)
    got = bench.amdahl(step, [(attn_share * step, d_attn), (mlp_share * step, d_mlp)])
    assert got == pytest.approx(expected, rel=1e-12)
    assert bench.amdahl(step, [(attn_share * step, d_attn)]) == pytest.approx(
        bench.ideal_speedup(step, attn_share * step, d_attn), rel=1e-12)  # one part: the attention-only formula


def test_amdahl_caps_the_saving_at_the_step():
    assert bench.amdahl(1.0, [(0.8, 0.0), (0.5, 0.0)]) == float("inf")
    assert bench.amdahl(1.0, []) == 1.0


def mlp_row(**times: float) -> dict:
    """An OPT-66B-like row with the MLP variants: T = 20 ms, T_attn = 4 ms, T_mlp = 12 ms."""
    row = {"model": "opt-66b", "layers": 20, "batch": 16, "context": 1920,
           "variants": ["inductor-gqa", "polar-attn", "polar-mlp", "polar-both"],
           "attn-density": 0.3, "mlp-rank": 384, "d-attn-table": 0.335, "d-attn-run": 0.335,
           "d-mlp-table": 0.3, "d-mlp-run": 0.3, "mlp-router": 0.0005}
    for variant, seconds in zip(row["variants"], (0.020, 0.018, 0.012, 0.010), strict=True):
        row[variant] = times.get(variant, seconds)
        row[f"{variant}-synced"] = row[variant] + 0.001
        row[f"{variant}-first-call"] = 30.0 + len(variant)
    row["inductor-gqa-gpu"] = dict(zip(KERNEL_CATEGORIES, (0.004, 0.015, 0.0, 0.0, 0.001), strict=True))
    row = add_ideals(row, attn_seconds=0.004, routed_share=19 / 20)
    return bench.add_mlp_ideals(row, attn_seconds=0.004, mlp_seconds=0.012)


def test_add_mlp_ideals():
    row = mlp_row()
    assert row["ideal-polar-attn"] == pytest.approx(20 / (20 - 0.665 * 4))
    assert row["ideal-polar-mlp"] == pytest.approx(20 / (20 - 0.7 * 12))
    assert row["ideal-polar-both"] == pytest.approx(20 / (20 - 0.665 * 4 - 0.7 * 12))
    assert row["ideal-polar-both-table"] == row["ideal-polar-both"]  # nothing kept dense by the thresholds
    row["d-mlp-run"] = 1.0  # the break-even keeps every MLP dense: no MLP saving in the ideal
    assert bench.add_mlp_ideals(row, 0.004, 0.012)["ideal-polar-both"] == pytest.approx(row["ideal-polar-attn"])
    assert row["ideal-polar-both-table"] > row["ideal-polar-both"]


def test_mlp_table_has_the_new_columns():
    rows = [mlp_row(), synthetic_row()]  # the attention-only row has no MLP line
    table = bench.mlp_markdown(rows)
    lines = table.splitlines()
    assert len(lines) == 3
    for column in ("MLP rank", "attn vs (3) / ideal / %", "mlp vs (3) / ideal / %", "both vs (3) / ideal / %",
                   "MLP router ms (share of both)", "compile s (3) / attn / mlp / both", "T_attn / T_mlp of (3) ms"):
        assert column in lines[0]
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert len(cells) == lines[0].count("|") - 1
    both_ideal = 20 / (20 - 0.665 * 4 - 0.7 * 12)
    assert cells[:10] == ["opt-66b (20 layers)", "16", "1920", "0.3 (0.335 / 0.335)", "0.300 / 0.300", "384",
                          "20.000", "18.000", "12.000", "10.000"]
    assert cells[12] == f"2.00x / {both_ideal:.2f}x / {100 * 2 / both_ideal:.0f}%"
    assert cells[14:] == ["4.000 / 12.000", "0.500 (5.0%)", "42 / 40 / 39 / 40"]
    assert bench.markdown(rows).count("\n") == 2  # the attention table lists only the row that ran polar 0.5
    assert bench.tables(rows) == "\n\n".join((bench.markdown(rows), table, breakdown_markdown(rows)))
    assert bench.mlp_markdown([synthetic_row()]) == ""


def test_mlp_table_marks_variants_that_did_not_run(tmp_path):
    row = mlp_row()
    for key in [k for k in row if k.startswith("polar-mlp")]:
        del row[key]
    cells = [c.strip() for c in bench.mlp_markdown([row]).splitlines()[2].split("|")[1:-1]]
    assert cells[8] == "—" and cells[11] == "—" and cells[-1] == "42 / 40 / — / 40"
    write_results([row], tmp_path)
    plot([row, synthetic_row(model="opt-66b")], tmp_path / "decode.png")  # both kinds of line in one panel
    assert (tmp_path / "decode.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("kernel", "category"), [
    ("_gather_up_kernel", "mlp"),
    ("_gather_down_kernel", "mlp"),
    ("_finish_kernel", "mlp"),
    ("_scores_kernel", "router"),
    ("_histogram_kernel", "router"),
    ("_boundary_kernel", "router"),
    ("_write_kernel", "router"),
    ("void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<at_cuda_detail::cub::DeviceRadixSortPolicy<float, "
     "long, unsigned int>::Policy900, false, true, float, long, unsigned int, int, int>", "router"),
    ("void at::native::bitonicSortKVInPlace<2, -1, 16, 16, long, long, at::native::LTOp<long, true>, unsigned int>",
     "router"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
     "at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, "
     "unsigned int, float, 4, 4> >(at::native::ReduceOp<float, ...>)", "router"),
    ("triton_red_fused_sum_sort_0", "other"),
])
def test_mlp_kernel_categories(kernel, category):
    assert kernel_category(kernel) == category


def test_categorised_kernel_names_are_our_kernels():
    """A renamed kernel would silently fall into ``other``: every name the categories list is a Triton kernel."""
    from triton.runtime.jit import KernelInterface  # of jitted and (TRITON_INTERPRET=1) interpreted functions

    from polar_compile.bench.profile import MLP_KERNELS, ROUTER_KERNELS
    from polar_compile.kernels import gather_gemm, mlp_route, route

    defined = {name for module in (gather_gemm, mlp_route, route) for name, value in vars(module).items()
               if isinstance(value, KernelInterface)}
    assert set(MLP_KERNELS + ROUTER_KERNELS) <= defined


def test_run_case_row_on_the_cpu(monkeypatch):
    """run_case's bookkeeping for an OPT shape with the MLP variants: which variants run (the baseline always), the
    densities, the ideals from the baseline's breakdown; timing, profiling and compiling replaced."""
    from polar_compile.bench import run

    times = {"inductor-gqa": 0.020, "polar-attn": 0.018, "polar-mlp": 0.012, "polar-both": 0.010}
    compiled = []

    def fake_compile(model, variant, bank, density):
        compiled.append((variant, density))
        return lambda **inputs: times[variant]

    def tiny_opt(layers: int):
        config = SHAPES["opt-6.7b"](layers)
        config.update(dict(hidden_size=64, num_attention_heads=4, vocab_size=128, ffn_dim=128, word_embed_proj_dim=64))
        return config

    monkeypatch.setattr(run, "SHAPES", {"opt-6.7b": tiny_opt})
    monkeypatch.setattr(run, "layers_that_fit", lambda *args, **kw: 4)
    monkeypatch.setattr(run, "compile_variant", fake_compile)
    monkeypatch.setattr(DecodeStep, "time", lambda self, fn, repeats: (fn(), fn() + 0.001, 9.0))
    monkeypatch.setattr(run, "kernel_breakdown", lambda step, fn: dict(
        zip(KERNEL_CATEGORIES, (0.004, 0.015, 0.0, 0.0, 0.001), strict=True)))
    monkeypatch.setattr(run, "mlp_router_seconds", lambda routers, batch: 1e-4 * len(routers))
    # a tiny MLP's k (64 of 128) is past a small MLP's real break-even: route it anyway, to see the bookkeeping
    monkeypatch.setattr(PolarConfig, "mlp_break_even", lambda self, device_type, batch, weight_bytes: 0.6)
    row = run.run_case("opt-6.7b", 1, 16, repeats=3, variants=["polar-both", "polar-mlp", "polar-attn"],
                       attn_density=0.25, device="cpu")
    assert [v for v, _ in compiled] == ["inductor-gqa", "polar-attn", "polar-mlp", "polar-both"]  # baseline added
    assert {d for _, d in compiled} == {0.25}
    assert row["variants"] == [v for v, _ in compiled] and row["layers"] == 4 and row["mlp-rank"] == 64
    assert row["mlp-k-run"] == [None, 64, 64, 64] and row["mlp-router"] == pytest.approx(3e-4)
    assert row["d-mlp-run"] == row["d-mlp-table"] == pytest.approx((1 + 3 * 0.5) / 4)
    assert row["d-attn-table"] == pytest.approx((1 + 3 * 0.25) / 4) and row["d-attn-run"] == 1.0  # too little saved
    # all four layers' MLPs (layer 0's too) over all Linear weights: attention, MLPs, LM head
    assert row["mlp-gemm-fraction"] == pytest.approx((4 * 2 * 64 * 128) / (4 * 4 * 64**2 + 4 * 2 * 64 * 128 + 128 * 64))
    t_mlp = 0.015 * row["mlp-gemm-fraction"]
    assert row["ideal-polar-mlp"] == pytest.approx(0.020 / (0.020 - (1 - row["d-mlp-run"]) * t_mlp))
    assert row["ideal-polar-attn"] == 1.0
    assert "router-share" not in row  # polar 0.5 did not run
    assert bench.mlp_markdown([row]).count("\n") == 2 and bench.markdown([row]) == ""

"""`polar-compile bench` on the CPU: option parsing, the ideal (Amdahl) speedup, the writers, the model shapes, the
decode-step setup and the no-CUDA error. Nothing here times anything or compiles."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from polar_compile import bench
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
    ("gpt2:1:128", "case 'gpt2:1:128': model 'gpt2' is not one of llama2-7b, llama3-8b, opt-6.7b"),
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
    assert cases == grid(list(SHAPES), [1, 16, 64, 128], [1024, 4096, 8192])
    assert kwargs["max_layers"] is None and kwargs["repeats"] == 30 and str(kwargs["out"]) == "out"  # all layers
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
    rows = [with_breakdown(synthetic_row(), (0.008, 0.0015, 0.0, 0.0005), (0.0042, 0.0015, 0.0001, 0.00051)),
            synthetic_row(batch=64)]  # measured before the breakdown existed
    lines = breakdown_markdown(rows).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 12
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == [
        "llama3-8b (4 layers)", "16", "1024", "8.000", "1.500", "0.000", "0.500", "4.200", "1.500", "0.100", "0.510"]
    assert breakdown_markdown(rows[1:]) == ""
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
    ("opt-6.7b", 6_658_473_984 + (16384 - 2048) * 4096),  # OPT-6.7B's, positions widened from 2048 to 16384
])
def test_shapes_are_the_real_models(name, params):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(SHAPES[name](32))
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
    kv = 4 * getattr(config, "num_key_value_heads", 32) // 32
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

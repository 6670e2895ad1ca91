"""Decode attention on one GPU: cuDNN / flash / default SDPA (dense, GQA-native) against polar's selective kernel.

    python benchmarks/attention.py --out OUT_DIR [--check] [--sweep] [--table] [--one KIND,B,L,DENSITY]

--check  the Triton kernel against a float64 reference on the GPU (dtypes incl. fp32, GQA ratios, head dims, masks,
         both launch paths, a poisoned output) and through torch.compile(mode="reduce-overhead").
--sweep  polar at density 0.5 over launch configurations (splits, BLOCK_N, warps, stages) for a few shapes.
--table  the comparison: B in {1, 16, 64, 128}, L in {1024, 4096, 8192}, MHA 32/32 and GQA 32/8, D=128, bf16,
         polar at densities 1.0, 0.75, 0.5, 0.25 (all keys attended). Writes attention.json and attention.md.

Timing: every method runs inside one CUDA graph that calls it once per input set (sets rotate so that the K/V
read per replay is >= 256 MB, well past the 60 MB L2), replays are timed with triton.testing.do_bench (median,
L2 flushed before each replay) and divided by the number of sets. Inputs are fresh N(0, 1) values, never zeros.
TB/s counts the K/V bytes the method reads: all of them for dense SDPA, the selected groups' for polar.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from polar_compile.kernels.select_attention import (
    SelectAttentionConfig,
    select_attention_config,
    select_attention_triton,
)

DENSITIES = (1.0, 0.75, 0.5, 0.25)
KINDS = {"MHA 32/32": (32, 32), "GQA 32/8": (32, 8)}
ROTATE_BYTES = 256 * 2**20


def reference(query, key, value, units, attn_mask, scale):
    """Float64 selective decode attention (the op's semantics, written out again, independent of the kernel)."""
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    q = query.double().reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = q @ key.double().transpose(-1, -2) * scale  # [B, Hkv, R, L]
    if attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, -math.inf)
    else:
        scores = scores + attn_mask.double()
    out = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ value.double()
    keep = torch.zeros(batch, kv_heads, dtype=torch.bool, device=query.device).scatter(1, units.long(), True)
    return (out * keep[:, :, None, None]).reshape(batch, heads, 1, head_dim)


def random_units(batch, kv_heads, num_units, device):
    return torch.stack([torch.randperm(kv_heads, device=device)[:num_units] for _ in range(batch)]).int()


def random_mask(kind, batch, kv_len, device):
    pos = torch.arange(kv_len, device=device)
    if kind == "full":
        mask = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    elif kind == "ragged":
        mask = pos < torch.randint(1, kv_len + 1, (batch, 1), device=device)
    elif kind == "left_padding":
        pad = torch.randint(0, kv_len // 2, (batch, 1), device=device)
        mask = (pos >= pad) & (pos < pad + torch.randint(1, kv_len // 2, (batch, 1), device=device))
    elif kind == "all_but_one":
        mask = pos == torch.randint(0, kv_len, (batch, 1), device=device)
    else:
        mask = torch.rand(batch, kv_len, device=device) < 0.5
        mask[0] = False  # a sequence that attends to nothing: zeros, not NaN
    return mask[:, None, None, :]


def check(log):
    """The kernel on the GPU against the float64 reference; raises on the first mismatch."""
    dev = "cuda"
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cases = [  # dtype, B, H, Hkv, L, D, k, mask kind, additive mask
        (bf16, 4, 32, 32, 1000, 128, 16, "ragged", False),
        (bf16, 3, 32, 8, 4096, 128, 4, "left_padding", True),
        (fp16, 2, 28, 4, 777, 128, 2, "random", False),
        (fp32, 2, 32, 8, 2048, 128, 3, "full", False),
        (fp32, 2, 16, 16, 513, 64, 5, "all_but_one", True),
        (bf16, 2, 16, 4, 1500, 80, 2, "ragged", True),
        (fp16, 2, 16, 2, 3000, 96, 1, "left_padding", False),
        (bf16, 2, 8, 2, 2000, 256, 2, "random", True),
        (fp32, 1, 8, 1, 9000, 256, 1, "full", False),
        (bf16, 64, 32, 8, 4096, 128, 4, "full", False),
    ]
    tolerance = {bf16: 2e-2, fp16: 2e-3, fp32: 1e-5}
    for dtype, batch, heads, kv_heads, kv_len, head_dim, k, mask_kind, additive in cases:
        query = torch.randn(batch, heads, 1, head_dim, device=dev, dtype=dtype)
        key = torch.randn(batch, kv_heads, kv_len, head_dim, device=dev, dtype=dtype)
        value = torch.randn(batch, kv_heads, kv_len, head_dim, device=dev, dtype=dtype)
        units = random_units(batch, kv_heads, k, dev)
        mask = random_mask(mask_kind, batch, kv_len, dev)
        if additive:
            mask = torch.zeros(mask.shape, device=dev, dtype=dtype).masked_fill(~mask, -math.inf)
        scale = head_dim**-0.5
        expected = reference(query, key, value, units, mask, scale)
        default = select_attention_config(batch, k, kv_len, head_dim, dtype, query.device)
        for config in (None, default._replace(num_splits=1), default._replace(num_splits=4)):
            out = torch.full_like(query, math.nan)
            select_attention_triton(query, key, value, units, mask, scale, config=config, out=out)
            err = ((out.double() - expected).norm() / expected.norm()).item()
            ok = not out.isnan().any() and err < tolerance[dtype]
            log(f"check {dtype} B={batch} H={heads}/{kv_heads} L={kv_len} D={head_dim} k={k} {mask_kind}"
                f"{' additive' if additive else ''} config={config or default}: rel err {err:.2e}")
            if not ok:
                raise AssertionError(f"mismatch: rel err {err:.3g} (NaN: {bool(out.isnan().any())})")

    import polar_compile.ops  # noqa: F401  (registers polar::select_attention)

    query = torch.randn(8, 32, 1, 128, device=dev, dtype=bf16)
    key, value = (torch.randn(8, 8, 2048, 128, device=dev, dtype=bf16) for _ in range(2))
    units, mask = random_units(8, 8, 4, dev), random_mask("ragged", 8, 2048, dev)
    step = torch.compile(torch.ops.polar.select_attention, mode="reduce-overhead", fullgraph=True)
    try:
        for _ in range(3):
            got = step(query, key, value, units, mask, 0.125)
    except Exception as error:
        log(f"CHECK FAILED torch.compile(reduce-overhead) of polar::select_attention: {str(error)[-2000:]}")
        return
    err = ((got.double() - reference(query, key, value, units, mask, 0.125)).norm() / got.double().norm()).item()
    log(f"check torch.compile(reduce-overhead) of polar::select_attention: rel err {err:.2e}")
    assert err < 2e-2


def time_ms(calls, rep=100):
    """Median ms per call of `calls` (one per rotated input set), all captured in one CUDA graph."""
    for call in calls:
        call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    ms = triton.testing.do_bench(graph.replay, warmup=rep // 4, rep=rep, return_mode="median")
    del graph
    return ms / len(calls)


def make_inputs(batch, heads, kv_heads, kv_len, head_dim=128, dtype=torch.bfloat16):
    kv_bytes = 2 * batch * kv_heads * kv_len * head_dim * 2
    sets = max(1, min(32, math.ceil(ROTATE_BYTES / kv_bytes)))
    return [
        dict(
            query=torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=dtype),
            key=torch.randn(batch, kv_heads, kv_len, head_dim, device="cuda", dtype=dtype),
            value=torch.randn(batch, kv_heads, kv_len, head_dim, device="cuda", dtype=dtype),
            mask=torch.ones(batch, 1, 1, kv_len, device="cuda", dtype=torch.bool),
        )
        for _ in range(sets)
    ]


def dense_calls(inputs, backend):
    gqa = inputs[0]["query"].shape[1] != inputs[0]["key"].shape[1]

    def call(x):
        if backend is None:
            return F.scaled_dot_product_attention(x["query"], x["key"], x["value"], enable_gqa=gqa)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(x["query"], x["key"], x["value"], enable_gqa=gqa)

    return [lambda x=x: call(x) for x in inputs]


def polar_calls(inputs, density, config=None):
    batch, kv_heads = inputs[0]["key"].shape[:2]
    k = max(1, round(density * kv_heads))
    scale = inputs[0]["query"].shape[-1] ** -0.5
    for x in inputs:
        x["units"] = random_units(batch, kv_heads, k, "cuda")
    return k, [
        lambda x=x: select_attention_triton(
            x["query"], x["key"], x["value"], x["units"], x["mask"], scale, config=config
        )
        for x in inputs
    ]


def sweep(log):
    """Polar at density 0.5 around the heuristic's choice: splits x1/2, x1, x2 and a few block configurations."""
    shapes = [("MHA 32/32", 16, 8192), ("MHA 32/32", 64, 4096), ("MHA 32/32", 128, 8192),
              ("GQA 32/8", 16, 8192), ("GQA 32/8", 64, 4096), ("GQA 32/8", 128, 8192)]
    blocks = ((64, 4, 3), (32, 4, 3), (64, 4, 2), (128, 4, 2), (32, 4, 4), (64, 8, 3))
    results = []
    for kind, batch, kv_len in shapes:
        heads, kv_heads = KINDS[kind]
        inputs = make_inputs(batch, heads, kv_heads, kv_len)
        cudnn = time_ms(dense_calls(inputs, SDPBackend.CUDNN_ATTENTION))
        default = select_attention_config(batch, kv_heads // 2, kv_len, 128, torch.bfloat16, torch.device("cuda"))
        for splits in sorted({max(1, default.num_splits // 2), default.num_splits, 2 * default.num_splits}):
            for block_n, warps, stages in blocks:
                config = SelectAttentionConfig(splits, block_n, warps, stages)
                _, calls = polar_calls(inputs, 0.5, config)
                ms = time_ms(calls)
                results.append(dict(kind=kind, B=batch, L=kv_len, config=list(config), ms=ms, cudnn_ms=cudnn))
                log(f"sweep {kind} B={batch} L={kv_len} {config}: {ms * 1e3:.1f} us = {ms / cudnn:.3f} x cuDNN")
        best = min((r for r in results if r["kind"] == kind and r["B"] == batch), key=lambda r: r["ms"])
        log(f"BEST {kind} B={batch} L={kv_len}: {best['config']} {best['ms'] / cudnn:.3f} x cuDNN; default {default}")
        del inputs
    return results


def table(log):
    rows = []
    for kind, (heads, kv_heads) in KINDS.items():
        for batch in (1, 16, 64, 128):
            for kv_len in (1024, 4096, 8192):
                inputs = make_inputs(batch, heads, kv_heads, kv_len)
                dense_bytes = 2 * batch * kv_heads * kv_len * 128 * 2
                row = dict(kind=kind, B=batch, L=kv_len, sets=len(inputs))
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                                      ("default", None)):
                    try:
                        row[name] = dict(ms=time_ms(dense_calls(inputs, backend)), bytes=dense_bytes)
                    except RuntimeError as error:  # a backend that rejects the shape
                        row[name] = dict(ms=None, error=str(error).splitlines()[0])
                for density in DENSITIES:
                    k, calls = polar_calls(inputs, density)
                    row[f"polar {density}"] = dict(ms=time_ms(calls), bytes=dense_bytes * k // kv_heads, k=k)
                    x = inputs[0]  # spot-check the last sequence (largest offsets) against float64
                    got = calls[0]()[-1:]
                    want = reference(x["query"][-1:], x["key"][-1:], x["value"][-1:], x["units"][-1:],
                                     x["mask"][-1:], 128**-0.5)
                    assert ((got.double() - want).norm() / want.norm()).item() < 2e-2, (kind, batch, kv_len, density)
                rows.append(row)
                log(format_row(row))
                del inputs
                torch.cuda.empty_cache()
    return rows


def masked_rows(log):
    """Mask-aware reads: a static cache of L=8192 filled to ~1/4 (ragged), dense polar against a full cache."""
    rows = []
    for kind, (heads, kv_heads) in KINDS.items():
        inputs = make_inputs(64, heads, kv_heads, 8192)
        _, calls = polar_calls(inputs, 1.0)
        full = time_ms(calls)
        for x in inputs:
            x["mask"] = torch.arange(8192, device="cuda") < torch.randint(1024, 3072, (64, 1, 1, 1), device="cuda")
        filled = sum(x["mask"].float().mean().item() for x in inputs) / len(inputs)
        part = time_ms(calls)
        rows.append(dict(kind=kind, B=64, L=8192, filled=filled, full_ms=full, part_ms=part))
        log(f"mask-aware {kind} B=64 L=8192 polar 1.0: full cache {full * 1e3:.1f} us, "
            f"{filled:.0%} filled {part * 1e3:.1f} us ({part / full:.2f}x)")
        del inputs
    return rows


def format_row(row):
    cudnn = row["cudnn"]["ms"]
    cells = [row["kind"], str(row["B"]), str(row["L"])]
    for name in ("cudnn", "flash", "default", *(f"polar {d}" for d in DENSITIES)):
        ms = row[name]["ms"]
        if ms is None:
            cells.append("n/a")
            continue
        tbps = row[name]["bytes"] / ms / 1e9
        cells.append(f"{ms * 1e3:.1f} us {tbps:.2f} TB/s" + (f" {ms / cudnn:.2f}x" if name != "cudnn" else ""))
    return "| " + " | ".join(cells) + " |"


def markdown(rows, header):
    names = ["cuDNN", "flash", "default", *(f"polar {d}" for d in DENSITIES)]
    lines = [header, "", "| kind | B | L | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    return "\n".join(lines + [format_row(row) for row in rows]) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for attention.json / attention.md")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--one", metavar="KIND,B,L,DENSITY", help="run polar on one case a few times (for ncu)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    def log(line):
        print(line, flush=True)
        with open(os.path.join(args.out, "attention.log"), "a") as f:
            f.write(line + "\n")

    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv))
    log(json.dumps(env))
    result = dict(env=env)
    if args.one:
        kind, batch, kv_len, density = args.one.split(",")
        heads, kv_heads = KINDS["MHA 32/32" if kind == "MHA" else "GQA 32/8"]
        _, calls = polar_calls(make_inputs(int(batch), heads, kv_heads, int(kv_len))[:1], float(density))
        for _ in range(3):
            calls[0]()
        torch.cuda.synchronize()
        return
    if args.check:
        check(log)
    if args.table:
        result["table"] = table(log)
        result["masked"] = masked_rows(log)
        header = (f"{env['device']}, torch {env['torch']}, triton {env['triton']}, bf16, D=128, {env['date']}; "
                  "time per call (CUDA graph replay, median), TB/s on K/V bytes read, ratio to cuDNN dense.")
        with open(os.path.join(args.out, "attention.md"), "w") as f:
            f.write(markdown(result["table"], header))
        with open(os.path.join(args.out, "attention.json"), "w") as f:
            json.dump(result, f, indent=1)
    if args.sweep:
        result["sweep"] = sweep(log)
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

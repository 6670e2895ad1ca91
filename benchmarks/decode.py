"""Steady-state batched decode, side by side in one process: eager HF, dense Inductor, dense Inductor with
GQA-native SDPA, and polar at densities 1.0 and 0.5 (all ``mode="reduce-overhead"``, CUDA graphs).

    python benchmarks/decode.py --models llama2-7b,llama3-8b,opt-6.7b --batch 1,16,64,128 \
        --context 1024,4096,8192 --layers 8 --out out/

Random bf16 weights and random routers: speed does not depend on which heads are chosen. The cache of length L
is filled with random K/V and every step attends to all L positions (the write counter is reset before each
step, outside the timed region). The ideal polar speedup is Amdahl's, T / (T - (1 - d) * T_attn), with T the
GQA-native dense step and T_attn its attention time (cuDNN SDPA of one layer's shape, times the layers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, OPTConfig, StaticCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import polar_compile
from polar_compile.testing import random_routers

SHAPES = {
    "llama2-7b": lambda layers: LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                            num_key_value_heads=32, num_hidden_layers=layers, vocab_size=32000,
                                            max_position_embeddings=16384),
    "llama3-8b": lambda layers: LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                            num_key_value_heads=8, num_hidden_layers=layers, vocab_size=128256,
                                            max_position_embeddings=16384, rope_theta=500000.0),
    "opt-6.7b": lambda layers: OPTConfig(hidden_size=4096, ffn_dim=16384, num_attention_heads=32,
                                         num_hidden_layers=layers, vocab_size=50272, word_embed_proj_dim=4096,
                                         max_position_embeddings=16384),
}
VARIANTS = ("eager", "inductor", "inductor-gqa", "polar-1.0", "polar-0.5")


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """HF attention function: SDPA on the un-repeated cache (``enable_gqa=True``) with HF's decode mask."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("sdpa_gqa", sdpa_gqa_attention)
AttentionMaskInterface.register("sdpa_gqa", sdpa_mask)


class DecodeStep:
    """A model, a StaticCache of length L filled with random K/V, and the inputs of the step at position L-1."""

    def __init__(self, model, batch: int, context: int) -> None:
        self.model, self.batch, self.context = model, batch, context
        self.cache = StaticCache(config=model.config, max_cache_len=context)
        self.inputs = dict(
            input_ids=torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda"),
            past_key_values=self.cache, use_cache=True,
            cache_position=torch.tensor([context - 1], device="cuda"),
            position_ids=torch.full((batch, 1), context - 1, device="cuda"),
            # explicit: without it OPT sizes its own mask from the cache length, a data-dependent size
            attention_mask=torch.ones(batch, context, dtype=torch.long, device="cuda"),
        )
        with torch.no_grad():
            self.reset()
            model(**self.inputs)  # allocates the cache tensors
        for layer in self.cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
            # mark it whether or not this transformers version does: an unmarked counter makes Inductor skip CUDA graphs
            torch._dynamo.mark_static_address(layer.cumulative_length)

    def reset(self) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(self.context - 1)

    def time(self, step, repeats: int) -> tuple[float, float]:
        """(median seconds per step, seconds of the first call: compile + capture for compiled steps)."""
        times = []
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(repeats + 3):
                self.reset()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                step(**self.inputs)
                end.record()
                torch.cuda.synchronize()
                if i == 0:
                    first = time.perf_counter() - start
                if i >= 3:
                    times.append(begin.elapsed_time(end) / 1e3)
        return statistics.median(times), first


def attention_seconds(config, batch: int, context: int, repeats: int) -> float:
    """cuDNN SDPA (GQA-native, HF decode mask) for one layer's decode shape, median seconds."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    dim = config.hidden_size // heads
    q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, kv_heads, context, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(batch, 1, 1, context, device="cuda", dtype=torch.bool)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != heads),
                      return_mode="median")
    return ms / 1e3


def run_case(name: str, layers: int, batch: int, context: int, repeats: int) -> dict:
    config = SHAPES[name](layers)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    step = DecodeStep(model, batch, context)
    bank = random_routers(model, seed=0)
    row = {"model": name, "layers": layers, "batch": batch, "context": context}
    for variant in VARIANTS:
        torch._dynamo.reset()
        model.set_attn_implementation("sdpa_gqa" if variant == "inductor-gqa" else "sdpa")
        if variant == "eager":
            fn = model.forward
        elif variant.startswith("polar"):
            polar_compile.attach(model, bank, density=float(variant.split("-")[1]))
            fn = torch.compile(model.forward, backend="polar", mode="reduce-overhead", fullgraph=True)
        else:
            fn = torch.compile(model.forward, backend="inductor", mode="reduce-overhead", fullgraph=True)
        seconds, first = step.time(fn, repeats)
        row[variant] = seconds
        row[f"{variant}-first-call"] = first
        print(f"  {name} B={batch} L={context} {variant:>13}: {seconds * 1e3:8.3f} ms/step  first call {first:6.1f} s",
              flush=True)
    torch._dynamo.reset()
    routed = len(bank.layers) / layers  # layer 0 stays dense by design
    del model, step, fn
    torch.cuda.empty_cache()  # the attention timing below needs the memory the model's cache held
    t_attn = layers * attention_seconds(config, batch, context, repeats)
    base = row["inductor-gqa"]
    row["attention-share"] = t_attn / base
    row["ideal-0.5"] = base / (base - 0.5 * min(t_attn, base))
    row["ideal-0.5-layer0-dense"] = base / (base - 0.5 * routed * min(t_attn, base))
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| model | B | L | eager | inductor (2) | inductor GQA-native (3) | polar 1.0 | polar 0.5 | "
            "0.5 vs (3) | ideal | % of ideal | ideal, layer 0 dense | % of it | 0.5 vs (2) | 1.0 vs (3) | "
            "attn share of (3) | compile polar/dense |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms = {v: r[v] * 1e3 for v in VARIANTS}
        speed3 = r["inductor-gqa"] / r["polar-0.5"]
        lines.append(
            f"| {r['model']} ({r['layers']} layers) | {r['batch']} | {r['context']} | {ms['eager']:.3f} | "
            f"{ms['inductor']:.3f} | {ms['inductor-gqa']:.3f} | {ms['polar-1.0']:.3f} | {ms['polar-0.5']:.3f} | "
            f"{speed3:.2f}x | {r['ideal-0.5']:.2f}x | {100 * speed3 / r['ideal-0.5']:.0f}% | "
            f"{r['ideal-0.5-layer0-dense']:.2f}x | {100 * speed3 / r['ideal-0.5-layer0-dense']:.0f}% | "
            f"{r['inductor'] / r['polar-0.5']:.2f}x | {r['polar-1.0'] / r['inductor-gqa']:.3f} | "
            f"{r['attention-share']:.0%} | {r['polar-0.5-first-call'] / r['inductor-first-call']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Speedup of polar 0.5 over dense Inductor (2) against batch size, one line per context, one panel a model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        for context in sorted({r["context"] for r in rows if r["model"] == name}):
            points = sorted((r["batch"], r["inductor"] / r["polar-0.5"]) for r in rows
                            if r["model"] == name and r["context"] == context)
            ax.plot(*zip(*points, strict=True), marker="o", label=f"L={context}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="batch size", ylabel="speedup over dense Inductor", title=name)
        ax.legend()
    fig.suptitle("polar (density 0.5) decode step vs dense Inductor, H200, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama2-7b,llama3-8b,opt-6.7b")
    parser.add_argument("--batch", default="1,16,64,128")
    parser.add_argument("--context", default="1024,4096,8192")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cases", help="MODEL:BATCH:CONTEXT,... instead of the models x batch x context grid")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cases:
        cases = [(m, int(b), int(c)) for m, b, c in (case.split(":") for case in args.cases.split(","))]
    else:
        cases = [(m, int(b), int(c)) for m in args.models.split(",") for c in args.context.split(",")
                 for b in args.batch.split(",")]
    rows = []
    for name, batch, context in cases:
        rows.append(run_case(name, args.layers, batch, context, args.repeats))
        (args.out / "decode.json").write_text(json.dumps(rows, indent=1))
        (args.out / "decode.md").write_text(markdown(rows) + "\n")
    plot(rows, args.out / "decode.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()

"""Batched greedy decoding of an HF model with a StaticCache: dense Inductor vs ``backend="polar"``.

    python examples/demo.py                          # CPU: a small random Llama; GPU: see below
    python examples/demo.py --model PATH_OR_HUB_ID   # any local folder or hub id of a supported decoder
    python examples/demo.py --model PATH --routers DIR

Prints the attention sites the backend rewrote (``polar_compile.explain``), the time per decode step of both, and
how often they agree on the next token. Without ``--routers`` the routers are random: fine for speed, meaningless
for accuracy.

On a GPU the default is 4 layers of Llama-2-7B's shape (32 heads, head_dim 128), batch 64 and a 4096-token cache,
in bf16: a decode site is routed only where routing skips more than ``min_saved_mib`` (32 MiB on CUDA) of K/V
reads per step, and there each routed layer skips 2 GiB at density 0.5. Small batches or contexts stay dense on
a GPU, by design. On a CPU the polar ops are plain-PyTorch reference implementations: the demo shows that the
rewrite runs and how the tokens agree, not speed.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
import warnings

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, StaticCache

import polar_compile
from polar_compile.testing import random_routers

SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=1024)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096)
# per device: (model, batch, context = prompt + new tokens)
DEFAULTS = {"cuda": ("llama2-7b", 64, 4096), "cpu": ("small", 8, 96)}


def build_model(args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """The model at ``--model``, or random weights of a built-in shape; and its description."""
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
        return model.to(args.device).eval(), args.model
    torch.manual_seed(0)
    if args.shape == "small":
        config, name = LlamaConfig(**SMALL), "random Llama 6x256, 8 heads / 2 KV heads"
    else:
        config = LlamaConfig(**LLAMA2_7B, num_hidden_layers=args.layers)
        name = f"random Llama-2-7B shape, {args.layers} layers (32 heads, head_dim 128)"
    config._attn_implementation = "sdpa"
    with torch.device(args.device):  # random weights made where they run
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval(), name


def skipped_mib(model: torch.nn.Module, batch: int, context: int, density: float, dtype: torch.dtype) -> float:
    """MiB of K/V reads one routed layer skips per decode step: the quantity ``min_saved_mib`` is compared with."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    units = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kept = max(1, round(density * units))
    return (units - kept) * batch * context * head_dim * 2 * dtype.itemsize / 2**20


def prefill(model: torch.nn.Module, prompt: torch.Tensor, cache: StaticCache) -> torch.Tensor:
    """Run ``prompt`` [B, P] through the eager model into ``cache``; the next greedy token [B, 1]."""
    batch, prompt_len = prompt.shape
    positions = torch.arange(prompt_len, device=prompt.device)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = model(input_ids=prompt, past_key_values=cache, cache_position=positions,
                   position_ids=positions.expand(batch, -1), **last_only).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def greedy_decode(model, step, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[float]]:
    """Prefill eagerly, then ``new_tokens - 1`` greedy steps through ``step``; tokens [B, new_tokens] and the
    seconds of each step."""
    batch, prompt_len = prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
    token = prefill(model, prompt, cache)
    tokens, seconds = [token], []
    for position in range(prompt_len, prompt_len + new_tokens - 1):
        cache_position = torch.tensor([position], device=prompt.device)
        start = time.perf_counter()
        logits = step(input_ids=token, past_key_values=cache, cache_position=cache_position,
                      position_ids=cache_position.expand(batch, 1)).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        if prompt.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        tokens.append(token)
    return torch.cat(tokens, dim=1), seconds


def explain_decode(model: torch.nn.Module, batch: int, context: int, device: str) -> polar_compile.ExplainReport:
    """``polar_compile.explain`` of one decode step at this batch and cache length (the sizes decide routing)."""
    cache = StaticCache(config=model.config, max_cache_len=context)
    first = torch.ones(batch, 1, dtype=torch.long, device=device)
    prefill(model, first, cache)  # one token, so the cache exists; its contents do not change what is routed
    position = torch.tensor([1], device=device)
    return polar_compile.explain(model, input_ids=first, past_key_values=cache, cache_position=position,
                                 position_ids=position.expand(batch, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local path or hub id (default: random weights of --shape)")
    parser.add_argument("--shape", choices=("small", "llama2-7b"),
                        help="built-in random model (default: llama2-7b on CUDA, small elsewhere)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the llama2-7b shape (default 4)")
    parser.add_argument("--routers", help="a RouterBank directory (default: random routers)")
    parser.add_argument("--density", type=float, default=0.5, help="fraction of heads / KV groups kept")
    parser.add_argument("--batch", type=int, help="sequences (default: 64 on CUDA, 8 elsewhere)")
    parser.add_argument("--context", type=int,
                        help="cache length = prompt + new tokens (default: 4096 on CUDA, 96 elsewhere)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    # newer transformers rename `past_key_values` to `cache`; the old name still works, and older versions need it
    warnings.filterwarnings("ignore", message=".*`past_key_values` is deprecated", category=FutureWarning)
    shape, batch, context = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    args.shape, args.batch, args.context = args.shape or shape, args.batch or batch, args.context or context
    if not 0 < args.new_tokens < args.context:
        parser.error(f"--new-tokens must be in 1..{args.context - 1} (the prompt fills the rest of --context)")
    on_cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if on_cuda else torch.float32

    model, description = build_model(args, dtype)
    routers = polar_compile.RouterBank.load(args.routers) if args.routers else random_routers(model)
    vocab = model.config.get_text_config().vocab_size
    prompt_len = args.context - args.new_tokens
    prompt = torch.randint(1, vocab, (args.batch, prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(args.device)
    print(f"model: {description}\nbatch {args.batch}  context {args.context} (prompt {prompt_len} + "
          f"{args.new_tokens} new tokens)  density {args.density}  {args.device} {dtype}\n")

    mode = "reduce-overhead" if on_cuda else None  # CUDA graphs
    results = {}
    with torch.no_grad():
        for name in ("inductor", "polar"):
            if name == "polar":  # dense Inductor runs the model as it ships, without routers
                polar_compile.attach(model, routers, density=args.density)
            start = time.perf_counter()
            step = torch.compile(model.forward, backend=name, mode=mode, fullgraph=True)
            tokens, seconds = greedy_decode(model, step, prompt, args.new_tokens)
            results[name] = (tokens, statistics.median(seconds[2:]), time.perf_counter() - start)
        report = explain_decode(model, args.batch, args.context, args.device)

    print(report)
    mib = skipped_mib(model, args.batch, args.context, args.density, dtype)
    print(f"\nsites rewritten: {len(report.rewritten)} of {len(report.sites)}; a routed layer skips {mib:,.1f} MiB "
          f"of K/V reads per step (routed on CUDA only above min_saved_mib = 32 MiB; elsewhere always)")
    for name, (_, step_seconds, total) in results.items():
        print(f"{name:>8}: {step_seconds * 1e3:8.2f} ms/step (median)   compile + decode {total:6.1f} s")
    dense_tokens, polar_tokens = results["inductor"][0], results["polar"][0]
    agreement = (dense_tokens == polar_tokens).float().mean().item()
    print(f"token agreement polar vs dense: {agreement:.1%}"
          + ("" if args.routers else "  (random routers: agreement is not meaningful)"))
    if on_cuda:
        print(f"polar step vs dense step: {results['inductor'][1] / results['polar'][1]:.2f}x faster")
    else:
        print("on a CPU the polar ops are reference implementations in plain PyTorch, so the times above say "
              "nothing about polar's speed (that comes from the CUDA kernels): this run shows that the rewritten "
              "graph runs and how its tokens agree with dense")


if __name__ == "__main__":
    main()

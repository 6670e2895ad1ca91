"""Batched greedy decoding of an HF model with a StaticCache: dense Inductor vs ``backend="polar"``.

    python examples/demo.py                          # a small random Llama (GQA), built offline
    python examples/demo.py --model PATH_OR_HUB_ID   # any local folder or hub id of a supported decoder
    python examples/demo.py --model PATH --routers DIR

Prints the attention sites the backend rewrote, the time per decode step of both, and how often they agree
on the next token. Without ``--routers`` the routers are random: fine for speed, meaningless for accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, StaticCache

import polar_compile
from polar_compile.testing import random_routers


def build_model(name: str | None, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The model at ``name`` (local path or hub id), or a small random Llama with 8 query / 2 KV heads."""
    if name:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def greedy_decode(model, step, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[float]]:
    """Prefill eagerly, then ``new_tokens`` greedy steps through ``step``; returns tokens and per-step seconds."""
    batch, prompt_len = prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
    positions = torch.arange(prompt_len, device=prompt.device)
    logits = model(input_ids=prompt, past_key_values=cache, cache_position=positions,
                   position_ids=positions.expand(batch, -1)).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local path or hub id (default: a small random Llama built offline)")
    parser.add_argument("--routers", help="a RouterBank directory (default: random routers)")
    parser.add_argument("--density", type=float, default=0.5, help="fraction of heads / KV groups kept")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(args.model, dtype, args.device)
    routers = polar_compile.RouterBank.load(args.routers) if args.routers else random_routers(model)
    polar_compile.attach(model, routers, density=args.density)
    vocab = model.config.get_text_config().vocab_size
    prompt = torch.randint(1, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(args.device)

    mode = "reduce-overhead" if args.device == "cuda" else None
    results = {}
    with torch.no_grad():
        for name in ("inductor", "polar"):
            start = time.perf_counter()
            step = torch.compile(model.forward, backend=name, mode=mode, fullgraph=True)
            tokens, seconds = greedy_decode(model, step, prompt, args.new_tokens)
            results[name] = (tokens, statistics.median(seconds[2:]), time.perf_counter() - start)

        cache = StaticCache(config=model.config, max_cache_len=args.prompt_len + 1)
        positions = torch.arange(args.prompt_len, device=args.device)
        model(input_ids=prompt, past_key_values=cache, cache_position=positions)
        report = polar_compile.explain(model, input_ids=prompt[:, :1], past_key_values=cache,
                                       cache_position=positions[-1:] + 1,
                                       position_ids=(positions[-1:] + 1).expand(args.batch, 1))
    print(report)
    print(f"\nmodel: {args.model or 'random Llama 6x256, 8 heads / 2 KV heads'}  batch {args.batch}  "
          f"prompt {args.prompt_len}  new tokens {args.new_tokens}  density {args.density}  {args.device} {dtype}")
    for name, (_, step_seconds, total) in results.items():
        print(f"{name:>8}: {step_seconds * 1e3:8.2f} ms/step (median)   compile + decode {total:6.1f} s")
    dense_tokens, polar_tokens = results["inductor"][0], results["polar"][0]
    agreement = (dense_tokens == polar_tokens).float().mean().item()
    print(f"sites rewritten: {len(report.rewritten)} of {len(report.sites)}   "
          f"token agreement polar vs dense: {agreement:.1%}"
          + ("" if args.routers else "  (random routers: agreement is not meaningful)"))


if __name__ == "__main__":
    main()

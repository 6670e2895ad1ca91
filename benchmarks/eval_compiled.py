"""Perplexity through the compiled decode path (CUDA graphs, Triton kernels) against ``polar-compile eval``'s.

    python benchmarks/eval_compiled.py --model ../shared/models/tiny-llama-wt2 \
        --routers benchmarks/routers/tiny-llama-wt2 --data ../shared/data/wikitext-2/test.txt --windows 16

The first ``--windows`` 512-token windows of the data run (a) through :class:`polar_compile.evaluate.Evaluator`
(full windows, the routers' top-k units gated per token, what ``polar-compile eval`` reports) and (b) token by token
through ``torch.compile(backend="polar", mode="reduce-overhead")`` with a StaticCache, one batch of windows per step
(every site routed: ``min_saved_mib=0``), on ``--device`` (CUDA: CUDA graphs and the Triton kernels). Prints both perplexities and the largest per-token NLL difference.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

import polar_compile
from polar_compile.data import as_windows
from polar_compile.evaluate import Evaluator


def compiled_token_nll(model, bank, density: float, windows: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``[n, T]`` of token-by-token decode compiled with ``backend="polar"`` (CUDA graphs)."""
    polar_compile.attach(model, bank, density=density, min_saved_mib=0)
    step = torch.compile(model.forward, backend="polar", mode="reduce-overhead", fullgraph=True)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    batch, length = inputs.shape
    cache = StaticCache(config=model.config, max_cache_len=length)
    losses = []
    with torch.no_grad():
        for t in range(length):
            logits = step(input_ids=inputs[:, t : t + 1], past_key_values=cache, use_cache=True,
                          cache_position=torch.tensor([t], device=inputs.device),
                          position_ids=torch.full((batch, 1), t, device=inputs.device)).logits
            losses.append(F.cross_entropy(logits[:, -1].float(), targets[:, t], reduction="none"))
    return torch.stack(losses, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--routers", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bank = polar_compile.RouterBank.load(args.routers)
    windows = as_windows(args.data, tokenizer, 512, max_tokens=513 * args.windows)[: args.windows].to(args.device)
    evaluator = Evaluator(model, bank, batch_size=args.windows, progress=False)
    expected = evaluator.token_nll(windows, evaluator.sparsity("routers", args.density)).to(args.device)
    compiled = compiled_token_nll(model, bank, args.density, windows)
    print(f"{len(windows)} windows x {windows.shape[1] - 1} tokens, density {args.density}")
    print(f"eval (routers) perplexity {math.exp(expected.mean()):.4f}; compiled decode {math.exp(compiled.mean()):.4f}")
    print(f"max |per-token NLL difference| {(compiled - expected).abs().max():.2e}; "
          f"mean {(compiled - expected).abs().mean():.2e}")


if __name__ == "__main__":
    main()

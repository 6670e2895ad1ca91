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
from transformers import AutoModelForCausalLM, AutoTokenizer

import polar_compile
from polar_compile.data import as_windows
from polar_compile.evaluate import Evaluator, decode_token_nll


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
    polar_compile.attach(model, bank, density=args.density, min_saved_mib=0)
    step = torch.compile(model.forward, backend="polar", mode="reduce-overhead", fullgraph=True)
    compiled = decode_token_nll(step, model, windows)
    print(f"{len(windows)} windows x {windows.shape[1] - 1} tokens, density {args.density}")
    print(f"eval (routers) perplexity {math.exp(expected.mean()):.4f}; compiled decode {math.exp(compiled.mean()):.4f}")
    print(f"max |per-token NLL difference| {(compiled - expected).abs().max():.2e}; "
          f"mean {(compiled - expected).abs().mean():.2e}")


if __name__ == "__main__":
    main()

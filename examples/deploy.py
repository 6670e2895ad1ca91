"""Deploy with an exported artifact: export the polar decode step (and the dense prefill), load it back as a server
would, decode a left-padded batch and print tokens/s.

    python examples/deploy.py --format pt2                         # a small random Llama, random routers
    python examples/deploy.py --format aoti --out art/             # an AOTInductor package (C++ compile: minutes)
    python examples/deploy.py --format onnx                        # ONNX in onnxruntime (pip install 'polar-compile[onnx]')
    python examples/deploy.py --model PATH_OR_HUB_ID --routers DIR --format aoti
    python examples/deploy.py --artifact art/                      # only load and run an existing artifact

Loading needs ``import polar_compile`` only (``polar_compile.export.load``); the cache is a list of tensors this
script owns, which the prefill and every decode step write into in place (an ONNX step returns the cache, which
``load`` copies back). Prompts are left-padded to the artifact's ``prefill_len``; each row keeps its own positions.
``examples/aoti_runner.cpp`` runs an ``aoti`` artifact from C++. The model is exported on the GPU in bf16 when
there is one (an ``aoti`` package then holds the Triton kernels), else on the CPU in fp32, where the polar ops are reference
implementations: the tokens/s printed there say nothing about polar's speed on a GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import polar_compile
from polar_compile.testing import random_routers

SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=1024)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "Polar sparsity routes each sequence to"]


def export_artifact(args: argparse.Namespace) -> Path:
    """Export ``--model`` (or a small random Llama) with ``--routers`` (or random ones) to ``--out``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    else:
        torch.manual_seed(0)
        config = LlamaConfig(**SMALL)
        config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to(device).eval()
    routers = polar_compile.RouterBank.load(args.routers) if args.routers else random_routers(model)
    start = time.perf_counter()
    folder = polar_compile.export(model, routers=routers, density=args.density, batch_size=args.batch,
                                  max_cache_len=args.prefill_len + args.new_tokens, prefill_len=args.prefill_len,
                                  format=args.format, path=args.out)
    print(f"exported {args.format} to {folder} in {time.perf_counter() - start:.1f} s")
    return folder


def left_padded_prompts(deployment: polar_compile.export.Deployment, model_path: str | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids ``[B, prefill_len]`` and their mask, left-padded: tokenized ``PROMPTS`` when the model has a
    tokenizer, else random ids of random lengths."""
    batch, length = deployment.manifest["batch_size"], deployment.manifest["prefill_len"]
    if model_path:
        tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        texts = [PROMPTS[row % len(PROMPTS)] for row in range(batch)]
        encoded = tokenizer(texts, return_tensors="pt", padding="max_length", max_length=length, truncation=True)
        return encoded.input_ids, encoded.attention_mask
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, SMALL["vocab_size"], (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(torch.randint(0, length // 2, (batch,), generator=generator).tolist()):
        mask[row, :pad] = 0
    return ids * mask, mask


def main() -> None:
    """Export (unless ``--artifact``), load, prefill, decode, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("pt2", "aoti", "onnx"), default="pt2")
    parser.add_argument("--artifact", type=Path, help="run this artifact instead of exporting one")
    parser.add_argument("--model", help="local folder or hub id of a supported decoder (default: a random Llama)")
    parser.add_argument("--routers", help="router bank folder (default: random routers)")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("polar-artifact"))
    args = parser.parse_args()

    deployment = polar_compile.export.load(args.artifact or export_artifact(args))
    manifest = deployment.manifest
    print("\n".join(manifest["sites"][:1] + [line for line in manifest["sites"] if "rewritten" in line]))
    ids, prompt_mask = left_padded_prompts(deployment, args.model)
    device = manifest["device"]
    free = manifest["max_cache_len"] - manifest["prefill_len"]  # slots left for generated tokens
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(ids), free)], dim=1).to(device)  # [B, L]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row's own positions
    cache = deployment.new_cache()
    with torch.no_grad():
        token = deployment.prefill(ids.to(device), positions[:, :ids.shape[1]], mask, cache).argmax(-1)
        tokens, start = [token], time.perf_counter()
        for slot in range(ids.shape[1], manifest["max_cache_len"] - 1):
            token = deployment.decode(token, positions[:, slot:slot + 1], mask, slot, cache).argmax(-1)
            tokens.append(token)
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(torch.cat(tokens, dim=1))
    steps = len(tokens) - 1
    print(f"{steps} decode steps of batch {len(ids)}: {seconds / steps * 1e3:.2f} ms/step, "
          f"{steps * len(ids) / seconds:.1f} tokens/s ({manifest['format']}, {device})")


if __name__ == "__main__":
    main()

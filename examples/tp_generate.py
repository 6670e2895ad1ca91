"""Tensor-parallel greedy generation with ``backend="polar"``: compiled TP polar vs the per-rank eager reference.

    torchrun --nproc-per-node 2 examples/tp_generate.py --model shared/models/tiny-opt-wt2 \\
        --routers benchmarks/routers/tiny-opt-wt2 --data shared/data/wikitext-2/test.txt

Each rank loads the model, shards it (``polar_compile.distributed.parallelize``: q/k/v and MLP up column-wise,
output and MLP down row-wise; on CUDA with NCCL, else on the CPU with gloo), attaches the routers (each rank takes
the rows of its own heads or KV groups) and greedily decodes a left-padded batch of prompts (lines of ``--data``)
twice on a StaticCache: eagerly, with hooks that keep each rank's own top-k of its local units by float64 router
scores and zero the other local heads before the output projection (the reference), and with the decode step
compiled by ``backend="polar"`` (``mode="reduce-overhead"`` on CUDA: CUDA graphs with the all-reduces inside).
Rank 0 prints how many generated tokens agree.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

import polar_compile
from polar_compile.distributed import parallelize
from polar_compile.state import BIAS, WEIGHT, K, decoder_layers


@contextmanager
def per_rank_reference(model: nn.Module) -> Iterator[None]:
    """At decode steps, each attached layer keeps its top ``k`` local units by float64 scores of its local router
    rows on the query projection's input; the other local heads are zeroed before the output projection."""
    handles, captured = [], {}
    for index, layer in enumerate(decoder_layers(model)):
        if WEIGHT not in layer._buffers:
            continue
        attention = next(m for m in layer.modules() if hasattr(m, "q_proj"))
        output = next(getattr(attention, n) for n in ("o_proj", "out_proj") if hasattr(attention, n))
        weight, bias, k = layer._buffers[WEIGHT].double(), layer._buffers[BIAS].double(), getattr(layer, K)

        def capture(module, args, index=index):
            captured[index] = args[0]

        def gate(module, args, index=index, weight=weight, bias=bias, k=k):
            z = args[0]  # [B, 1, local heads * D]
            if z.shape[-2] != 1:
                return None  # prefill stays dense
            scores = captured[index].double() @ weight.T + bias  # [B, 1, local units]
            keep = torch.zeros_like(scores).scatter(-1, scores.topk(k, dim=-1).indices, 1.0)
            heads = z.view(*z.shape[:-1], -1, model.config.hidden_size // model.config.num_attention_heads)
            keep = keep.repeat_interleave(heads.shape[-2] // keep.shape[-1], dim=-1)  # [B, 1, local heads]
            return ((heads * keep[..., None].to(z.dtype)).flatten(-2),)

        # prepended: they see the local tensors, before parallelize_module's hooks wrap them as DTensors
        handles += [attention.q_proj.register_forward_pre_hook(capture, prepend=True),
                    output.register_forward_pre_hook(gate, prepend=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def generate(model: nn.Module, step: Callable, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy ``[B, new_tokens]``: eager dense prefill of ``ids`` (left-padded by ``mask``), then ``step``."""
    batch, prompt_len = ids.shape
    mask = torch.cat([mask, mask.new_ones(batch, new_tokens)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask[:, :prompt_len], past_key_values=cache,
                       cache_position=torch.arange(prompt_len, device=ids.device),
                       position_ids=positions[:, :prompt_len]).logits
        tokens = [logits[:, -1:].argmax(-1)]
        for t in range(prompt_len, prompt_len + new_tokens - 1):
            logits = step(input_ids=tokens[-1], attention_mask=mask[:, : t + 1], past_key_values=cache,
                          cache_position=torch.tensor([t], device=ids.device),
                          position_ids=positions[:, t : t + 1]).logits
            tokens.append(logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder or hub id")
    parser.add_argument("--routers", required=True, help="router bank folder (polar-compile calibrate --out)")
    parser.add_argument("--data", required=True, help="text file: its non-empty lines are the prompts")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=48, help="at most this many tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device("cuda" if cuda else "cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa").to(device).eval()
    parallelize(model, mesh)
    polar_compile.attach(model, polar_compile.RouterBank.load(args.routers), density=args.density,
                         min_saved_mib=0)  # route every site, however small (the point here is the tokens)
    with open(args.data) as file:
        lines = [line.strip() for line in file if len(line.split()) > 8][: args.batch]
    batch = tokenizer(lines, return_tensors="pt", padding=True, truncation=True, max_length=args.prompt_tokens)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)

    with per_rank_reference(model):
        reference = generate(model, model, ids, mask, args.new_tokens)
    step = torch.compile(model.forward, backend="polar", mode="reduce-overhead" if cuda else None, fullgraph=True)
    compiled = generate(model, step, ids, mask, args.new_tokens)

    agree = (compiled == reference).float().mean().item()
    if dist.get_rank() == 0:
        print(f"TP={dist.get_world_size()} {args.model} density {args.density:g}, batch {len(lines)} (left-padded "
              f"prompts of up to {ids.shape[1]} tokens), {args.new_tokens} new tokens: compiled polar agrees with "
              f"the per-rank eager reference on {agree:.2%} of tokens")
        print(repr(tokenizer.decode(compiled[0], skip_special_tokens=True)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

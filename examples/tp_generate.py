"""Tensor-parallel greedy generation with ``backend="polar"``: compiled TP polar vs the per-rank eager reference.

    torchrun --nproc-per-node 2 examples/tp_generate.py --model shared/models/tiny-opt-wt2 \\
        --routers benchmarks/routers/tiny-opt-wt2 --data shared/data/wikitext-2/test.txt

Each rank loads the model, shards it (``polar_compile.distributed.parallelize``: q/k/v and MLP up column-wise,
output and MLP down row-wise; on CUDA with NCCL, else on the CPU with gloo), attaches the routers (each rank takes
the rows of its own heads or KV groups) and greedily decodes a left-padded batch of prompts (lines of ``--data``)
twice on a StaticCache: eagerly, with hooks that keep each rank's own top-k of its local units by float64 router
scores and zero the other local heads before the output projection (the reference), and with the decode step
compiled by ``backend="polar"`` (``mode="reduce-overhead"`` on CUDA: CUDA graphs with the all-reduces inside).
Each rank first checks with ``polar_compile.explain`` that the backend routes the attention sites (it stops
when none is). Rank 0 prints how many generated tokens agree, and, teacher forced (the compiled step reads the
reference's tokens), how many steps' greedy tokens agree and the largest logit difference, with how near the
reference's router scores came to a tie.
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
def per_rank_reference(model: nn.Module, gaps: list[float] | None = None) -> Iterator[None]:
    """At decode steps, each attached layer keeps its top ``k`` local units by float64 scores of its local router
    rows on the query projection's input; the other local heads are zeroed before the output projection. Appends
    to ``gaps``, per step and layer, the smallest gap over the batch between the k-th and (k+1)-th score (how near
    a tie the selection came: below fp32 resolution, the compiled router may pick the other unit)."""
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
            if gaps is not None and k < scores.shape[-1]:
                top = scores.topk(k + 1, dim=-1).values
                gaps.append((top[..., k - 1] - top[..., k]).min().item())
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


def generate(model: nn.Module, step: Callable, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
             forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens ``[B, new_tokens]`` and the decode steps' logits ``[B, new_tokens - 1, vocab]``: eager dense
    prefill of ``ids`` (left-padded by ``mask``), then ``step``. Every decode step has the same shapes: the mask
    covers the whole cache (the prompts' padding, then ones; the causal mask hides the slots not written yet).
    With ``forced`` (``[B, new_tokens]``, e.g. another run's tokens), step t reads ``forced[:, t]`` instead of its
    own last token (teacher forcing: both runs' logits are compared on the same inputs)."""
    batch, prompt_len = ids.shape
    mask = torch.cat([mask, mask.new_ones(batch, new_tokens)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
    steps = []
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask[:, :prompt_len], past_key_values=cache,
                       cache_position=torch.arange(prompt_len, device=ids.device),
                       position_ids=positions[:, :prompt_len]).logits
        tokens = [logits[:, -1:].argmax(-1)]
        for t in range(prompt_len, prompt_len + new_tokens - 1):
            last = tokens[-1] if forced is None else forced[:, t - prompt_len, None].contiguous()
            logits = step(input_ids=last, attention_mask=mask, past_key_values=cache,
                          cache_position=torch.tensor([t], device=ids.device),
                          position_ids=positions[:, t : t + 1].contiguous()).logits
            steps.append(logits[:, -1].float().clone())  # a CUDA graph's output is overwritten by its next replay
            tokens.append(logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1), torch.stack(steps, dim=1)


def routed_sites(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> str:
    """``polar_compile.explain`` of one decode step (on an empty cache): how many attention sites the backend
    routes. Raises ``SystemExit`` on every rank when it routes none (the comparison would be of dense TP)."""
    batch, prompt_len = ids.shape
    full = torch.cat([mask, mask.new_ones(batch, new_tokens)], dim=1)
    report = polar_compile.explain(
        model, input_ids=ids[:, -1:], attention_mask=full, cache_position=torch.tensor([prompt_len], device=ids.device),
        past_key_values=StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens),
        position_ids=(full.cumsum(-1) - 1)[:, prompt_len : prompt_len + 1])
    if not report.rewritten:
        raise SystemExit(f"rank {dist.get_rank()}: backend='polar' routes none of this model's attention sites:\n"
                         f"{report}")
    return f"{len(report.rewritten)} of {len(report.sites)} attention sites routed on rank {dist.get_rank()}"


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

    routed = routed_sites(model, ids, mask, args.new_tokens)  # every rank checks its own
    if dist.get_rank() == 0:
        print(routed, flush=True)
    gaps: list[float] = []
    with per_rank_reference(model, gaps):
        reference, reference_logits = generate(model, model, ids, mask, args.new_tokens)
    step = torch.compile(model.forward, backend="polar", mode="reduce-overhead" if cuda else None, fullgraph=True)
    compiled, _ = generate(model, step, ids, mask, args.new_tokens)
    _, forced_logits = generate(model, step, ids, mask, args.new_tokens, forced=reference)

    agree = (compiled == reference).float().mean().item()
    forced_agree = (forced_logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    difference = (forced_logits - reference_logits.float()).abs().max().item()
    near_ties = sum(gap < 1e-5 for gap in gaps)
    if dist.get_rank() == 0:
        print(f"TP={dist.get_world_size()} {args.model} density {args.density:g}, batch {len(lines)} (left-padded "
              f"prompts of up to {ids.shape[1]} tokens), {args.new_tokens} new tokens: compiled polar agrees with "
              f"the per-rank eager reference on {agree:.2%} of tokens")
        print(f"teacher forced (both read the reference's tokens): greedy tokens agree on {forced_agree:.2%} of "
              f"decode steps, max |logit difference| {difference:.3g}; rank 0's reference top-k: smallest gap "
              f"between the k-th and (k+1)-th router score {min(gaps, default=float('nan')):.3g}, {near_ties} of "
              f"{len(gaps)} layer-steps below 1e-5")
        print(repr(tokenizer.decode(compiled[0], skip_special_tokens=True)))
    if not cuda:  # NCCL's teardown hangs once CUDA graphs captured its collectives (pytorch/pytorch#115388)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

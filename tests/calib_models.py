"""Shared pieces of the calibration / data / evaluation tests: model specs, a tokenizer, text, ../shared paths."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tests.models import VOCAB, TinySpec

SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # ../shared beside the checkout
SHARED_MODELS = {name: SHARED / "models" / name for name in ("tiny-llama-wt2", "tiny-opt-wt2")}
WIKITEXT = SHARED / "data" / "wikitext-2"
needs_shared = pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="../shared (tiny trained models) is absent")

WORDS = [f"w{i}" for i in range(VOCAB - 2)]
# The two shapes of the models, in miniature: GQA (units = 2 KV groups) and MHA (units = heads).
LLAMA = TinySpec("llama", heads=4, kv_heads=2, head_dim=16, layers=3)
OPT = TinySpec("opt", heads=4, kv_heads=4, head_dim=16, layers=3, bias=True)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``WORDS`` (+ unk, bos); its post-processor would add BOS if asked to."""
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>")


def random_text(words: int, seed: int = 0) -> str:
    """``words`` random words of the tiny vocabulary, in lines of 12."""
    rng = random.Random(seed)
    tokens = [rng.choice(WORDS) for _ in range(words)]
    return "\n".join(" ".join(tokens[i : i + 12]) for i in range(0, words, 12))


def random_windows(count: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[count, seq_len + 1]`` random token windows."""
    return torch.randint(2, VOCAB, (count, seq_len + 1), generator=torch.Generator().manual_seed(seed))


def load_shared(name: str) -> tuple[torch.nn.Module, object]:
    """One of the trained tiny models of ../shared/models (fp32, eval) and its tokenizer."""
    from transformers import AutoTokenizer

    path = SHARED_MODELS[name]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(path)

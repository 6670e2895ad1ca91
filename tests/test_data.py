"""Data loading: files, HF datasets (faked offline), tokenization without special tokens, windows."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polar_compile.data import DataError, as_windows, load_text, token_windows, tokenize
from tests.budget import examples
from tests.calib_models import SHARED_MODELS, WIKITEXT, needs_shared, random_text, tiny_tokenizer


def test_load_text_reads_a_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_text(path) == "héllo\nworld\n"
    assert load_text(str(path)) == "héllo\nworld\n"


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(" \n\n")
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        load_text(path)


def test_missing_text_file_is_not_taken_for_a_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text(tmp_path / "missing.txt")


def test_dataset_without_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        load_text("wikitext:wikitext-2-raw-v1")


def test_dataset_loading_passes_name_config_split(monkeypatch):
    calls = []

    class FakeDataset(dict):
        column_names = ("text",)

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeDataset(text=["a b", "c"])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_text("org/wikitext:raw-v1", split="test") == "a b\nc"
    assert load_text("wikitext") == "a b\nc"
    assert calls == [("org/wikitext", "raw-v1", "test"), ("wikitext", None, "train")]
    with pytest.raises(DataError, match="no column 'content'"):
        load_text("wikitext", text_field="content")


def test_tokenize_adds_no_special_tokens():
    tokenizer = tiny_tokenizer()
    text = random_text(30, seed=1)
    with_bos = tokenizer(text)["input_ids"]
    assert with_bos[0] == tokenizer.bos_token_id  # the tokenizer would add BOS ...
    assert tokenize(text, tokenizer).tolist() == with_bos[1:]  # ... the protocol does not


@settings(max_examples=examples(50), deadline=None)
@given(n=st.integers(2, 300), seq_len=st.integers(1, 40), cap=st.one_of(st.none(), st.integers(1, 400)))
def test_windows_are_non_overlapping_and_drop_the_partial_tail(n, seq_len, cap):
    stream = torch.randperm(10_000)[:n]
    expected = (n - 1) // seq_len if cap is None else min((n - 1) // seq_len, cap // seq_len)
    if expected == 0:
        with pytest.raises(DataError, match="too few for one window"):
            token_windows(stream, seq_len, max_tokens=cap)
        return
    windows = token_windows(stream, seq_len, max_tokens=cap)
    assert windows.shape == (expected, seq_len + 1)
    for i, window in enumerate(windows):  # inputs of window i are tokens i*L .. i*L+L-1; the target adds one
        assert window.tolist() == stream[i * seq_len : i * seq_len + seq_len + 1].tolist()


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(DataError, match=r"data has 5 tokens, too few for one window of 512"):
        as_windows(torch.arange(5), None)


def test_text_needs_a_tokenizer():
    with pytest.raises(DataError, match="needs a tokenizer"):
        as_windows(["some text"], None)


def test_windows_from_texts_equal_windows_of_the_token_stream(tmp_path):
    tokenizer = tiny_tokenizer()
    text = random_text(200, seed=2)
    path = tmp_path / "t.txt"
    path.write_text(text)
    stream = tokenize(text, tokenizer)
    expected = token_windows(stream, 16)
    assert torch.equal(as_windows(path, tokenizer, 16), expected)
    assert torch.equal(as_windows([text], tokenizer, 16), expected)
    assert torch.equal(as_windows(stream, None, 16), expected)
    assert torch.equal(as_windows(expected, None, 16), expected)


@needs_shared
def test_wikitext_test_split_gives_the_protocol_token_count():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED_MODELS["tiny-llama-wt2"])
    windows = as_windows(WIKITEXT / "test.txt", tokenizer)
    assert windows[:, 1:].numel() == 379_904  # predicted tokens in shared/models/README.md

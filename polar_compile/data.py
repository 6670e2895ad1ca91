"""Calibration and evaluation text: plain text files or HF ``datasets``, cut into token windows.

Protocol (``shared/models/README.md``): the text is tokenized as one stream with no BOS/EOS added and cut into
non-overlapping windows of ``seq_len`` input tokens; window ``i`` predicts tokens ``i*L+1 .. i*L+L`` from its
inputs ``i*L .. i*L+L-1`` (so every window predicts ``L`` tokens); a last partial window is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["DataError", "as_windows", "load_text", "token_windows", "tokenize"]

DEFAULT_SEQ_LEN = 512
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw")  # a missing path with these is a typo, not a dataset name


class DataError(ValueError):
    """Calibration or evaluation data that is missing, empty or too short."""


def load_text(source: str | Path, *, split: str = "train", text_field: str = "text") -> str:
    """The text of ``source``: a UTF-8 text file if that path exists, else an HF dataset ``name[:config]``.

    Dataset rows (``text_field``) are joined with newlines. Raises :class:`DataError` for an empty text.
    """
    path = Path(source)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"data file {path} is empty")
        return text
    if path.suffix in _TEXT_SUFFIXES or path.is_absolute() or str(source).startswith("."):
        raise DataError(f"data file {path} does not exist")
    text = "\n".join(_dataset_rows(str(source), split, text_field))
    if not text.strip():
        raise DataError(f"dataset {source!r} split {split!r} has no text in field {text_field!r}")
    return text


def _dataset_rows(source: str, split: str, text_field: str) -> list[str]:
    """The ``text_field`` column of ``datasets.load_dataset(name, config, split=split)``."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{source!r} is not a file, and loading it as a Hugging Face dataset needs the `datasets` "
            "package: pip install datasets"
        ) from err
    name, _, config = source.partition(":")
    dataset = datasets.load_dataset(name, config or None, split=split)
    if text_field not in dataset.column_names:
        raise DataError(f"dataset {source!r} has no column {text_field!r}; columns: {dataset.column_names}")
    return list(dataset[text_field])


def tokenize(text: str, tokenizer: Any) -> Tensor:
    """The token ids of ``text`` as one stream, no special tokens added: ``[N]`` int64."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(tokens: Tensor, seq_len: int = DEFAULT_SEQ_LEN, *, max_tokens: int | None = None) -> Tensor:
    """Non-overlapping windows ``[n, seq_len + 1]`` of a token stream ``[N]``: inputs ``w[:, :-1]``, targets ``w[:, 1:]``.

    ``max_tokens`` caps the input tokens used (whole windows only). Raises :class:`DataError` when the stream is
    shorter than one window.
    """
    if tokens.dim() != 1:
        raise DataError(f"expected a 1-D token stream, got shape {list(tokens.shape)}")
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    count = (tokens.numel() - 1) // seq_len
    if max_tokens is not None:
        count = min(count, max_tokens // seq_len)
    if count < 1:
        raise DataError(
            f"data has {tokens.numel()} tokens, too few for one window of {seq_len} tokens "
            f"(needs {seq_len + 1}: the inputs and the next token); use more text or a smaller seq_len"
        )
    starts = torch.arange(count) * seq_len
    return tokens[starts[:, None] + torch.arange(seq_len + 1)]  # [n, seq_len + 1]


def as_windows(
    data: str | Path | Sequence[str] | Tensor,
    tokenizer: Any,
    seq_len: int = DEFAULT_SEQ_LEN,
    *,
    max_tokens: int | None = None,
) -> Tensor:
    """Token windows ``[n, seq_len + 1]`` from a file or dataset name, a list of texts, or token ids.

    Token ids may be a stream ``[N]`` or windows ``[n, seq_len + 1]`` already; texts need ``tokenizer``.
    """
    if isinstance(data, Tensor):
        if data.dim() == 2:
            if data.shape[1] != seq_len + 1:
                raise DataError(f"token windows have shape {list(data.shape)}, expected [n, {seq_len + 1}]")
            return data if max_tokens is None else data[: max(1, max_tokens // seq_len)]
        return token_windows(data, seq_len, max_tokens=max_tokens)
    if tokenizer is None:
        raise DataError("text data needs a tokenizer (pass tokenizer=AutoTokenizer.from_pretrained(...))")
    if isinstance(data, (str, Path)):
        text = load_text(data)
    else:
        text = "\n".join(data)
        if not text.strip():
            raise DataError("the list of texts is empty")
    return token_windows(tokenize(text, tokenizer), seq_len, max_tokens=max_tokens)

"""Training data: raw-text corpora, tokenizers (bytes or a pinned tokenizer file), prepared token files, sampling.

The names below load their module on first use, so `cfnode --help` and the commands registered from
cfnode.data.commands do not pay for torch, numpy and tokenizers before they need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataError": "cfnode.data.corpus",
    "iter_corpus": "cfnode.data.corpus",
    "load_corpus": "cfnode.data.corpus",
    "TextDataset": "cfnode.data.dataset",
    "batch_generator": "cfnode.data.dataset",
    "BYTE_TOKENIZER": "cfnode.data.tokenizer",
    "ByteTokenizer": "cfnode.data.tokenizer",
    "FileTokenizer": "cfnode.data.tokenizer",
    "Tokenizer": "cfnode.data.tokenizer",
    "byte_tokenizer_json": "cfnode.data.tokenizer",
    "file_sha256": "cfnode.data.tokenizer",
    "load_run_tokenizer": "cfnode.data.tokenizer",
    "train_bpe": "cfnode.data.tokenizer",
    "write_hf_tokenizer": "cfnode.data.tokenizer",
    "TokenFile": "cfnode.data.tokens",
    "is_token_dir": "cfnode.data.tokens",
    "load_run_dataset": "cfnode.data.tokens",
    "prepare_tokens": "cfnode.data.tokens",
}
__all__ = [
    "BYTE_TOKENIZER",
    "ByteTokenizer",
    "DataError",
    "FileTokenizer",
    "TextDataset",
    "TokenFile",
    "Tokenizer",
    "batch_generator",
    "byte_tokenizer_json",
    "file_sha256",
    "is_token_dir",
    "iter_corpus",
    "load_corpus",
    "load_run_dataset",
    "load_run_tokenizer",
    "prepare_tokens",
    "train_bpe",
    "write_hf_tokenizer",
]

if TYPE_CHECKING:
    from cfnode.data.corpus import DataError, iter_corpus, load_corpus
    from cfnode.data.dataset import TextDataset, batch_generator
    from cfnode.data.tokenizer import (
        BYTE_TOKENIZER,
        ByteTokenizer,
        FileTokenizer,
        Tokenizer,
        byte_tokenizer_json,
        file_sha256,
        load_run_tokenizer,
        train_bpe,
        write_hf_tokenizer,
    )
    from cfnode.data.tokens import TokenFile, is_token_dir, load_run_dataset, prepare_tokens


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

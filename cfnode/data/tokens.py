"""Prepared token files, the nanoGPT / litgpt way: a corpus tokenized once into a flat array on disk, memory-mapped.

A token directory holds tokens.bin (little-endian uint16 when the vocabulary fits, else uint32, one token after
another) and meta.json (format version, tokenizer id, vocab_size, dtype, token count, source). `cfnode data prepare`
writes one; `cfnode train --data DIR` maps it instead of reading and tokenizing text.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hivemind.utils.logging import get_logger

from cfnode.config import RunSpec
from cfnode.data.corpus import DataError, corpus_bytes, describe_corpus, iter_corpus, iter_text, load_corpus
from cfnode.data.dataset import TextDataset, check_vocab
from cfnode.data.tokenizer import ByteTokenizer, Tokenizer

logger = get_logger(__name__)

FORMAT = "cfnode-tokens"
FORMAT_VERSION = 1
META_NAME = "meta.json"
TOKENS_NAME = "tokens.bin"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
ENCODE_BATCH = 64  # text pieces per encode_batch call: enough for the tokenizer's threads to share
PROGRESS_SECONDS = 5.0


def token_dtype(vocab_size: int) -> str:
    """The narrowest dtype that holds every token id: uint16 up to 65,536 tokens, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def is_token_dir(path: str | Path) -> bool:
    """Whether `path` is a prepared token directory (it has a meta.json), rather than text."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / META_NAME).is_file()


@dataclass(frozen=True)
class TokenFile:
    """An opened token directory: its meta.json and tokens.bin memory-mapped read-only."""

    path: Path
    tokenizer: str  # "byte" or "sha256:<digest>"
    vocab_size: int
    dtype: str
    num_tokens: int
    source: str
    tokens: np.ndarray  # (num_tokens,), a read-only memmap

    @classmethod
    def open(cls, path: str | Path) -> TokenFile:
        path = Path(path).expanduser()
        meta = _read_meta(path)
        tokens_path = path / TOKENS_NAME
        dtype = DTYPES[meta["dtype"]]
        try:
            size = tokens_path.stat().st_size
        except OSError as e:
            raise DataError(f"cannot read {tokens_path}: {e.strerror}") from None
        if size != meta["num_tokens"] * dtype.itemsize:
            raise DataError(f"{tokens_path} holds {size} bytes, but {path / META_NAME} says {meta['num_tokens']} "
                            f"{meta['dtype']} tokens ({meta['num_tokens'] * dtype.itemsize} bytes): the file was "
                            "changed or cut short; prepare it again")
        # numpy cannot map an empty file; an empty sequence is refused later by the dataset with its own reason.
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
        return cls(path=path, tokenizer=meta["tokenizer"], vocab_size=meta["vocab_size"], dtype=meta["dtype"],
                   num_tokens=meta["num_tokens"], source=meta["source"], tokens=tokens)


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_NAME
    try:
        meta = json.loads(meta_path.read_text())
    except OSError as e:
        raise DataError(f"cannot read {meta_path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{meta_path} is not JSON; prepare the tokens again (cfnode data prepare)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{meta_path} is not the meta.json of a cfnode token directory")
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{meta_path} has format version {meta.get('version')!r}; this cfnode reads version "
                        f"{FORMAT_VERSION}: prepare the tokens again with this cfnode")
    checks = {"tokenizer": lambda v: isinstance(v, str), "dtype": lambda v: v in DTYPES,
              "vocab_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "num_tokens": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
              "source": lambda v: isinstance(v, str)}
    bad = [key for key, ok in checks.items() if not ok(meta.get(key))]
    if bad:
        raise DataError(f"{meta_path} has a missing or bad {', '.join(bad)}; prepare the tokens again")
    if DTYPES[meta["dtype"]].itemsize < DTYPES[token_dtype(meta["vocab_size"])].itemsize:
        raise DataError(f"{meta_path}: dtype {meta['dtype']} cannot hold a vocabulary of {meta['vocab_size']}")
    return meta


def encode_chunks(chunks: Iterable[bytes], tokenizer: Tokenizer, source: str, dtype: str) -> Iterator[np.ndarray]:
    """Tokenize a stream of corpus bytes, a block of token ids at a time. The byte tokenizer takes the bytes as
    they are (any bytes); a tokenizer file gets the UTF-8 text in pieces cut at line starts, a batch at a time."""
    np_dtype = DTYPES[dtype]
    if isinstance(tokenizer, ByteTokenizer):
        for chunk in chunks:
            yield np.frombuffer(chunk, dtype=np.uint8).astype(np_dtype)
        return
    batch: list[str] = []
    for piece in iter_text(chunks, source):
        batch.append(piece)
        if len(batch) == ENCODE_BATCH:
            yield _encode_batch(tokenizer, batch, np_dtype)
            batch = []
    if batch:
        yield _encode_batch(tokenizer, batch, np_dtype)


def _encode_batch(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    return np.concatenate([np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(texts)])


class _Progress:
    """Counts the bytes read and tokens written, and logs them every PROGRESS_SECONDS."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.total_bytes, self.enabled = total_bytes, enabled
        self.read = self.tokens = 0
        self.started = self.logged = time.monotonic()

    def count(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.read += len(chunk)
            yield chunk

    def wrote(self, tokens: int) -> None:
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and now - self.logged >= PROGRESS_SECONDS:
            self.logged = now
            logger.info(f"prepared {self.read / 2**20:,.1f} of about {self.total_bytes / 2**20:,.1f} MiB: "
                        f"{self.tokens:,} tokens ({self.rate()})")

    def rate(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return f"{self.read / 2**20 / elapsed:,.2f} MiB/s, {self.tokens / elapsed:,.0f} tokens/s"


def prepare_tokens(data_path: str | Path | None, tokenizer: Tokenizer, tokenizer_id: str, out_dir: str | Path,
                   progress: bool = True) -> TokenFile:
    """Tokenize a corpus (None: the default corpus; a text file; a folder of .txt files, as load_corpus reads them
    but all of it and streamed) into out_dir/tokens.bin and out_dir/meta.json; returns the opened TokenFile.

    The tokens go to a .partial file renamed into place, and meta.json is written last, so a directory with a
    meta.json is always complete. progress: log bytes read and tokens written every few seconds.
    """
    own_id = getattr(tokenizer, "tokenizer_id", tokenizer_id)
    if tokenizer_id != own_id:
        raise DataError(f"tokenizer id {tokenizer_id!r} does not name the tokenizer given ({own_id!r})")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; --out names the folder to write the tokens to")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {out}: {e.strerror}") from None
    dtype = token_dtype(tokenizer.vocab_size)
    source = describe_corpus(data_path)
    counter = _Progress(corpus_bytes(data_path), progress)
    logger.info(f"preparing tokens of {source} with tokenizer {tokenizer_id} ({tokenizer.vocab_size} tokens, "
                f"{dtype}) into {out}")
    partial = out / (TOKENS_NAME + ".partial")
    try:
        with partial.open("wb") as f:
            for block in encode_chunks(counter.count(iter_corpus(data_path)), tokenizer, source, dtype):
                block.tofile(f)
                counter.wrote(len(block))
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "tokenizer": tokenizer_id,
                "vocab_size": tokenizer.vocab_size, "dtype": dtype, "num_tokens": counter.tokens, "source": source,
                "source_bytes": counter.read}
        # The old meta.json goes first: between the two renames the directory is incomplete, not inconsistent.
        (out / META_NAME).unlink(missing_ok=True)
        os.replace(partial, out / TOKENS_NAME)
        meta_partial = out / (META_NAME + ".partial")
        meta_partial.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(meta_partial, out / META_NAME)
    except OSError as e:
        raise DataError(f"cannot write the tokens to {out}: {e.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
    logger.info(f"prepared {counter.tokens:,} tokens from {counter.read:,} bytes of {source} in {out} "
                f"({counter.rate()})")
    return TokenFile.open(out)


def _trim_partial_utf8(data: bytes) -> bytes:
    """Drop a UTF-8 sequence cut off at the end (load_corpus stops at max_bytes, maybe inside a character)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the last lead (or ASCII) byte
            needed = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
            return data[:-back] if needed > back else data
    return data


def load_run_dataset(spec: RunSpec, tokenizer: Tokenizer, data_path: str | Path | None) -> TextDataset:
    """The trainer's data for a run: a prepared token directory, memory-mapped, if it was made with the run's
    tokenizer; else raw text (load_corpus's), tokenized here in memory (for the byte tokenizer, as it always was)."""
    if data_path is not None and is_token_dir(data_path):
        token_file = TokenFile.open(data_path)
        if token_file.tokenizer != tokenizer.tokenizer_id or token_file.vocab_size != tokenizer.vocab_size:
            raise DataError(f"prepared tokens {token_file.path} were made with tokenizer {token_file.tokenizer} "
                            f"(vocab size {token_file.vocab_size}), but the run uses tokenizer {spec.tokenizer} "
                            f"(vocab size {tokenizer.vocab_size}); prepare them again with the run's tokenizer: "
                            "cfnode data prepare --data TEXT [--tokenizer FILE] --out DIR")
        check_vocab(token_file.tokens, spec.vocab_size, f"prepared tokens {token_file.path}")
        dataset = TextDataset.from_tokens(token_file.tokens, spec.seq_len)
        logger.info(f"data: {token_file.num_tokens:,} prepared tokens in {token_file.path} (from {token_file.source})")
        return dataset
    if data_path is not None and Path(data_path).expanduser().is_dir() \
            and any((Path(data_path).expanduser() / name).exists() for name in (TOKENS_NAME, TOKENS_NAME + ".partial")):
        raise DataError(f"{data_path} holds {TOKENS_NAME} but no {META_NAME}: its preparation did not finish; "
                        "run cfnode data prepare again")
    data = load_corpus(data_path)
    if isinstance(tokenizer, ByteTokenizer):
        return TextDataset(data, spec.seq_len)
    source = describe_corpus(data_path)
    dtype = token_dtype(tokenizer.vocab_size)
    blocks = list(encode_chunks([_trim_partial_utf8(data)], tokenizer, source, dtype))
    tokens = np.concatenate(blocks) if blocks else np.zeros(0, dtype=DTYPES[dtype])
    logger.info(f"data: {len(tokens):,} tokens from {len(data):,} bytes of {source}, tokenized at start (for a large "
                "corpus, tokenize it once with cfnode data prepare)")
    return TextDataset.from_tokens(tokens, spec.seq_len, vocab_size=spec.vocab_size)

"""Byte-level text data: a corpus that needs no download, a tokenizer with one token per byte, batch sampling."""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

# Default corpus: the interpreter's own standard library sources, present wherever Python is.
# Top-level modules first, then a few pure-Python packages, each folder's files sorted by name.
DEFAULT_CORPUS_SUBDIRS = ("json", "email", "http", "logging", "asyncio", "importlib", "unittest")


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The random source of the batch for optimiser step `step` (1-based): it depends only on the seed and the
    step, so a restarted trainer, or a run rolled back to a checkpoint, draws exactly the batches it would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class DataError(ValueError):
    """A corpus or dataset that cannot be used; the message says why."""


def _stdlib_sources() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    for sub in DEFAULT_CORPUS_SUBDIRS:
        files += sorted(p for p in (stdlib / sub).glob("*.py") if p.is_file())
    return files


def _concatenate(files: list[Path], root: Path, max_bytes: int) -> bytes:
    """Join the files' bytes, each preceded by a header naming it, and stop at max_bytes."""
    parts: list[bytes] = []
    total = 0
    for file in files:
        try:
            content = file.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read corpus file {file}: {e.strerror}") from None
        if not content:
            continue
        part = f"\n\n# ==== {file.relative_to(root).as_posix()} ====\n\n".encode() + content
        parts.append(part[: max_bytes - total])
        total += len(parts[-1])
        if total >= max_bytes:
            break
    return b"".join(parts)


def load_corpus(path: str | Path | None = None, max_bytes: int = 4_000_000) -> bytes:
    """Raw bytes of the training corpus, at most max_bytes of them.

    path=None: the Python standard library's own .py sources (deterministic for a given Python install).
    A file: its bytes. A folder: all its *.txt files, recursively, sorted by relative path, concatenated.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise DataError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        data = _concatenate(_stdlib_sources(), root, max_bytes)
        if not data:
            raise DataError(f"no Python sources found under {root} for the default corpus; pass a corpus path")
        return data

    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(f"corpus folder {path} holds no .txt files")
        data = _concatenate(files, path, max_bytes)
        if not data:
            raise DataError(f"corpus folder {path} holds only empty .txt files")
        return data
    if not path.exists():
        raise DataError(f"corpus path {path} does not exist")
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes)
    except OSError as e:
        raise DataError(f"cannot read corpus file {path}: {e.strerror}") from None
    if not data:
        raise DataError(f"corpus file {path} is empty")
    return data


class ByteTokenizer:
    """One token per byte of the UTF-8 encoding: no vocabulary file, any text round-trips."""

    vocab_size = 256

    def encode(self, text: str | bytes) -> Tensor:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if not data:
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # (N,)

    def decode(self, tokens: Tensor | list[int]) -> str:
        values = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        return bytes(values).decode("utf-8", errors="replace")


class TextDataset:
    """A byte corpus split into train and validation parts (the last val_fraction of the bytes, no overlap)."""

    def __init__(self, data: bytes, seq_len: int, val_fraction: float = 0.05) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")
        self.seq_len = seq_len
        # Kept as uint8 (a byte per token, 8x smaller than int64); windows become int64 when sampled.
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        split_at = len(tokens) - int(len(tokens) * val_fraction)
        self._train = tokens[:split_at]  # (N_train,)
        self._val = tokens[split_at:]  # (N_val,)
        for name, split in (("train", self._train), ("validation", self._val)):
            if len(split) < seq_len + 1:
                raise DataError(
                    f"{name} split has {len(split)} tokens, fewer than seq_len + 1 = {seq_len + 1} "
                    f"(corpus of {len(tokens)} bytes, val_fraction {val_fraction}); use more text or a shorter seq_len"
                )

    @property
    def train_tokens(self) -> int:
        return len(self._train)

    @property
    def val_tokens(self) -> int:
        return len(self._val)

    def _split(self, split: str) -> Tensor:
        if split == "train":
            return self._train
        if split == "val":
            return self._val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def _windows(self, tokens: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        # Each window holds seq_len + 1 tokens: inputs are the first seq_len, targets the last seq_len.
        index = starts[:, None] + torch.arange(self.seq_len + 1)  # (B, T + 1)
        window = tokens[index].long()  # (B, T + 1)
        return window[:, :-1], window[:, 1:]  # (B, T), (B, T)

    def sample_batch(self, batch_size: int, generator: torch.Generator, split: str = "train") -> tuple[Tensor, Tensor]:
        """batch_size random windows of the split: (inputs, targets), both (B, T) int64, targets shifted by one."""
        tokens = self._split(split)
        starts = torch.randint(0, len(tokens) - self.seq_len, (batch_size,), generator=generator)  # (B,)
        return self._windows(tokens, starts)

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """The validation split cut into consecutive, non-overlapping input windows, always in the same order.

        Yields at most max_batches batches (all of them if None); the last one may hold fewer than batch_size rows.
        """
        num_windows = (len(self._val) - 1) // self.seq_len
        starts = torch.arange(num_windows) * self.seq_len  # (num_windows,)
        for i, batch_starts in enumerate(starts.split(batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            yield self._windows(self._val, batch_starts)

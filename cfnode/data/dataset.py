"""A token sequence split into train and validation parts, and the windows sampled from it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from cfnode.data.corpus import DataError

# A token sequence: a 1-D torch tensor in memory, or a 1-D numpy array (a memory-mapped token file).
Tokens = Tensor | np.ndarray


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The random source of the batch for optimiser step `step` (1-based): it depends only on the seed and the
    step, so a restarted trainer, or a run rolled back to a checkpoint, draws exactly the batches it would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def check_vocab(tokens: Tokens, vocab_size: int, source: str = "the token sequence") -> None:
    """Refuse a token id outside 0..vocab_size-1: tokens made with another tokenizer, or a damaged file."""
    if len(tokens) == 0:
        return
    if isinstance(tokens, Tensor):
        low, high = int(tokens.min()), int(tokens.max())
    else:
        low, high = int(np.min(tokens)), int(np.max(tokens))
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise DataError(f"{source} holds token id {bad}, outside the run's vocabulary 0..{vocab_size - 1} "
                        f"(vocab_size {vocab_size}): it was made with another tokenizer or is damaged; prepare it "
                        "again with the run's tokenizer")


class TextDataset:
    """A token sequence split into train and validation parts (the last val_fraction of the tokens, no overlap).

    TextDataset(data, seq_len) takes raw bytes, one token per byte; TextDataset.from_tokens takes any 1-D token
    sequence, in memory or memory-mapped. The same tokens give the same windows either way.
    """

    def __init__(self, data: bytes, seq_len: int, val_fraction: float = 0.05) -> None:
        # Kept as uint8 (a byte per token, 8x smaller than int64); windows become int64 when sampled.
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        self._setup(tokens, seq_len, val_fraction, unit="bytes")

    @classmethod
    def from_tokens(cls, tokens: Tokens, seq_len: int, val_fraction: float = 0.05,
                    vocab_size: int | None = None) -> TextDataset:
        """A dataset over a 1-D integer token sequence (torch tensor or numpy array/memmap, kept as it is, not
        copied); with vocab_size, every token id is checked to be below it."""
        if not isinstance(tokens, (Tensor, np.ndarray)):
            raise DataError(f"tokens must be a 1-D torch tensor or numpy array, got {type(tokens).__name__}")
        if tokens.ndim != 1:
            raise DataError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        integer = not (tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool) \
            if isinstance(tokens, Tensor) else np.issubdtype(tokens.dtype, np.integer)
        if not integer:
            raise DataError(f"tokens must have an integer dtype, got {tokens.dtype}")
        if vocab_size is not None:
            check_vocab(tokens, vocab_size)
        dataset = cls.__new__(cls)
        dataset._setup(tokens, seq_len, val_fraction, unit="tokens")
        return dataset

    def _setup(self, tokens: Tokens, seq_len: int, val_fraction: float, unit: str) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")
        self.seq_len = seq_len
        split_at = len(tokens) - int(len(tokens) * val_fraction)
        self._train = tokens[:split_at]  # (N_train,)
        self._val = tokens[split_at:]  # (N_val,)
        for name, split in (("train", self._train), ("validation", self._val)):
            if len(split) < seq_len + 1:
                raise DataError(
                    f"{name} split has {len(split)} tokens, fewer than seq_len + 1 = {seq_len + 1} "
                    f"(corpus of {len(tokens)} {unit}, val_fraction {val_fraction}); use more text or a shorter "
                    "seq_len"
                )

    @property
    def train_tokens(self) -> int:
        return len(self._train)

    @property
    def val_tokens(self) -> int:
        return len(self._val)

    def _split(self, split: str) -> Tokens:
        if split == "train":
            return self._train
        if split == "val":
            return self._val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def _windows(self, tokens: Tokens, starts: Tensor) -> tuple[Tensor, Tensor]:
        # Each window holds seq_len + 1 tokens: inputs are the first seq_len, targets the last seq_len.
        index = starts[:, None] + torch.arange(self.seq_len + 1)  # (B, T + 1)
        if isinstance(tokens, Tensor):
            window = tokens[index].long()  # (B, T + 1)
        else:  # numpy fancy indexing reads just these windows of a memory-mapped file
            window = torch.from_numpy(np.asarray(tokens[index.numpy()], dtype=np.int64))  # (B, T + 1)
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

"""Tokenizers: one token per byte, or a Hugging Face `tokenizers` file pinned by the run spec's sha256 of it.

The run spec names its tokenizer ("byte" or "sha256:<digest>", cfnode/config.py); every trainer, exporter and
generator of the run loads it with load_run_tokenizer, which refuses a file whose digest or size differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Protocol

import torch
from hivemind.utils.logging import get_logger
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch import Tensor

from cfnode.config import BYTE_TOKENIZER, RunSpec
from cfnode.data.corpus import TEXT_PIECE_CHARS, DataError, corpus_bytes, describe_corpus, iter_corpus, iter_text

logger = get_logger(__name__)

END_OF_TEXT = "<|endoftext|>"  # the special token of the BPE tokenizers train_bpe makes
MIN_BPE_VOCAB = 258  # the 256 byte symbols, <|endoftext|> and at least one merge


class Tokenizer(Protocol):
    """What the trainer and the token preparation need of a tokenizer."""

    tokenizer_id: str  # how the run spec names it: "byte" or "sha256:<digest>"
    vocab_size: int

    def encode(self, text: str | bytes) -> Tensor: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, tokens: Tensor | list[int]) -> str: ...


class ByteTokenizer:
    """One token per byte of the UTF-8 encoding: no vocabulary file, any text round-trips."""

    tokenizer_id = BYTE_TOKENIZER
    vocab_size = 256

    def encode(self, text: str | bytes) -> Tensor:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if not data:
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # (N,)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, tokens: Tensor | list[int]) -> str:
        values = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        return bytes(values).decode("utf-8", errors="replace")


class FileTokenizer:
    """A Hugging Face `tokenizers` file (tokenizer.json), with the sha256 of its bytes that names it in a run spec."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read tokenizer file {path}: {e.strerror}") from None
        self._load(raw, f"tokenizer file {path}")

    @classmethod
    def from_file(cls, path: str | Path) -> FileTokenizer:
        return cls(path)

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "tokenizer") -> FileTokenizer:
        """A tokenizer from a file's content; `source` names it in errors."""
        tokenizer = cls.__new__(cls)
        tokenizer._load(raw, source)
        return tokenizer

    def _load(self, raw: bytes, source: str) -> None:
        try:
            self._tokenizer = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for any malformed file
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{source} is not a Hugging Face tokenizers file (tokenizer.json): {message}") from None
        self.raw = raw  # the exact bytes the digest is of, for copying the file on (write_hf_tokenizer)
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.tokenizer_id = f"sha256:{self.sha256}"
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.source = source

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._tokenizer

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str | bytes) -> Tensor:
        if isinstance(text, bytes):
            text = _utf8(text, "the text to encode")
        # No special tokens added: the ids of the text alone, as AutoTokenizer's encode(add_special_tokens=False).
        return torch.tensor(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)  # (N,)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once: tokenizers encodes them in parallel."""
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, tokens: Tensor | list[int]) -> str:
        values = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        return self._tokenizer.decode(values, skip_special_tokens=False)


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not UTF-8 text (byte {e.start}); a tokenizer file encodes text") from None


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes: how a run spec names a tokenizer file ("sha256:<digest>")."""
    path = Path(path).expanduser()
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    return digest.hexdigest()


def load_run_tokenizer(spec: RunSpec, path: str | Path | None) -> ByteTokenizer | FileTokenizer:
    """The run's tokenizer: the byte tokenizer, or the file at `path` if it is the one the spec pins (same sha256,
    same vocabulary size); anything else is refused with what differs."""
    expected = spec.tokenizer_sha256
    if expected is None:
        if path is not None:
            raise DataError(f"the run uses the byte tokenizer (run spec tokenizer {BYTE_TOKENIZER!r}), but a tokenizer "
                            f"file was given ({path}); start without --tokenizer")
        return ByteTokenizer()
    if path is None:
        raise DataError(f"the run's tokenizer is a file (run spec tokenizer sha256:{expected}, vocab_size "
                        f"{spec.vocab_size}); pass that file with --tokenizer FILE")
    tokenizer = FileTokenizer.from_file(path)
    if tokenizer.sha256 != expected or tokenizer.vocab_size != spec.vocab_size:
        raise DataError(f"tokenizer file {path} is not the run's tokenizer: its sha256 is {tokenizer.sha256} and its "
                        f"vocab size {tokenizer.vocab_size}; the run spec pins sha256 {expected} and vocab_size "
                        f"{spec.vocab_size}; use the file the run was bootstrapped with")
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of each byte to a printable character: what the ByteLevel pre-tokenizer turns bytes into."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return dict(sorted(chars.items()))


def byte_tokenizer_json() -> str:
    """A `tokenizers` file that is exactly the byte tokenizer (token id == byte value, 256 tokens), so a byte run's
    model can be exported with a tokenizer that transformers' AutoTokenizer loads."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no merges: every byte stays its own token, whatever surrounds it.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer.to_str()


def write_hf_tokenizer(spec: RunSpec, tokenizer_path: str | Path | None, out_dir: str | Path) -> None:
    """Write the run's tokenizer for transformers into out_dir: tokenizer.json (the run's pinned file byte for byte,
    or byte_tokenizer_json()), tokenizer_config.json and special_tokens_map.json. AutoTokenizer.from_pretrained
    (out_dir) then encodes (add_special_tokens=False) and decodes as cfnode does."""
    tokenizer = load_run_tokenizer(spec, tokenizer_path)  # refuses a file that is not the run's
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, FileTokenizer):
        (out / "tokenizer.json").write_bytes(tokenizer.raw)
        has_eot = tokenizer.token_to_id(END_OF_TEXT) is not None
    else:
        (out / "tokenizer.json").write_text(byte_tokenizer_json())
        has_eot = False
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT} if has_eot else {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": spec.seq_len,
              "clean_up_tokenization_spaces": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _training_text(source: str | Path | Iterable[str] | Iterable[Path] | None) -> tuple[Iterator[str], int | None]:
    """The text to train on, piece by piece, and about how many pieces to expect (a hint for the progress bar)."""
    if source is None or isinstance(source, (str, Path)):
        source = [source]
    elif isinstance(source, (list, tuple)) and source and all(isinstance(item, Path) for item in source):
        pass  # several corpora, one after another
    else:
        return iter(source), len(source) if isinstance(source, Sized) else None

    def pieces() -> Iterator[str]:
        for path in source:
            yield from iter_text(iter_corpus(path), describe_corpus(path))

    return pieces(), max(1, sum(map(corpus_bytes, source)) // TEXT_PIECE_CHARS)


def train_bpe(source: str | Path | Iterable[str] | Iterable[Path] | None, vocab_size: int, out_path: str | Path,
              progress: bool = True) -> FileTokenizer:
    """Train a byte-level BPE tokenizer and write it to out_path (tokenizer.json); returns it.

    source: a text file or a folder of .txt files (the sources load_corpus reads; None: the default corpus), or a
    list of such Paths, streamed so they need not fit in memory; or else an iterable of strings, the text.
    Byte-level with every byte in the initial alphabet, so any text encodes; `<|endoftext|>` is a special token. The
    vocabulary can come out smaller than vocab_size when the text has too few distinct pairs to merge.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"vocab_size must be an integer of at least {MIN_BPE_VOCAB} (256 byte symbols, "
                        f"{END_OF_TEXT} and at least one merge), got {vocab_size!r}")
    out = Path(out_path).expanduser()
    if out.is_dir():
        raise DataError(f"{out} is a folder; name the tokenizer file to write (e.g. {out / 'tokenizer.json'})")
    texts, length = _training_text(source)
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=progress,
                                  special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    named = source is None or isinstance(source, (str, Path))
    logger.info(f"training a byte-level BPE tokenizer of {vocab_size} tokens on "
                f"{describe_corpus(source) if named else 'the given text or files'}")
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        tokenizer.save(str(partial))
        os.replace(partial, out)  # a reader never sees half a file
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror}") from None
    trained = FileTokenizer.from_file(out)
    if trained.vocab_size < vocab_size:
        logger.warning(f"the text had too few pairs to merge: the tokenizer has {trained.vocab_size} tokens, "
                       f"not {vocab_size}; train on more text for a larger vocabulary")
    return trained


def pin_tokenizer(spec: RunSpec, path: str | Path) -> RunSpec:
    """The spec with the tokenizer file at `path` as the run's: tokenizer "sha256:<its digest>" and vocab_size its
    vocabulary size, over what the spec said (`cfnode bootstrap --tokenizer FILE`)."""
    tokenizer = FileTokenizer(path)
    before = f" (the config said tokenizer {spec.tokenizer}, vocab_size {spec.vocab_size})" \
        if (spec.tokenizer, spec.vocab_size) != (tokenizer.tokenizer_id, tokenizer.vocab_size) else ""
    logger.info(f"run tokenizer: {path}, {tokenizer.tokenizer_id}, vocab_size {tokenizer.vocab_size}{before}")
    return spec.replace(tokenizer=tokenizer.tokenizer_id, vocab_size=tokenizer.vocab_size)

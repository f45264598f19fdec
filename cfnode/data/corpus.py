"""Raw-text corpora: the default one that needs no download, a text file, or a folder of .txt files."""

from __future__ import annotations

import codecs
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

# Default corpus: the interpreter's own standard library sources, present wherever Python is.
# Top-level modules first, then a few pure-Python packages, each folder's files sorted by name.
DEFAULT_CORPUS_SUBDIRS = ("json", "email", "http", "logging", "asyncio", "importlib", "unittest")


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


CHUNK_BYTES = 1 << 20  # what iter_corpus reads at a time


def describe_corpus(path: str | Path | None) -> str:
    """How logs and token files name a corpus source."""
    return "the default corpus (Python standard library sources)" if path is None \
        else str(Path(path).expanduser().resolve())


def iter_corpus(path: str | Path | None = None, max_bytes: int | None = None,
                chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes load_corpus(path, max_bytes) returns, read a chunk of at most chunk_bytes at a time as they are
    consumed, so a corpus larger than memory streams through. max_bytes None: the whole corpus."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
        raise DataError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise DataError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    limit = sys.maxsize if max_bytes is None else max_bytes
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        yield from _stream_files(_stdlib_sources(), root, limit, chunk_bytes,
                                 f"no Python sources found under {root} for the default corpus; pass a corpus path")
        return
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(f"corpus folder {path} holds no .txt files")
        yield from _stream_files(files, path, limit, chunk_bytes, f"corpus folder {path} holds only empty .txt files")
        return
    if not path.exists():
        raise DataError(f"corpus path {path} does not exist")
    total = 0
    for chunk in _read_chunks(path, limit, chunk_bytes):
        total += len(chunk)
        yield chunk
    if total == 0:
        raise DataError(f"corpus file {path} is empty")


def _read_chunks(file: Path, limit: int, chunk_bytes: int) -> Iterator[bytes]:
    """The file's bytes, at most `limit` of them, chunk by chunk."""
    try:
        f = file.open("rb")
    except OSError as e:
        raise DataError(f"cannot read corpus file {file}: {e.strerror}") from None
    with f:
        while limit > 0:
            try:
                chunk = f.read(min(chunk_bytes, limit))
            except OSError as e:
                raise DataError(f"cannot read corpus file {file}: {e.strerror}") from None
            if not chunk:
                return
            limit -= len(chunk)
            yield chunk


def _stream_files(files: list[Path], root: Path, limit: int, chunk_bytes: int, empty_error: str) -> Iterator[bytes]:
    """_concatenate's bytes, streamed: each non-empty file preceded by its header, cut off at `limit` bytes."""
    total = 0
    for file in files:
        if total >= limit:
            return
        started = False
        for chunk in _read_chunks(file, limit - total, chunk_bytes):
            if not started:  # empty files get no header, as in _concatenate
                header = f"\n\n# ==== {file.relative_to(root).as_posix()} ====\n\n".encode()[: limit - total]
                started = True
                total += len(header)
                yield header
            chunk = chunk[: limit - total]
            if not chunk:
                break
            total += len(chunk)
            yield chunk
    if total == 0:
        raise DataError(empty_error)


TEXT_PIECE_CHARS = 1 << 16  # about how much text iter_text hands out at a time
# A line start after which a text may be cut: a newline followed by a non-space character. Byte-level BPE never
# joins a newline and the character after it into one pre-token when that character is not whitespace, so
# encoding the pieces one by one gives the tokens of the whole text.
_LINE_START = re.compile(r"\n(?=\S)")


def iter_text(chunks: Iterable[bytes], source: str, piece_chars: int = TEXT_PIECE_CHARS) -> Iterator[str]:
    """Decode a stream of UTF-8 chunks into text pieces of about piece_chars characters, each cut at a line start
    (a line with no line start in it for very long is cut at piece_chars). Raises DataError for text that is not
    UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer = ""
    offset = 0  # bytes decoded so far, for the error message
    for chunk in _with_end(chunks):
        try:
            buffer += decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise DataError(f"{source} is not UTF-8 text (near byte {offset + e.start}); a tokenizer file encodes "
                            "text, the byte tokenizer reads any bytes") from None
        offset += len(chunk)
        start = 0
        while len(buffer) - start > piece_chars:
            cut = _LINE_START.search(buffer, start + piece_chars)
            if cut is None:
                if len(buffer) - start < 64 * piece_chars:
                    break  # wait for a line start in the chunks to come
                end = start + piece_chars  # no line start for a long way: cut anyway, memory stays bounded
            else:
                end = cut.end()
            yield buffer[start:end]
            start = end
        buffer = buffer[start:]
    if buffer:
        yield buffer


def _with_end(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The chunks, then an empty one that tells the decoder the stream has ended."""
    for chunk in chunks:
        if chunk:
            yield chunk
    yield b""


def corpus_bytes(path: str | Path | None) -> int:
    """About how many bytes the corpus at `path` holds (the files' sizes, without headers): for progress reports."""
    if path is None:
        files = _stdlib_sources()
    else:
        path = Path(path).expanduser()
        files = [p for p in path.rglob("*.txt") if p.is_file()] if path.is_dir() else [path]
    total = 0
    for file in files:
        try:
            total += file.stat().st_size
        except OSError:
            pass
    return total

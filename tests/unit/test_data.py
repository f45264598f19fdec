import json
import logging

import numpy as np
import pytest
import torch

from cfnode.config import RunSpec
from cfnode.data import (
    ByteTokenizer,
    DataError,
    FileTokenizer,
    TextDataset,
    TokenFile,
    batch_generator,
    iter_corpus,
    load_corpus,
    load_run_dataset,
    prepare_tokens,
    train_bpe,
)
from cfnode.data import tokens as tokens_module
from cfnode.data.corpus import iter_text


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld → ✓"
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.max() < tok.vocab_size == 256
    assert len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.encode(b"ab").tolist() == [97, 98]
    assert tok.encode("").numel() == 0
    assert tok.decode([0xFF]) == "\ufffd"


def test_default_corpus_loads():
    data = load_corpus()
    assert isinstance(data, bytes) and 0 < len(data) <= 4_000_000
    assert load_corpus(max_bytes=1000) == data[:1000]


def test_corpus_from_folder_and_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "ignored.md").write_text("nope")
    data = load_corpus(tmp_path)
    assert data.index(b"first") < data.index(b"second") < data.index(b"third")
    assert b"nope" not in data
    assert load_corpus(tmp_path / "a.txt") == b"first"


def test_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="no .txt files"):
        load_corpus(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="empty"):
        load_corpus(tmp_path)
    assert issubclass(DataError, ValueError)


def test_split_does_not_overlap():
    data = b"t" * 750 + b"v" * 250  # the last quarter is validation
    ds = TextDataset(data, seq_len=8, val_fraction=0.25)
    assert (ds.train_tokens, ds.val_tokens) == (750, 250)
    assert ds.train_tokens + ds.val_tokens == len(data)
    train_x, train_y = ds.sample_batch(64, torch.Generator().manual_seed(0), split="train")
    assert set(train_x.unique().tolist()) | set(train_y.unique().tolist()) == {ord("t")}
    val_x, val_y = ds.sample_batch(64, torch.Generator().manual_seed(0), split="val")
    assert set(val_x.unique().tolist()) | set(val_y.unique().tolist()) == {ord("v")}
    batches = list(ds.val_batches(batch_size=1000))
    assert len(batches) == 1 and batches[0][0].shape == ((250 - 1) // 8, 8)
    assert set(batches[0][1].unique().tolist()) == {ord("v")}


def test_too_small_split_raises():
    with pytest.raises(DataError, match="validation split"):
        TextDataset(b"x" * 100, seq_len=16, val_fraction=0.1)
    with pytest.raises(DataError, match="train split"):
        TextDataset(b"x" * 100, seq_len=16, val_fraction=0.9)


def test_sample_batch_shapes_and_shift():
    data = bytes(range(256)) * 8  # token i is followed by (i + 1) % 256
    ds = TextDataset(data, seq_len=16)
    for split in ("train", "val"):
        inputs, targets = ds.sample_batch(5, torch.Generator().manual_seed(0), split=split)
        assert inputs.shape == targets.shape == (5, 16)
        assert inputs.dtype == targets.dtype == torch.long
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        assert torch.equal(targets, (inputs + 1) % 256)
    a = ds.sample_batch(4, torch.Generator().manual_seed(1))
    b = ds.sample_batch(4, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError):
        ds.sample_batch(1, torch.Generator(), split="test")


def test_val_batches_deterministic_and_disjoint():
    ds = TextDataset(bytes(range(256)) * 40, seq_len=16, val_fraction=0.1)
    first = list(ds.val_batches(batch_size=4, max_batches=3))
    second = list(ds.val_batches(batch_size=4, max_batches=3))
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.shape == y1.shape == (4, 16)
    all_batches = list(ds.val_batches(batch_size=4))
    assert sum(x.shape[0] for x, _ in all_batches) == (ds.val_tokens - 1) // 16


def test_batch_of_a_step_depends_only_on_seed_and_step():
    dataset = TextDataset(b"abcdefghij" * 200, 16)
    first = dataset.sample_batch(4, batch_generator(3, 10))
    again = dataset.sample_batch(4, batch_generator(3, 10))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], dataset.sample_batch(4, batch_generator(3, 11))[0])
    assert not torch.equal(first[0], dataset.sample_batch(4, batch_generator(4, 10))[0])


# --- streaming the corpus ----------------------------------------------------------------------------------------


def _corpus_folder(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second file\n" * 50)
    (folder / "a.txt").write_text("first file, naïve ✓\n" * 40)
    (folder / "empty.txt").write_text("")
    (folder / "sub" / "c.txt").write_text("third\n" * 30)
    return folder


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1000, 1 << 20])
def test_iter_corpus_streams_exactly_what_load_corpus_reads(tmp_path, chunk_bytes):
    folder = _corpus_folder(tmp_path)
    whole = load_corpus(folder)
    assert b"".join(iter_corpus(folder, chunk_bytes=chunk_bytes)) == whole
    assert all(len(c) <= chunk_bytes for c in iter_corpus(folder, chunk_bytes=chunk_bytes)
               if not c.startswith(b"\n\n# ===="))
    # Cut inside a header and inside a file's text, as load_corpus cuts.
    for max_bytes in (1, 5, 30, len(whole) // 2, len(whole) - 1, len(whole) + 10):
        assert b"".join(iter_corpus(folder, max_bytes=max_bytes, chunk_bytes=chunk_bytes)) == \
            load_corpus(folder, max_bytes=max_bytes)
    file = folder / "a.txt"
    assert b"".join(iter_corpus(file, chunk_bytes=chunk_bytes)) == load_corpus(file)
    assert b"".join(iter_corpus(file, max_bytes=33, chunk_bytes=chunk_bytes)) == load_corpus(file, max_bytes=33)


def test_iter_corpus_default_corpus_and_errors(tmp_path):
    assert b"".join(iter_corpus(None, max_bytes=4_000_000)) == load_corpus()
    with pytest.raises(DataError, match="does not exist"):
        list(iter_corpus(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="no .txt files"):
        list(iter_corpus(tmp_path))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        list(iter_corpus(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="only empty"):
        list(iter_corpus(tmp_path))
    with pytest.raises(DataError, match="max_bytes"):
        list(iter_corpus(tmp_path, max_bytes=0))


def test_iter_text_cuts_at_line_starts_and_encodes_as_the_whole_text(tmp_path):
    text = "".join(f"line {i}: naïve café 🎉\n    indented {i}\n\n" for i in range(300))
    data = text.encode()
    chunks = [data[i:i + 13] for i in range(0, len(data), 13)]  # cuts inside characters too
    pieces = list(iter_text(chunks, "test", piece_chars=100))
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(a.endswith("\n") and not b[0].isspace() for a, b in zip(pieces, pieces[1:]))
    corpus = tmp_path / "text.txt"
    corpus.write_text(text)
    tok = train_bpe(corpus, 300, tmp_path / "tok.json", progress=False)
    # Pieces cut at line starts encode, one by one, to the tokens of the whole text.
    assert sum(tok.encode_batch(pieces), []) == tok.encode(text).tolist()
    # A line with no line start for long is still cut, so memory stays bounded.
    long_line = list(iter_text([b"x" * 10_000], "test", piece_chars=10))
    assert "".join(long_line) == "x" * 10_000 and max(map(len, long_line)) <= 640
    with pytest.raises(DataError, match="not UTF-8 text"):
        list(iter_text([b"ok\n", b"\xff\xfe"], "bad.txt"))
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_text([b"cut \xe2\x82"], "cut.txt"))  # a character cut off at the end


# --- datasets from token sequences -------------------------------------------------------------------------------


def _same_windows(a: TextDataset, b: TextDataset, batch_size: int = 6) -> None:
    assert (a.train_tokens, a.val_tokens) == (b.train_tokens, b.val_tokens)
    for seed in range(3):
        for split in ("train", "val"):
            x1, y1 = a.sample_batch(batch_size, batch_generator(seed, 1), split=split)
            x2, y2 = b.sample_batch(batch_size, batch_generator(seed, 1), split=split)
            assert x1.dtype == x2.dtype == torch.long
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    val_a, val_b = list(a.val_batches(4)), list(b.val_batches(4))
    assert len(val_a) == len(val_b) > 0
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(val_a, val_b))


def test_from_tokens_gives_the_windows_of_the_byte_dataset():
    data = bytes(range(256)) * 20
    by_bytes = TextDataset(data, seq_len=16)
    as_tensor = torch.tensor(list(data), dtype=torch.int64)
    _same_windows(by_bytes, TextDataset.from_tokens(as_tensor, 16))
    _same_windows(by_bytes, TextDataset.from_tokens(np.frombuffer(data, dtype=np.uint8).astype(np.uint16), 16))
    with pytest.raises(DataError, match="1-D"):
        TextDataset.from_tokens(as_tensor.view(2, -1), 16)
    with pytest.raises(DataError, match="integer dtype"):
        TextDataset.from_tokens(as_tensor.float(), 16)
    with pytest.raises(DataError, match="validation split"):
        TextDataset.from_tokens(as_tensor[:100], 16, val_fraction=0.1)
    with pytest.raises(DataError, match="token id 300, outside the run's vocabulary 0..255"):
        TextDataset.from_tokens(torch.tensor([1, 2, 300] * 100), 16, vocab_size=256)
    with pytest.raises(DataError, match="token id -1"):
        TextDataset.from_tokens(torch.tensor([1, -1] * 100), 16, vocab_size=256)


def test_prepared_byte_tokens_give_the_windows_of_the_in_memory_dataset(tmp_path):
    folder = _corpus_folder(tmp_path)
    prepared = prepare_tokens(folder, ByteTokenizer(), "byte", tmp_path / "tokens", progress=False)
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    data = load_corpus(folder)
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 256 and meta["dtype"] == "uint16"
    assert meta["num_tokens"] == len(data) == prepared.num_tokens and meta["source"] == str(folder)
    assert (tmp_path / "tokens" / "tokens.bin").stat().st_size == 2 * len(data)
    opened = TokenFile.open(tmp_path / "tokens")
    assert isinstance(opened.tokens, np.memmap) and opened.tokens.dtype == np.uint16
    assert bytes(opened.tokens.astype(np.uint8)) == data
    _same_windows(TextDataset(data, 16), TextDataset.from_tokens(opened.tokens, 16))
    # What the trainer builds from either: the same windows again.
    spec = RunSpec(seq_len=16)
    _same_windows(load_run_dataset(spec, ByteTokenizer(), folder),
                  load_run_dataset(spec, ByteTokenizer(), tmp_path / "tokens"))
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == ["meta.json", "tokens.bin"]


def test_prepared_bpe_tokens_match_the_in_memory_tokenization(tmp_path):
    text = "".join(f"Paragraph {i}: the naïve café serves 🎉 and ☕.\n  more text {i * 7}\n" for i in range(400))
    corpus = tmp_path / "text.txt"
    corpus.write_text(text)
    tok_path = tmp_path / "tok.json"
    tok = train_bpe(corpus, 320, tok_path, progress=False)
    spec = RunSpec(tokenizer=tok.tokenizer_id, vocab_size=tok.vocab_size, seq_len=32)
    prepared = prepare_tokens(corpus, tok, tok.tokenizer_id, tmp_path / "tokens", progress=False)
    assert prepared.tokenizer == tok.tokenizer_id and prepared.vocab_size == tok.vocab_size
    assert prepared.tokens.tolist() == tok.encode(text).tolist()
    in_memory = load_run_dataset(spec, tok, corpus)
    _same_windows(in_memory, TextDataset.from_tokens(tok.encode(text), 32))
    _same_windows(in_memory, load_run_dataset(spec, tok, tmp_path / "tokens"))


def test_prepared_tokens_of_another_tokenizer_are_refused(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("some text to tokenize, over and over\n" * 200)
    tok = train_bpe(corpus, 300, tmp_path / "tok.json", progress=False)
    prepare_tokens(corpus, ByteTokenizer(), "byte", tmp_path / "bytes", progress=False)
    spec = RunSpec(tokenizer=tok.tokenizer_id, vocab_size=tok.vocab_size, seq_len=16)
    with pytest.raises(DataError, match=f"made with tokenizer byte \\(vocab size 256\\), but the run uses "
                                        f"tokenizer {tok.tokenizer_id} \\(vocab size {tok.vocab_size}\\)"):
        load_run_dataset(spec, tok, tmp_path / "bytes")
    prepare_tokens(corpus, tok, tok.tokenizer_id, tmp_path / "bpe", progress=False)
    with pytest.raises(DataError, match="made with tokenizer sha256:"):
        load_run_dataset(RunSpec(seq_len=16), ByteTokenizer(), tmp_path / "bpe")
    with pytest.raises(DataError, match="does not name the tokenizer given"):
        prepare_tokens(corpus, tok, "byte", tmp_path / "x", progress=False)


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("abc" * 300)
    prepare_tokens(corpus, ByteTokenizer(), "byte", tmp_path / "tokens", progress=False)
    tokens_bin = tmp_path / "tokens" / "tokens.bin"
    damaged = np.fromfile(tokens_bin, dtype="<u2")
    damaged[123] = 999
    damaged.tofile(tokens_bin)
    with pytest.raises(DataError, match="holds token id 999, outside the run's vocabulary 0..255"):
        load_run_dataset(RunSpec(seq_len=16), ByteTokenizer(), tmp_path / "tokens")


class WideTokenizer:
    """A stand-in for a tokenizer file with more than 65,536 tokens: one token per character, ids above 2**16."""

    tokenizer_id = "sha256:" + "ab" * 32
    vocab_size = 70_000

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[66_000 + ord(c) % 4000 for c in text] for text in texts]


def test_a_vocabulary_over_65536_tokens_is_stored_as_uint32(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("wide tokens ✓\n" * 100)
    prepared = prepare_tokens(corpus, WideTokenizer(), WideTokenizer.tokenizer_id, tmp_path / "tokens",
                              progress=False)
    expected = WideTokenizer().encode_batch([corpus.read_text()])[0]
    assert prepared.dtype == "uint32" and prepared.tokens.dtype == np.uint32 and max(expected) > 65_535
    assert prepared.tokens.tolist() == expected
    assert (tmp_path / "tokens" / "tokens.bin").stat().st_size == 4 * len(expected)
    dataset = TextDataset.from_tokens(prepared.tokens, 16, vocab_size=70_000)
    _same_windows(dataset, TextDataset.from_tokens(torch.tensor(expected), 16))
    inputs, _ = dataset.sample_batch(4, batch_generator(0, 1))
    assert int(inputs.max()) > 65_535


def test_token_files_are_checked_and_written_whole(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("hello\n" * 100)
    out = tmp_path / "tokens"
    prepare_tokens(corpus, ByteTokenizer(), "byte", out, progress=False)
    with open(out / "tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="changed or cut short"):
        TokenFile.open(out)
    (out / "meta.json").write_text("{")
    with pytest.raises(DataError, match="is not JSON"):
        TokenFile.open(out)
    (out / "meta.json").write_text(json.dumps({"format": "cfnode-tokens", "version": 99}))
    with pytest.raises(DataError, match="format version 99"):
        TokenFile.open(out)
    # Preparing again over it replaces it whole.
    prepare_tokens(corpus, ByteTokenizer(), "byte", out, progress=False)
    assert TokenFile.open(out).num_tokens == 600
    # A preparation that fails (text that is not UTF-8, for a tokenizer file) leaves no partial files behind, and
    # the folder it was writing is not taken for text.
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n" * 10 + b"\xff broken")
    tok = train_bpe(corpus, 260, tmp_path / "tok.json", progress=False)
    with pytest.raises(DataError, match="not UTF-8 text"):
        prepare_tokens(bad, tok, tok.tokenizer_id, tmp_path / "failed", progress=False)
    assert list((tmp_path / "failed").iterdir()) == []
    (out / "meta.json").unlink()
    with pytest.raises(DataError, match="no meta.json: its preparation did not finish"):
        load_run_dataset(RunSpec(seq_len=16), ByteTokenizer(), out)
    with pytest.raises(DataError, match="not a folder"):
        prepare_tokens(corpus, ByteTokenizer(), "byte", corpus, progress=False)


def test_prepare_logs_progress(tmp_path, monkeypatch, caplog):
    corpus = tmp_path / "text.txt"
    corpus.write_text("progress line\n" * 5000)
    monkeypatch.setattr(tokens_module, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(tokens_module, "ENCODE_BATCH", 1)
    tok = train_bpe(corpus, 280, tmp_path / "tok.json", progress=False)
    with caplog.at_level(logging.INFO, logger="cfnode.data.tokens"):
        prepared = prepare_tokens(corpus, tok, tok.tokenizer_id, tmp_path / "tokens", progress=True)
    messages = [r.getMessage() for r in caplog.records if r.name == "cfnode.data.tokens"]
    assert any(m.startswith("prepared ") and "MiB/s" in m and "tokens/s" in m for m in messages[1:-1]), messages
    assert f"prepared {prepared.num_tokens:,} tokens from {len(corpus.read_bytes()):,} bytes" in messages[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cfnode.data.tokens"):
        prepare_tokens(corpus, tok, tok.tokenizer_id, tmp_path / "quiet", progress=False)
    assert len([r for r in caplog.records if r.name == "cfnode.data.tokens"]) == 2  # the start and the summary


def test_in_memory_text_with_a_tokenizer_file(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("short text for the trainer ✓\n" * 200)
    tok = train_bpe(corpus, 290, tmp_path / "tok.json", progress=False)
    spec = RunSpec(tokenizer=tok.tokenizer_id, vocab_size=tok.vocab_size, seq_len=16)
    dataset = load_run_dataset(spec, FileTokenizer(tmp_path / "tok.json"), corpus)
    assert dataset.train_tokens + dataset.val_tokens == len(tok.encode(corpus.read_text()))
    # load_corpus stops at max_bytes, maybe inside a character: that partial character is dropped, not an error.
    assert tokens_module._trim_partial_utf8("ab✓".encode()[:-1]) == b"ab"
    assert tokens_module._trim_partial_utf8("ab✓".encode()) == "ab✓".encode()
    assert tokens_module._trim_partial_utf8("a🎉".encode()[:-2]) == b"a"
    assert tokens_module._trim_partial_utf8(b"abc") == b"abc"

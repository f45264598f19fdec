import pytest
import torch

from cfnode.data import ByteTokenizer, DataError, TextDataset, batch_generator, load_corpus


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

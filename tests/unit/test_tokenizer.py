import hashlib
import json
import os

import pytest
import torch
from tokenizers import pre_tokenizers

from cfnode.config import RunSpec
from cfnode.data import (
    ByteTokenizer,
    DataError,
    FileTokenizer,
    byte_tokenizer_json,
    file_sha256,
    load_run_tokenizer,
    train_bpe,
    write_hf_tokenizer,
)
from cfnode.data.tokenizer import END_OF_TEXT, _bytes_to_unicode, pin_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach for the hub here

TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on.\n"
    "def train(model, data):\n    for batch in data:\n        model.step(batch)\n"
    "Ünïcödé façade — naïve café, smörgåsbord, 🎉 party 🚀 launch.\n"
) * 40
# Characters the tokenizer never saw in training still encode, through their bytes.
UNSEEN_TEXT = "日本語のテキスト 🦀🧪 Ωμέγα\tnull\x00byte «quotes» \r\n  trailing spaces  "


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TRAINING_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe_file(corpus_file):
    out = corpus_file.parent / "tokenizer.json"
    train_bpe(corpus_file, 300, out, progress=False)
    return out


@pytest.fixture(scope="module")
def other_bpe_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("other") / "tokenizer.json"
    train_bpe(["an entirely different text about weather, rain and snow\n" * 50], 300, out, progress=False)
    return out


def pinned_spec(path, **changes) -> RunSpec:
    tokenizer = FileTokenizer(path)
    return RunSpec(tokenizer=tokenizer.tokenizer_id, vocab_size=tokenizer.vocab_size, seq_len=64).replace(**changes)


def test_trained_bpe_round_trips_any_text(bpe_file, corpus_file):
    tok = FileTokenizer(bpe_file)
    assert tok.vocab_size == 300
    assert tok.sha256 == file_sha256(bpe_file) == hashlib.sha256(bpe_file.read_bytes()).hexdigest()
    assert tok.tokenizer_id == f"sha256:{tok.sha256}"
    assert tok.token_to_id(END_OF_TEXT) is not None
    for text in (TRAINING_TEXT, UNSEEN_TEXT, "", "a", "  ", END_OF_TEXT + "after"):
        ids = tok.encode(text)
        assert ids.dtype == torch.long and ids.ndim == 1
        assert ids.numel() == 0 or int(ids.max()) < tok.vocab_size
        assert tok.decode(ids) == text
        assert tok.decode(ids.tolist()) == text
    # It learnt merges (44 of them): the training text takes clearly fewer tokens than bytes.
    assert len(tok.encode(TRAINING_TEXT)) < 0.7 * len(TRAINING_TEXT.encode())
    texts = [TRAINING_TEXT[:500], UNSEEN_TEXT, "x"]
    assert tok.encode_batch(texts) == [tok.encode(t).tolist() for t in texts]
    assert tok.encode(UNSEEN_TEXT.encode()).tolist() == tok.encode(UNSEEN_TEXT).tolist()


def test_bpe_training_sources_and_bad_arguments(tmp_path, corpus_file):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(TRAINING_TEXT[:2000])
    (folder / "sub" / "b.txt").write_text(TRAINING_TEXT[2000:])
    from_folder = train_bpe(folder, 280, tmp_path / "folder.json", progress=False)
    assert from_folder.vocab_size == 280 and from_folder.decode(from_folder.encode(UNSEEN_TEXT)) == UNSEEN_TEXT
    # A list of files is read one after another: the same as training on their texts.
    files = [folder / "a.txt", folder / "sub" / "b.txt"]
    from_files = train_bpe(files, 280, tmp_path / "files.json", progress=False)
    from_texts = train_bpe([f.read_text() for f in files], 280, tmp_path / "texts.json", progress=False)
    assert from_files.sha256 == from_texts.sha256 != from_folder.sha256
    # The same text gives the same file, so every trainer can rebuild the same digest.
    again = train_bpe(corpus_file, 300, tmp_path / "again.json", progress=True)
    assert again.sha256 == FileTokenizer(corpus_file.parent / "tokenizer.json").sha256
    assert not list(tmp_path.glob("*.partial"))
    # Too little text for the vocabulary asked for: a smaller one, not an error.
    small = train_bpe(["abab abab"], 400, tmp_path / "small.json", progress=False)
    assert 257 <= small.vocab_size < 400
    with pytest.raises(DataError, match="at least 258"):
        train_bpe(corpus_file, 100, tmp_path / "x.json", progress=False)
    with pytest.raises(DataError, match="is a folder"):
        train_bpe(corpus_file, 300, tmp_path, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        train_bpe(tmp_path / "missing.txt", 300, tmp_path / "x.json", progress=False)


def test_run_tokenizer_is_pinned_by_digest_and_size(bpe_file, other_bpe_file, tmp_path):
    assert isinstance(load_run_tokenizer(RunSpec(), None), ByteTokenizer)
    with pytest.raises(DataError, match="the run uses the byte tokenizer"):
        load_run_tokenizer(RunSpec(), bpe_file)
    spec = pinned_spec(bpe_file)
    assert load_run_tokenizer(spec, bpe_file).sha256 == spec.tokenizer_sha256
    with pytest.raises(DataError, match="pass that file with --tokenizer"):
        load_run_tokenizer(spec, None)
    ours, theirs = file_sha256(bpe_file), file_sha256(other_bpe_file)
    assert ours != theirs
    with pytest.raises(DataError, match="is not the run's tokenizer") as refused:
        load_run_tokenizer(spec, other_bpe_file)
    assert ours in str(refused.value) and theirs in str(refused.value)
    # One byte changed (a copy edited by hand) is another tokenizer too.
    edited = tmp_path / "edited.json"
    edited.write_bytes(bpe_file.read_bytes() + b"\n")
    with pytest.raises(DataError, match=file_sha256(edited)):
        load_run_tokenizer(spec, edited)
    # The right file under a spec whose vocab_size is not the file's.
    with pytest.raises(DataError, match="vocab size 300; the run spec pins .* and vocab_size 512"):
        load_run_tokenizer(spec.replace(vocab_size=512), bpe_file)
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(DataError, match="is not a Hugging Face tokenizers file"):
        FileTokenizer(junk)
    with pytest.raises(DataError, match="cannot read tokenizer file"):
        FileTokenizer(tmp_path / "missing.json")


def test_pin_tokenizer_sets_the_digest_and_vocab_size(bpe_file):
    spec = pin_tokenizer(RunSpec(vocab_size=256), bpe_file)
    assert spec.tokenizer == f"sha256:{file_sha256(bpe_file)}" and spec.vocab_size == 300
    assert RunSpec.from_dict(spec.to_dict()) == spec


def test_byte_tokenizer_json_is_exactly_the_byte_tokenizer():
    chars = _bytes_to_unicode()
    assert sorted(chars) == list(range(256))
    assert set(chars.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert byte_tokenizer_json() == byte_tokenizer_json()
    tok = FileTokenizer.from_bytes(byte_tokenizer_json().encode(), "the byte tokenizer's file")
    assert tok.vocab_size == 256
    assert all(tok.token_to_id(chars[b]) == b for b in range(256))
    byte = ByteTokenizer()
    for text in (TRAINING_TEXT, UNSEEN_TEXT, "", " ", "  a  b  ", "\n\n\n", "x" * 3000):
        assert tok.encode(text).tolist() == byte.encode(text).tolist()
        assert tok.decode(byte.encode(text)) == text
    assert tok.decode(list(range(256))) == byte.decode(list(range(256)))


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_transformers_loads_the_written_tokenizer(kind, bpe_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = RunSpec(seq_len=64) if kind == "byte" else pinned_spec(bpe_file)
    path = None if kind == "byte" else bpe_file
    out = tmp_path / "hf"
    write_hf_tokenizer(spec, path, out)
    if kind == "bpe":
        assert (out / "tokenizer.json").read_bytes() == bpe_file.read_bytes()  # the pinned file, as it is
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 64 and config["clean_up_tokenization_spaces"] is False
    hf = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ours = load_run_tokenizer(spec, path)
    for text in (TRAINING_TEXT[:3000], UNSEEN_TEXT, "hello world", "  spaces   everywhere  "):
        ids = ours.encode(text).tolist()
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == text
    if kind == "bpe":
        assert hf.eos_token == hf.bos_token == END_OF_TEXT
        assert hf.eos_token_id == ours.token_to_id(END_OF_TEXT)
    else:
        assert hf.eos_token is None and len(hf) == 256


def test_write_hf_tokenizer_refuses_another_file(bpe_file, other_bpe_file, tmp_path):
    with pytest.raises(DataError, match="is not the run's tokenizer"):
        write_hf_tokenizer(pinned_spec(bpe_file), other_bpe_file, tmp_path / "hf")
    with pytest.raises(DataError, match="byte tokenizer"):
        write_hf_tokenizer(RunSpec(), bpe_file, tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenizer.json").exists()

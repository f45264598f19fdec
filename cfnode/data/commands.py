"""`cfnode tokenizer train` and `cfnode data prepare`: make a run's tokenizer file and its prepared token files.

Only click is imported here at first: the work (torch, numpy, tokenizers) loads when a command runs.
"""

from __future__ import annotations

import click

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"])


def _setup(log_level: str) -> None:
    from cfnode.cli import _setup_logging

    _setup_logging(log_level)


@click.group(name="tokenizer")
def tokenizer() -> None:
    """Train a run's tokenizer (the run spec pins it by the sha256 of its file)."""


@tokenizer.command(name="train")
@click.option("--data", "data_path", type=click.Path(exists=True), envvar="CFNODE_DATA",
              help="Text file or folder of .txt files to train on, streamed. Default: the built-in corpus.")
@click.option("--vocab-size", type=click.IntRange(min=258), required=True,
              help="Tokens in the vocabulary: the 256 byte symbols, <|endoftext|> and the merges learnt.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="tokenizer.json", show_default=True,
              help="The tokenizer file to write (Hugging Face tokenizers format).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show the trainer's progress bar.")
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True, envvar="CFNODE_LOG_LEVEL")
def train_tokenizer(data_path: str | None, vocab_size: int, out_path: str, progress: bool, log_level: str) -> None:
    """Train a byte-level BPE tokenizer on local text and write it to --out."""
    from cfnode.cli import _run
    from cfnode.data.tokenizer import train_bpe

    _setup(log_level)
    trained = _run("tokenizer train", lambda: train_bpe(data_path, vocab_size, out_path, progress=progress))
    click.echo(f"wrote {out_path}: vocab size {trained.vocab_size}, sha256 {trained.sha256}")
    click.echo("use it for a run:\n"
               f"  cfnode data prepare --tokenizer {out_path} --data TEXT --out TOKENS_DIR   # tokenize once\n"
               f"  cfnode bootstrap --tokenizer {out_path} --trainer FILE ...   # pins tokenizer sha256:"
               f"{trained.sha256[:12]}... and vocab_size {trained.vocab_size}\n"
               f"  cfnode train --tokenizer {out_path} --data TOKENS_DIR ...   # every trainer holds the same file")


@click.group(name="data")
def data() -> None:
    """Prepare training data."""


@data.command(name="prepare")
@click.option("--data", "data_path", type=click.Path(exists=True), envvar="CFNODE_DATA",
              help="Text file or folder of .txt files, streamed. Default: the built-in corpus.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False),
              envvar="CFNODE_TOKENIZER", help="The run's tokenizer file. Default: the byte tokenizer.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder to write tokens.bin and meta.json to (created if missing).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Log bytes read and tokens written every few seconds.")
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True, envvar="CFNODE_LOG_LEVEL")
def prepare(data_path: str | None, tokenizer_path: str | None, out_dir: str, progress: bool, log_level: str) -> None:
    """Tokenize a corpus once into --out, for `cfnode train --data DIR` to memory-map."""
    from cfnode.cli import _run
    from cfnode.data.tokenizer import ByteTokenizer, FileTokenizer
    from cfnode.data.tokens import prepare_tokens

    _setup(log_level)
    chosen = _run("data prepare", lambda: FileTokenizer.from_file(tokenizer_path) if tokenizer_path
                  else ByteTokenizer())
    prepared = _run("data prepare", lambda: prepare_tokens(data_path, chosen, chosen.tokenizer_id, out_dir,
                                                           progress=progress))
    click.echo(f"wrote {prepared.num_tokens:,} tokens ({prepared.dtype}, tokenizer {prepared.tokenizer}, vocab size "
               f"{prepared.vocab_size}) to {prepared.path}")
    hint = f" --tokenizer {tokenizer_path}" if tokenizer_path else ""
    click.echo(f"train on them: cfnode train --data {prepared.path}{hint} ...")

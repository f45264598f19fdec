"""Loading a Hugging Face Llama directory (one `cfnode export` wrote, or any Llama checkpoint cfnode can represent) into
cfnode's own model code, with its tokenizer: what `cfnode generate` samples from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from cfnode.config import BYTE_TOKENIZER, ConfigError, RunSpec
from cfnode.data.tokenizer import END_OF_TEXT, FileTokenizer, byte_tokenizer_json, file_sha256
from cfnode.hf.checkpoint import part_states, read_hf_dir
from cfnode.hf.convert import spec_fields_from_llama_config
from cfnode.model import FullModel


@dataclass
class LoadedModel:
    spec: RunSpec
    model: FullModel
    tokenizer: FileTokenizer


def load_model_dir(model_dir: str | Path, device: str = "cpu") -> LoadedModel:
    """The model in model_dir with cfnode's code (float32, eval mode) and the tokenizer beside it."""
    model_dir = Path(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ConfigError(f"{model_dir} has no tokenizer.json: cannot turn a prompt into tokens")
    config, hf_state = read_hf_dir(model_dir)
    _check_tokenizer(config, tokenizer_file)
    num_stages = (config.get("cfnode") or {}).get("num_stages") or 1
    fields = spec_fields_from_llama_config(config, num_stages)
    # The context the model was trained on (any Llama config says its own; cfnode's exports write seq_len there).
    seq_len = int(config.get("max_position_embeddings") or RunSpec.seq_len)
    spec = RunSpec(**fields, seq_len=seq_len, tokenizer=f"sha256:{file_sha256(tokenizer_file)}")
    head, *stages = part_states(spec, hf_state)
    model = FullModel.from_states(spec, head, stages).to(torch.device(device)).eval()
    return LoadedModel(spec, model, FileTokenizer(tokenizer_file))


def _check_tokenizer(config: dict, tokenizer_file: Path) -> None:
    """A cfnode export records its run's tokenizer: the tokenizer.json beside it must be that one."""
    recorded = (config.get("cfnode") or {}).get("tokenizer")
    if recorded is None:  # a checkpoint from elsewhere: its own tokenizer.json is all there is
        return
    actual = f"sha256:{file_sha256(tokenizer_file)}"
    if recorded == BYTE_TOKENIZER:
        recorded = f"sha256:{hashlib.sha256(byte_tokenizer_json().encode()).hexdigest()}"
    if actual != recorded:
        raise ConfigError(f"{tokenizer_file} is not the tokenizer the model was trained with: its digest is {actual}, "
                          f"config.json records {recorded}")


def sample_text(model_dir: str | Path, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                top_k: int | None = None, seed: int = 0, device: str = "cpu") -> str:
    """The continuation of prompt that the model in model_dir samples, the same for the same seed."""
    from cfnode.model.generate import generate

    if not prompt:
        raise ConfigError("give a prompt to continue (--prompt TEXT)")
    loaded = load_model_dir(model_dir, device)
    prompt_tokens = loaded.tokenizer.encode(prompt).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = loaded.tokenizer.token_to_id(END_OF_TEXT)  # a BPE run's end of text ends the sample (and is not shown)
    new_tokens = generate(loaded.model.head, loaded.model.body_stages(), prompt_tokens, max_new_tokens,
                          temperature=temperature, top_k=top_k, generator=generator, stop_token=stop)
    if len(new_tokens) and new_tokens[-1].item() == stop:
        new_tokens = new_tokens[:-1]
    return loaded.tokenizer.decode(new_tokens.tolist())

"""Loading a Hugging Face Llama directory (one `cfnode export` wrote, or any Llama checkpoint cfnode can represent) into
cfnode's own model code, with its tokenizer: what `cfnode generate` samples from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cfnode.config import ConfigError, RunSpec
from cfnode.data.tokenizer import END_OF_TEXT, FileTokenizer, file_sha256
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
    num_stages = (config.get("cfnode") or {}).get("num_stages") or 1
    fields = spec_fields_from_llama_config(config, num_stages)
    # The context the model was trained on (any Llama config says its own; cfnode's exports write seq_len there).
    seq_len = int(config.get("max_position_embeddings") or RunSpec.seq_len)
    spec = RunSpec(**fields, seq_len=seq_len, tokenizer=f"sha256:{file_sha256(tokenizer_file)}")
    head, *stages = part_states(spec, hf_state)
    model = FullModel.from_states(spec, head, stages).to(torch.device(device)).eval()
    return LoadedModel(spec, model, FileTokenizer(tokenizer_file))


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

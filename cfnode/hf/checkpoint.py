"""Hugging Face checkpoint directories: write a run's weights as one, read one back, part by part.

A directory holds config.json (cfnode.hf.convert.llama_config), model.safetensors or a sharded
model.safetensors.index.json, and (written by cfnode) generation_config.json. A run started from one pins each
part's digest in spec.init_digests: part 0 the embedding, final norm and LM head, part s body stage s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from cfnode.config import ConfigError, RunSpec
from cfnode.hf.convert import (
    EMBEDDING,
    LM_HEAD,
    convert_part,
    from_hf_state,
    is_tied,
    llama_config,
    part_names,
    spec_fields_from_llama_config,
    to_hf_state,
)
from cfnode.model.layers import swiglu_hidden_size

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
DIGEST_VERSION = b"cfnode-part-digest-v1\n"

# Progress callbacks get (tensors done, tensors in all) after each tensor, for a progress bar on a large model.
Progress = Callable[[int, int], None]


def _part_label(index: int) -> str:
    return "head (embedding, final norm, LM head)" if index == 0 else f"body stage {index}"


# --- digests -------------------------------------------------------------------------------------------------------


def part_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 hex digest of one part's tensors, independent of dict order and device.

    Hashed: the line b"cfnode-part-digest-v1\\n", then per tensor in sorted name order the line
    f"{name}\\tfloat32\\t{shape as comma-separated ints}\\n" and the tensor's values as little-endian float32 bytes
    in row-major order. Every tensor is hashed as float32 (a bfloat16 state hashes like its float32 upcast); a
    non-floating tensor is an error.
    """
    h = hashlib.sha256(DIGEST_VERSION)
    for name in sorted(state):
        tensor = state[name]
        if not tensor.is_floating_point():
            raise ValueError(f"part_digest hashes float tensors only; {name} is {tensor.dtype}")
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        shape = ",".join(str(n) for n in values.shape)
        h.update(f"{name}\tfloat32\t{shape}\n".encode())
        array = values.numpy()
        if sys.byteorder == "big":  # little-endian is native on every platform torch supports today
            array = array.byteswap()
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()


# --- writing -------------------------------------------------------------------------------------------------------


def generation_config(spec: RunSpec, bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    """generation_config.json: sampling as cfnode.model.generate defaults to it (temperature 1, no top-k limit)."""
    config: dict[str, Any] = {"do_sample": True, "temperature": 1.0, "top_k": 0, "max_length": spec.seq_len}
    if bos_token_id is not None:
        config["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    return config


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_hf_dir(
    out_dir: str | Path,
    spec: RunSpec,
    head_state: Mapping[str, Tensor],
    stage_states: Sequence[Mapping[str, Tensor]],
    progress: Progress | None = None,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Write the model as a transformers Llama directory out_dir (created if need be; other files there are left
    alone): config.json, model.safetensors (float32, untied) and generation_config.json. Returns out_dir.

    progress(done, total) follows the tensors as they are converted; the last call, (total, total), comes once the
    weights are on disk.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_state = to_hf_state(spec, head_state, stage_states)
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for done, (name, tensor) in enumerate(hf_state.items()):
        if progress is not None:
            progress(done, len(hf_state))
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if tensor.data_ptr() in seen:  # safetensors refuses tensors sharing memory
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    total = sum(t.numel() for t in tensors.values())
    weights = out / WEIGHTS
    tmp = weights.with_name(WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)  # a reader never sees half a file
    if progress is not None:
        progress(len(tensors), len(tensors))
    log.info(f"wrote {weights}: {len(tensors)} tensors, {total:,} parameters, {total * 4 / 2**20:.1f} MiB")
    _write_json(out / CONFIG, llama_config(spec, bos_token_id, eos_token_id))
    _write_json(out / GENERATION_CONFIG, generation_config(spec, bos_token_id, eos_token_id))
    return out


# --- reading -------------------------------------------------------------------------------------------------------


def read_config(directory: str | Path) -> dict[str, Any]:
    """The directory's config.json."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise ConfigError(f"{directory} has no {CONFIG}: not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return config


def weight_files(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it: model.safetensors, else the files a sharded
    model.safetensors.index.json names."""
    directory = Path(directory)
    single, index = directory / WEIGHTS, directory / WEIGHTS_INDEX
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read the weight map of {index}: {e!r}") from None
        files = {name: directory / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ConfigError(f"{index} names {path.name}, which {directory} does not have")
        return files
    others = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".gguf", ".ckpt"))
    found = f" (it has {', '.join(others)}; cfnode reads safetensors only: re-save the model with transformers' " \
            "save_pretrained(dir, safe_serialization=True))" if others else ""
    raise ConfigError(f"{directory} has neither {WEIGHTS} nor {WEIGHTS_INDEX}{found}")


class _Tensors:
    """Reads single tensors out of a directory's safetensors files, opening each file once."""

    def __init__(self, directory: str | Path, stack: contextlib.ExitStack) -> None:
        self.files = weight_files(directory)
        self.stack = stack
        self.handles: dict[Path, Any] = {}

    def get(self, name: str) -> Tensor | None:
        path = self.files.get(name)
        if path is None:
            return None
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(str(path), framework="pt"))
        return self.handles[path].get_tensor(name)


def read_hf_dir(directory: str | Path, progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json, every tensor in transformers' names and the stored dtypes). A tied checkpoint comes back
    untied: lm_head.weight is a copy of the embedding, whatever the files hold for it."""
    config = read_config(directory)
    with contextlib.ExitStack() as stack:
        source = _Tensors(directory, stack)
        names = sorted(source.files)
        state: dict[str, Tensor] = {}
        for i, name in enumerate(names, start=1):
            tensor = source.get(name)
            assert tensor is not None
            state[name] = tensor
            if progress is not None:
                progress(i, len(names))
    if is_tied(config) and EMBEDDING in state:
        log.info("config.json ties lm_head to the embedding: untying, lm_head starts as a copy of the embedding")
        state[LM_HEAD] = state[EMBEDDING].clone()
    return config, state


def part_states(spec: RunSpec, hf_state: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """[head_state, stage 1 state, ..., stage S state] in cfnode names, float32 (see convert.from_hf_state)."""
    head, stages = from_hf_state(spec, hf_state)
    return [head, *stages]


def check_config_matches(spec: RunSpec, config: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the first model-shape field where config.json and spec disagree."""
    fields = spec_fields_from_llama_config(config, spec.num_stages)
    theirs = {
        **fields,
        "num_kv_heads": fields["num_kv_heads"] or fields["num_heads"],
        "intermediate_size": fields["intermediate_size"] or swiglu_hidden_size(fields["hidden_size"]),
    }
    ours = {name: getattr(spec, name) for name in fields}
    ours.update(num_kv_heads=spec.kv_heads, intermediate_size=spec.mlp_hidden)
    for name, value in theirs.items():
        if value != ours[name]:
            raise ConfigError(f"the checkpoint's config.json gives {name} {value!r}, the run spec {ours[name]!r}")


def read_part(directory: str | Path, spec: RunSpec, index: int, progress: Progress | None = None) -> dict[str, Tensor]:
    """Part index (0 head, s body stage s) of the checkpoint in cfnode names, float32, reading only its tensors.
    No digest check (load_part does one)."""
    config = read_config(directory)
    check_config_matches(spec, config)
    tied = is_tied(config)
    count = len(part_names(spec, index))
    with contextlib.ExitStack() as stack:
        source = _Tensors(directory, stack)
        done = 0

        def get(name: str) -> Tensor | None:
            nonlocal done
            if tied and name == LM_HEAD:
                return None  # convert_part unties: the embedding's copy, as transformers ties it
            done = min(done + 1, count)  # an untied lm_head reads the embedding a second time
            if progress is not None:
                progress(done, count)
            return source.get(name)

        state = convert_part(spec, index, get)
    total = sum(t.numel() for t in state.values())
    log.info(f"read part {index}/{spec.num_stages} ({_part_label(index)}) of {directory}: {len(state)} tensors, "
             f"{total:,} parameters")
    return state


def load_part(directory: str | Path, spec: RunSpec, index: int, progress: Progress | None = None) -> dict[str, Tensor]:
    """read_part, checked against the run: part_digest(state) must equal spec.init_digests[index]."""
    if not spec.init_digests:
        raise ConfigError("the run spec has no init_digests: it was not started from a checkpoint")
    state = read_part(directory, spec, index, progress)
    digest, expected = part_digest(state), spec.init_digests[index]
    if digest != expected:
        raise ConfigError(f"checkpoint {directory} part {index} ({_part_label(index)}) has digest {digest}, "
                          f"the run spec pins {expected}: not the weights this run started from")
    return state


def dir_digests(directory: str | Path, spec: RunSpec, progress: Progress | None = None) -> tuple[str, ...]:
    """Every part's digest (spec.init_digests for a run started from this checkpoint), one part in memory at a
    time."""
    return tuple(part_digest(read_part(directory, spec, index, progress)) for index in range(spec.num_stages + 1))

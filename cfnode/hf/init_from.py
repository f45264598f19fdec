"""Starting a run from a pre-trained Llama (`--init-from DIR`): the run's shape from the checkpoint's config, a digest
of each part in the signed spec, and each node loading its own part from a local copy, checked against that digest."""

from __future__ import annotations

from pathlib import Path

import torch
from hivemind.utils.logging import get_logger

from cfnode.config import ConfigError, RunSpec
from cfnode.hf.checkpoint import dir_digests, load_part, read_config
from cfnode.hf.convert import spec_fields_from_llama_config
from cfnode.model import build_body_stage, build_head

logger = get_logger(__name__)


def part_name(part: int) -> str:
    return "the embedding and head" if part == 0 else f"stage {part}"


def spec_from_checkpoint(init_dir: str | Path, spec: RunSpec, num_stages: int | None = None) -> RunSpec:
    """`spec` reshaped to the checkpoint in init_dir (a Hugging Face Llama directory), with the digest of each of
    its parts: the head (index 0) and every body stage. num_stages: how many stages to cut the layers into (default:
    what an exported cfnode model records, else the spec's). One part is in memory at a time."""
    config = read_config(init_dir)
    stages = num_stages or (config.get("cfnode") or {}).get("num_stages") or spec.num_stages
    shaped = spec.replace(**spec_fields_from_llama_config(config, stages), init_digests=())

    def progress(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            logger.info(f"checkpoint {init_dir}: digesting, {done}/{total} tensors")

    digests = dir_digests(init_dir, shaped, progress)
    logger.info(f"checkpoint {init_dir}: {shaped.num_stages} stages x {shaped.layers_per_stage} layers, hidden "
                f"{shaped.hidden_size}, {shaped.num_heads} heads ({shaped.kv_heads} key/value), vocabulary "
                f"{shaped.vocab_size}; the spec pins each part's digest")
    return shaped.replace(init_digests=digests)


def initial_state(spec: RunSpec, part: int, init_dir: str | Path | None) -> dict[str, torch.Tensor]:
    """The weights `part` (0: the trainer's embedding, final norm and head; s: body stage s) starts the run with: the
    seed's fresh weights, or in a run started from a checkpoint that part of the checkpoint, from a local copy."""
    if not spec.init_digests:
        module = build_head(spec) if part == 0 else build_body_stage(spec, part)
        return module.state_dict()
    if init_dir is None:
        raise ConfigError(f"run {spec.run_id!r} starts from a checkpoint, and {part_name(part)} has no live copy to "
                          "take: pass --init-from DIR with a local copy of the checkpoint")
    state = load_part(init_dir, spec, part)
    logger.info(f"loaded {part_name(part)} from the checkpoint in {init_dir} (digest matches the run spec)")
    return state

"""cfnode <-> Hugging Face Llama: the config.json and the tensor names and layouts.

No transformers import: this is plain dict and tensor work, so export and import need only safetensors.

Rotary layout: cfnode rotates consecutive pairs (x[2i], x[2i+1]) of each head, transformers' Llama rotates halves
(x[i], x[i + D/2]). Attention scores only depend on q . k, so permuting the output rows of q_proj and k_proj the same
way inside every head turns one convention into the other exactly: HF row i < D/2 is cfnode row 2i, HF row D/2 + i
is cfnode row 2i + 1. v_proj and o_proj do not see rotary and keep their layout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from cfnode.config import ConfigError, RunSpec
from cfnode.model.layers import swiglu_hidden_size

log = logging.getLogger(__name__)

# cfnode name inside a body stage's block -> transformers' name inside model.layers.{i}
BLOCK_NAMES = {
    "norm1.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
# cfnode HeadModule name -> transformers' name
HEAD_NAMES = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
EMBEDDING = HEAD_NAMES["embedding.weight"]
LM_HEAD = HEAD_NAMES["lm_head.weight"]
# Buffers some older checkpoints saved; recomputed from the config, never weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --- config.json ---------------------------------------------------------------------------------------------------


def llama_config(spec: RunSpec, bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict[str, Any]:
    """spec's model as a transformers LlamaConfig dict for config.json, readable by transformers 4.4x and 5.x.

    The rotary base is written both as transformers 4's top-level rope_theta (with rope_scaling null) and as
    transformers 5's rope_parameters; each version reads its own and ignores or folds in the other. bos/eos ids are
    written as given (null by default: the byte tokenizer has none), so transformers' Llama defaults 1 and 2 do
    not apply. The "cfnode" section records how the run cut the layers into stages.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.mlp_hidden,
        "num_hidden_layers": spec.num_stages * spec.layers_per_stage,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.seq_len,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": "float32",  # transformers 4
        "dtype": "float32",  # transformers 5
        "cfnode": {
            "num_stages": spec.num_stages,
            "layers_per_stage": spec.layers_per_stage,
            "run_id": spec.run_id,
            "tokenizer": spec.tokenizer,
        },
    }


def _get(config: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """config[key], checked to be of kind (bool is no int here); default when absent (required without one)."""
    if key not in config or (config[key] is None and default is not ...):
        if default is ...:
            raise ConfigError(f"config.json has no {key}")
        return default
    value = config[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ConfigError(f"config.json {key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _positive_int(config: Mapping[str, Any], key: str, default: Any = ...) -> int:
    value = _get(config, key, int, default)
    if value <= 0:
        raise ConfigError(f"config.json {key} must be a positive integer, got {value!r}")
    return value


def _rope_theta(config: Mapping[str, Any]) -> float:
    """The rotary base, refusing any scaled or partial rotary embedding (cfnode has plain RoPE only)."""
    theta = _get(config, "rope_theta", (int, float), 10000.0)  # transformers 4
    for key in ("rope_scaling", "rope_parameters"):  # transformers 4, 5
        params = config.get(key)
        if params is None:
            continue
        if not isinstance(params, Mapping):
            raise ConfigError(f"config.json {key} must be a mapping, got {params!r}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"config.json {key} has rope_type {rope_type!r}: cfnode has no rope scaling, only "
                              "the 'default' rotary embedding")
        unknown = sorted(set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
        if unknown:  # e.g. one dict per layer type, or scaling factors: not plain RoPE
            raise ConfigError(f"config.json {key} has {', '.join(map(str, unknown))}, which cfnode cannot represent")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"config.json {key} partial_rotary_factor must be 1.0 (cfnode rotates whole heads)")
        theta = _get(params, "rope_theta", (int, float), theta)
    if config.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ConfigError("config.json partial_rotary_factor must be 1.0 (cfnode rotates whole heads)")
    if not math.isfinite(theta) or theta <= 0:
        raise ConfigError(f"config.json rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def spec_fields_from_llama_config(config: Mapping[str, Any], num_stages: int | None = None) -> dict[str, Any]:
    """The RunSpec model-shape fields of a run started from a checkpoint with this config.json.

    num_stages: given, or the cfnode section's (a cfnode export); layers_per_stage = num_hidden_layers / num_stages.
    num_kv_heads and intermediate_size come back as 0 when they equal cfnode's defaults, so an exported run's spec
    round-trips. seq_len, the tokenizer and training settings are the run's choice, not returned (the cfnode section
    and max_position_embeddings hold an export's). Raises ConfigError naming the config field for anything cfnode
    cannot represent.
    """
    model_type = config.get("model_type")
    if model_type != "llama":
        raise ConfigError(f"config.json model_type must be 'llama', got {model_type!r}")
    architectures = config.get("architectures")
    if architectures is not None and "LlamaForCausalLM" not in architectures:
        raise ConfigError(f"config.json architectures must include LlamaForCausalLM, got {architectures!r}")
    for key in ("attention_bias", "mlp_bias"):
        if _get(config, key, bool, False):
            raise ConfigError(f"config.json {key} is true: cfnode's projections have no bias")
    hidden_act = _get(config, "hidden_act", str, "silu")
    if hidden_act != "silu":
        raise ConfigError(f"config.json hidden_act must be 'silu' (SwiGLU), got {hidden_act!r}")
    pretraining_tp = _get(config, "pretraining_tp", int, 1)
    if pretraining_tp > 1:
        raise ConfigError(f"config.json pretraining_tp is {pretraining_tp}: cfnode needs 1 (no sliced projections)")

    hidden = _positive_int(config, "hidden_size")
    heads = _positive_int(config, "num_attention_heads")
    kv_heads = _positive_int(config, "num_key_value_heads", heads)
    layers = _positive_int(config, "num_hidden_layers")
    vocab = _positive_int(config, "vocab_size")
    if hidden % heads != 0:
        raise ConfigError(f"config.json hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_dim = _positive_int(config, "head_dim", hidden // heads)
    if head_dim != hidden // heads:
        raise ConfigError(f"config.json head_dim is {head_dim}; cfnode needs hidden_size / num_attention_heads = "
                          f"{hidden // heads}")
    if head_dim % 2 != 0:
        raise ConfigError(f"config.json head size {head_dim} is odd: rotary embeddings rotate pairs")
    if heads % kv_heads != 0:
        raise ConfigError(f"config.json num_attention_heads {heads} is not a multiple of num_key_value_heads "
                          f"{kv_heads}")
    intermediate = _positive_int(config, "intermediate_size")
    eps = _get(config, "rms_norm_eps", (int, float), 1e-6)
    if not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"config.json rms_norm_eps must be a positive number, got {eps!r}")
    theta = _rope_theta(config)

    section = config.get("cfnode") or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"config.json cfnode must be a mapping, got {section!r}")
    if num_stages is None:
        if "num_stages" not in section:
            raise ConfigError("the number of body stages must be given: config.json has no cfnode.num_stages")
        num_stages = _positive_int(section, "num_stages")
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages <= 0:
        raise ConfigError(f"num_stages must be a positive integer, got {num_stages!r}")
    if layers % num_stages != 0:
        raise ConfigError(f"config.json num_hidden_layers {layers} is not divisible into {num_stages} body stages")

    _get(config, "tie_word_embeddings", bool, False)  # accepted either way: parts are untied when read
    return {
        "num_stages": num_stages,
        "layers_per_stage": layers // num_stages,
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": 0 if kv_heads == heads else kv_heads,
        "intermediate_size": 0 if intermediate == swiglu_hidden_size(hidden) else intermediate,
        "rope_theta": theta,
        "norm_eps": float(eps),
        "vocab_size": vocab,
    }


def is_tied(config: Mapping[str, Any]) -> bool:
    """Whether config.json ties lm_head to the embedding (its checkpoint then usually has no lm_head.weight)."""
    return bool(config.get("tie_word_embeddings", False))


# --- tensors -------------------------------------------------------------------------------------------------------


def _pairs_to_halves(weight: Tensor, heads: int) -> Tensor:
    """Rows of a q/k projection (heads * D, C) from cfnode's rotary layout to transformers'."""
    rows, cols = weight.shape
    d = rows // heads
    return weight.reshape(heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # row 2i+p -> p*D/2+i


def _halves_to_pairs(weight: Tensor, heads: int) -> Tensor:
    """The inverse of _pairs_to_halves."""
    rows, cols = weight.shape
    d = rows // heads
    return weight.reshape(heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)  # row p*D/2+i -> 2i+p


def _rotary_heads(spec: RunSpec, block_name: str) -> int | None:
    """How many heads a block tensor's rows hold if rotary applies to them (q, k), else None."""
    return {"attn.q.weight": spec.num_heads, "attn.k.weight": spec.kv_heads}.get(block_name)


def block_shapes(spec: RunSpec) -> dict[str, tuple[int, ...]]:
    """cfnode block tensor name -> shape."""
    c, kv, f = spec.hidden_size, spec.kv_heads * spec.head_dim, spec.mlp_hidden
    return {
        "norm1.weight": (c,), "attn.q.weight": (c, c), "attn.k.weight": (kv, c), "attn.v.weight": (kv, c),
        "attn.o.weight": (c, c), "norm2.weight": (c,), "mlp.w1.weight": (f, c), "mlp.w3.weight": (f, c),
        "mlp.w2.weight": (c, f),
    }


def head_shapes(spec: RunSpec) -> dict[str, tuple[int, ...]]:
    """cfnode HeadModule tensor name -> shape."""
    c, v = spec.hidden_size, spec.vocab_size
    return {"embedding.weight": (v, c), "norm.weight": (c,), "lm_head.weight": (v, c)}


def part_names(spec: RunSpec, index: int) -> dict[str, str]:
    """cfnode name -> transformers name of part index: 0 the head, s (1..S) body stage s."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= spec.num_stages:
        raise ValueError(f"part index must be an integer in 0..{spec.num_stages}, got {index!r}")
    if index == 0:
        return dict(HEAD_NAMES)
    names = {}
    for j in range(spec.layers_per_stage):
        layer = (index - 1) * spec.layers_per_stage + j
        for ours, theirs in BLOCK_NAMES.items():
            names[f"blocks.{j}.{ours}"] = f"model.layers.{layer}.{theirs}"
    return names


def _part_shapes(spec: RunSpec, index: int) -> dict[str, tuple[int, ...]]:
    if index == 0:
        return head_shapes(spec)
    return {f"blocks.{j}.{name}": shape for j in range(spec.layers_per_stage)
            for name, shape in block_shapes(spec).items()}


def _check_names(what: str, state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"{what}: missing {', '.join(missing) or 'nothing'}; unexpected "
                          f"{', '.join(unexpected) or 'nothing'}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ConfigError(f"{what}: {name} has shape {tuple(state[name].shape)}, the spec needs {shape}")


def to_hf_state(
    spec: RunSpec, head_state: Mapping[str, Tensor], stage_states: Sequence[Mapping[str, Tensor]]
) -> dict[str, Tensor]:
    """The whole model in transformers' LlamaForCausalLM names and rotary layout (dtypes kept, lm_head untied).

    head_state: HeadModule.state_dict(); stage_states[s - 1]: body stage s's BodyStage.state_dict().
    """
    if len(stage_states) != spec.num_stages:
        raise ConfigError(f"the spec has {spec.num_stages} body stages, got {len(stage_states)} stage states")
    _check_names("head state", head_state, head_shapes(spec))
    out = {HEAD_NAMES[name]: tensor for name, tensor in head_state.items()}
    for index, state in enumerate(stage_states, start=1):
        _check_names(f"body stage {index} state", state, _part_shapes(spec, index))
        for ours, theirs in part_names(spec, index).items():
            tensor = state[ours]
            heads = _rotary_heads(spec, ours.split(".", 2)[2])
            out[theirs] = tensor if heads is None else _pairs_to_halves(tensor, heads)
    return out


def convert_part(spec: RunSpec, index: int, get: Callable[[str], Tensor | None]) -> dict[str, Tensor]:
    """Part index (0 head, s body stage s) in cfnode names, float32, from get(transformers name) -> tensor or None
    when absent. A missing lm_head.weight means a tied checkpoint: lm_head starts as a copy of the embedding."""
    state = {}
    for ours, theirs in part_names(spec, index).items():
        tensor = get(theirs)
        if tensor is None and theirs == LM_HEAD:
            log.info("checkpoint has no lm_head.weight (tied to the embedding): untying, lm_head starts as a copy")
            tensor = get(EMBEDDING)
            tensor = None if tensor is None else tensor.clone()
        if tensor is None:
            raise ConfigError(f"checkpoint has no {theirs} (cfnode's {'head' if index == 0 else f'body stage {index}'}"
                              f" {ours})")
        heads = None if index == 0 else _rotary_heads(spec, ours.split(".", 2)[2])
        state[ours] = tensor.float() if heads is None else _halves_to_pairs(tensor.float(), heads)
    _check_names(f"checkpoint part {index}", state, _part_shapes(spec, index))
    return state


def from_hf_state(spec: RunSpec, hf_state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """to_hf_state's inverse: (head_state, [stage 1 state, ..., stage S state]) in cfnode names, float32.

    A missing lm_head.weight is taken as tied and untied (a copy of the embedding); any tensor the spec has no
    place for is an error.
    """
    wanted = {theirs for index in range(spec.num_stages + 1) for theirs in part_names(spec, index).values()}
    unexpected = sorted(name for name in hf_state if name not in wanted and not name.endswith(IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        raise ConfigError(f"checkpoint has tensors the spec has no place for: {shown}")
    parts = [convert_part(spec, index, hf_state.get) for index in range(spec.num_stages + 1)]
    return parts[0], parts[1:]

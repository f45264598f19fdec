"""LLaMa-style decoder split into a trainer-held head and identical body stages."""

from cfnode.model.layers import (
    Block,
    CausalSelfAttention,
    KVCache,
    RMSNorm,
    SwiGLU,
    apply_rotary,
    rotary_tables,
    swiglu_hidden_size,
)
from cfnode.model.stages import (
    BodyStage,
    FullModel,
    HeadModule,
    StageCache,
    body_stage_from_state,
    build_body_stage,
    build_head,
    count_parameters,
    head_from_state,
)

__all__ = [
    "Block",
    "BodyStage",
    "CausalSelfAttention",
    "FullModel",
    "HeadModule",
    "KVCache",
    "RMSNorm",
    "StageCache",
    "SwiGLU",
    "apply_rotary",
    "body_stage_from_state",
    "build_body_stage",
    "build_head",
    "count_parameters",
    "head_from_state",
    "rotary_tables",
    "swiglu_hidden_size",
]

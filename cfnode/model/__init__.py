"""LLaMa-style decoder split into a trainer-held head and identical body stages."""

from cfnode.model.layers import (
    Block,
    CausalSelfAttention,
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
    build_body_stage,
    build_head,
    count_parameters,
)

__all__ = [
    "Block",
    "BodyStage",
    "CausalSelfAttention",
    "FullModel",
    "HeadModule",
    "RMSNorm",
    "SwiGLU",
    "apply_rotary",
    "build_body_stage",
    "build_head",
    "count_parameters",
    "rotary_tables",
    "swiglu_hidden_size",
]

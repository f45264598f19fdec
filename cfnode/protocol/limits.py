"""How large each message of a run may be, derived from its RunSpec, so every reader can refuse more before it
allocates the bytes.

A *payload* bound counts tensor bytes, what `from_chunks` and `decode_tensors` sum; metadata is capped on its own at
MAX_METADATA_BYTES by `unpack_meta`. A *message* bound is what a stream reader checks a length prefix against
(framing.py): the payload that one message may hold, plus the metadata and the protobuf framing around both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from cfnode.config import RunSpec
from cfnode.model import BodyStage, HeadModule
from cfnode.protocol import quantize
from cfnode.protocol.messages import MAX_METADATA_BYTES, STATE_CHUNK_BYTES

FLOAT32_BYTES = 4
# AdamW keeps a scalar `step` per parameter: float32, or float64 under a float64 default dtype.
STEP_BYTES = 8
# Protobuf tags, lengths and tensor headers (dtype, shape, flags) around a message's payload and metadata; a few
# dozen bytes per tensor, and a message holds one part or at most a few whole tensors.
MESSAGE_OVERHEAD = 2**16
# The largest tensor part of a chunked stream: cfnode senders split activations into 64 KiB parts and states into
# 1 MiB parts (messages.to_chunks), so no message of a chunked stream needs more, however large the whole stream is.
MAX_PART_BYTES = STATE_CHUNK_BYTES


def message_bytes(payload_bytes: int) -> int:
    """The largest message that holds `payload_bytes` of tensors whole (a pipe call, a unary call) and metadata."""
    return payload_bytes + MAX_METADATA_BYTES + MESSAGE_OVERHEAD


def part_message_bytes(payload_bytes: int) -> int:
    """The largest message of a chunked stream whose whole payload is at most `payload_bytes`: one part, plus the
    metadata that the first message carries."""
    return message_bytes(min(payload_bytes, MAX_PART_BYTES))


def snapshot_bytes(module: nn.Module, optimizer: bool = True) -> int:
    """Tensor bytes of `stage_state.snapshot` of `module`: its state dict, and with the optimiser two AdamW
    moments (in the parameters' dtype, float32 here) and a scalar step per parameter."""
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    if not optimizer:
        return weights
    return weights + sum(2 * p.numel() * p.element_size() + STEP_BYTES for p in module.parameters())


def _shape_only(module_type: type[nn.Module], spec: RunSpec) -> nn.Module:
    # On the meta device: the shapes and dtypes without allocating or initialising any weight, for any model size.
    with torch.device("meta"):
        return module_type(spec)


@functools.lru_cache(maxsize=32)
def stage_state_bytes(spec: RunSpec, weights_only: bool = False) -> int:
    """A body stage's snapshot (all body stages share their shapes): download_state, a kept neighbour's copy."""
    return snapshot_bytes(_shape_only(BodyStage, spec), optimizer=not weights_only)


@functools.lru_cache(maxsize=32)
def head_state_bytes(spec: RunSpec) -> int:
    """The trainer's embedding, final norm and LM head with their optimiser state: the copy kept as stage 0."""
    return snapshot_bytes(_shape_only(HeadModule, spec))


@functools.lru_cache(maxsize=32)
def grads_bytes(spec: RunSpec) -> int:
    """A replica's accumulated gradients in the exchange (fetch_grads): one float32 tensor per stage parameter."""
    return sum(p.numel() * FLOAT32_BYTES for p in _shape_only(BodyStage, spec).parameters())


def max_copy_bytes(spec: RunSpec) -> int:
    """The largest copy a stage peer may be asked to keep (put_copy): the head's or a neighbouring stage's."""
    return max(head_state_bytes(spec), stage_state_bytes(spec))


def wire_bytes_per_value(wire_dtype: str) -> float:
    """Bytes one activation or gradient value takes on the wire."""
    return quantize.BYTES_PER_VALUE if wire_dtype == "int8" else getattr(torch, wire_dtype).itemsize


def activation_bytes(spec: RunSpec) -> int:
    """One activation or gradient payload on the wire (a forward's input or output, a backward's gradients)."""
    return spec.max_message_bytes


def activations_reply_bytes(spec: RunSpec) -> int:
    """The trainer's cached (input, output) pairs of one stage, sent for a refit.

    Each cached tensor went through a forward its stage accepted, so it holds at most max_message_bytes of
    wire_dtype elements (a stage's output has its input's shape); the trainer keeps and sends them in float32.
    That is refit_cache pairs of two such tensors: with the defaults, 16 x 2 x 128 MiB.
    """
    per_tensor = int(spec.max_message_bytes / wire_bytes_per_value(spec.wire_dtype)) * FLOAT32_BYTES
    return spec.refit_cache * 2 * per_tensor


@dataclass(frozen=True)
class ReplyLimits:
    """Payload bounds of the state-sized replies a client of this run reads (service.StageClient)."""

    stage_state: int
    stage_weights: int
    grads: int
    head_state: int
    activations: int

    @classmethod
    def of(cls, spec: RunSpec) -> ReplyLimits:
        return cls(stage_state_bytes(spec), stage_state_bytes(spec, weights_only=True), grads_bytes(spec),
                   head_state_bytes(spec), activations_reply_bytes(spec))

    def state(self, weights_only: bool) -> int:
        return self.stage_weights if weights_only else self.stage_state

    def copy(self, stage: int) -> int:
        return self.head_state if stage == 0 else self.stage_state

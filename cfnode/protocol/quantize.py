"""Blockwise 8-bit activations and gradients on the wire (`wire_dtype: int8`).

Each run of BLOCK consecutive values is sent as int8 codes round(x / scale) with one float32 scale,
absmax / 127, per block: 1 + 4 / BLOCK bytes a value, against 2 for bfloat16. SWARM quantizes its activations
blockwise too (bitsandbytes' dynamic 8-bit code over blocks of 4096); small linear blocks keep the error lower on
activations with outliers (an outlier only coarsens its own 64 neighbours), need no library, and run as three
torch ops. Scales stay float32 because gradients' absmax can be far below float16's range.

A non-finite value makes its block's scale NaN or Inf, so it arrives non-finite and the receiver refuses it as it
would the raw tensor (validation.validate_hidden).

Only activations and their gradients use this; weights, optimiser state and replica gradients travel exactly.
"""

from __future__ import annotations

import math

import torch
from hivemind.proto import runtime_pb2

BLOCK = 64
SCALE_BYTES = 4  # float32
# hivemind's own BLOCKWISE_8BIT layout needs bitsandbytes; cfnode's peers read this enum value as the layout below.
COMPRESSION = runtime_pb2.CompressionType.BLOCKWISE_8BIT
BYTES_PER_VALUE = 1 + SCALE_BYTES / BLOCK


def quantize_blockwise(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (flat, padded to whole blocks) and float32 scales (one per block) of a floating tensor."""
    flat = tensor.detach().reshape(-1).float()
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
    scales = padded.abs().amax(dim=1, keepdim=True) / 127
    # An all-zero block has scale 0; dividing by 1 there gives its codes, 0, without a 0/0.
    codes = torch.round(padded / torch.where(scales == 0, 1.0, scales)).clamp_(-127, 127).to(torch.int8)
    return codes.view(-1), scales.view(-1)


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of `shape` that `quantize_blockwise`'s codes and scales stand for."""
    values = (codes.view(-1, BLOCK).float() * scales.view(-1, 1)).view(-1)
    return values[:math.prod(shape)].view(shape)


def serialize_int8(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """One wire tensor: the scales, then the codes; `size` is the shape and `dtype` what it decodes to."""
    codes, scales = quantize_blockwise(tensor)
    return runtime_pb2.Tensor(buffer=scales.numpy().tobytes() + codes.numpy().tobytes(), size=tensor.shape,
                              dtype="float32", compression=COMPRESSION, requires_grad=False)


def deserialize_int8(serialized: runtime_pb2.Tensor) -> torch.Tensor:
    """The float32 tensor of a `serialize_int8` message; ValueError if its buffer does not fit its shape."""
    shape = tuple(serialized.size)
    if any(d < 0 for d in shape):
        raise ValueError(f"negative size in {shape}")
    blocks = -(-math.prod(shape) // BLOCK)
    expected = blocks * (SCALE_BYTES + BLOCK)
    if len(serialized.buffer) != expected:
        raise ValueError(f"an int8 tensor of shape {shape} takes {expected} bytes, got {len(serialized.buffer)}")
    raw = bytearray(serialized.buffer)  # writable, so torch can share it instead of warning
    scales = torch.frombuffer(raw, dtype=torch.float32, count=blocks) if blocks else torch.zeros(0)
    codes = torch.frombuffer(raw, dtype=torch.int8, offset=blocks * SCALE_BYTES) if blocks else torch.zeros(
        0, dtype=torch.int8)
    return dequantize_blockwise(codes, scales, shape)

"""Checks every activation and gradient passes before any compute touches it."""

from __future__ import annotations

import torch

from cfnode.config import RunSpec
from cfnode.protocol.messages import ProtocolError

WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def validate_hidden(tensor: torch.Tensor, spec: RunSpec, name: str) -> torch.Tensor:
    """A (B, T, C) hidden state of this run: float, C = hidden_size, 1 <= T <= seq_len, finite. Returns float32."""
    if tensor.dtype not in WIRE_DTYPES:
        raise ProtocolError(f"{name} has dtype {tensor.dtype}, expected one of float32, float16, bfloat16")
    if tensor.dim() != 3:
        raise ProtocolError(f"{name} must have shape (batch, time, {spec.hidden_size}), got {tuple(tensor.shape)}")
    batch, time, channels = tensor.shape
    if channels != spec.hidden_size or not 1 <= time <= spec.seq_len or batch < 1:
        raise ProtocolError(
            f"{name} has shape {tuple(tensor.shape)}; expected (batch >= 1, 1..{spec.seq_len}, {spec.hidden_size})"
        )
    tensor = tensor.float()
    # A NaN or Inf makes the sum non-finite, and one reduction costs a fifth of an elementwise check. Only a sum
    # that overflowed needs the elementwise check to tell huge but finite values from broken ones.
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise ProtocolError(f"{name} holds NaN or Inf values")
    return tensor

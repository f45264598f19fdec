"""Building blocks of a LLaMa-style decoder: RMSNorm, rotary embeddings, causal attention, SwiGLU MLP, Block.

Shape letters: B batch, T sequence length, C hidden size, H heads, D head size (C // H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm: rescales each vector to unit RMS, then by a learned gain (no mean, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 so bf16/fp16 activations do not lose precision in the mean of squares.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., C)
        return normed.type_as(x) * self.weight


def rotary_tables(
    seq_len: int, head_dim: int, base: float = 10000.0, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Cosines and sines of the rotary angles, both (seq_len, head_dim // 2), in float32.

    Position t rotates pair i of a head by angle t * base^(-2i / head_dim).
    """
    if head_dim % 2 != 0:
        raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # (D/2,)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)  # (T,)
    angles = torch.outer(positions, inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the last dim of x (B, H, T, D) by the angles of cos/sin (T, D/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, T, D/2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]  # (B, H, T, D/2) each
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, D/2, 2)
    return rotated.flatten(-2).type_as(x)  # (B, H, T, D)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions on queries and keys."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)  # output projection, scaled down at init (see stages.py)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x.shape

        def split_heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

        q = apply_rotary(split_heads(self.q(x)), cos, sin)  # (B, H, T, D)
        k = apply_rotary(split_heads(self.k(x)), cos, sin)  # (B, H, T, D)
        v = split_heads(self.v(x))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.o(y)  # (B, T, C)


def swiglu_hidden_size(dim: int, multiple_of: int = 32) -> int:
    """LLaMa's MLP width: 2/3 of 4 * dim (keeps the parameter count of a 4x GELU MLP), rounded up to multiple_of."""
    hidden = int(8 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """Gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = swiglu_hidden_size(dim)
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down (output projection, scaled down at init)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, hidden) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: the residual stream is only ever added to, never normalised in place."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)  # (B, T, C)
        x = x + self.mlp(self.norm2(x))  # (B, T, C)
        return x

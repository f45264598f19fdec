"""Building blocks of a LLaMa-style decoder: RMSNorm, rotary embeddings, causal attention, SwiGLU MLP, Block.

Shape letters: B batch, T sequence length, C hidden size, H heads, K key/value heads (H for plain multi-head
attention, fewer for grouped-query attention), D head size (C // H), P positions already in a KV cache.
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
    seq_len: int, head_dim: int, base: float = 10000.0, device: torch.device | str | None = None, start: int = 0
) -> tuple[Tensor, Tensor]:
    """Cosines and sines of the rotary angles of positions start..start+seq_len-1, both (seq_len, head_dim // 2),
    in float32.

    Position t rotates pair i of a head by angle t * base^(-2i / head_dim).
    """
    if head_dim % 2 != 0:
        raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # (D/2,)
    # Whole numbers are exact in float32 (up to 2^24), so position t gets the same angle at any start.
    positions = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)  # (T,)
    angles = torch.outer(positions, inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the last dim of x (B, H, T, D) by the angles of cos/sin (T, D/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, T, D/2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]  # (B, H, T, D/2) each
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, D/2, 2)
    return rotated.flatten(-2).type_as(x)  # (B, H, T, D)


class KVCache:
    """One attention layer's past keys (after rotary) and values for generation, (B, K, P, D) each."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def length(self) -> int:
        """P: the positions held."""
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys and values (B, K, T, D); returns all of them, (B, K, P + T, D) each."""
        if self.k is None or self.v is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    """Causal self-attention with rotary positions on queries and keys; grouped-query when num_kv_heads < num_heads
    (each group of num_heads // num_kv_heads consecutive query heads shares one key/value head)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if dim % num_heads != 0:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"{num_heads} heads are not a multiple of {num_kv_heads} key/value heads")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(num_heads * self.head_dim, dim, bias=False)  # output projection, scaled down at init

    def _project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, H, T, D), keys and values (B, K, T, D) of x (B, T, C), queries and keys rotated."""
        B, T, _ = x.shape

        def split_heads(t: Tensor, heads: int) -> Tensor:
            return t.view(B, T, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, D)

        q = apply_rotary(split_heads(self.q(x), self.num_heads), cos, sin)  # (B, H, T, D)
        k = apply_rotary(split_heads(self.k(x), self.num_kv_heads), cos, sin)  # (B, K, T, D)
        v = split_heads(self.v(x), self.num_kv_heads)  # (B, K, T, D)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        """o(softmax(q k^T / sqrt(D)) v) for q (B, H, T, D) against k, v (B, K, S, D): (B, T, C)."""
        B, _, T, _ = q.shape
        if self.num_kv_heads < self.num_heads:
            # Expand only for GQA, so plain multi-head attention runs exactly the arithmetic it always did.
            group = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(group, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(group, dim=1)  # (B, H, S, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, self.num_heads * self.head_dim)  # (B, T, C)
        return self.o(y)  # (B, T, C)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q, k, v = self._project(x, cos, sin)
        return self._attend(q, k, v, mask=None, is_causal=True)  # (B, T, C)

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache) -> Tensor:
        """Attention of x (B, T, C) at positions P..P+T-1 over the P cached positions and itself, adding its keys
        and values to cache; cos/sin (T, D/2) must be those positions' tables."""
        past = cache.length
        q, k, v = self._project(x, cos, sin)
        k, v = cache.extend(k, v)  # (B, K, P + T, D)
        T = q.shape[2]
        if past == 0:
            return self._attend(q, k, v, mask=None, is_causal=True)
        if T == 1:
            return self._attend(q, k, v, mask=None, is_causal=False)  # the newest position sees everything
        # SDPA's is_causal aligns the mask top-left, which is wrong once there is a past: new query i (absolute
        # position P + i) must see keys 0..P + i.
        mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)  # (T, P + T)
        return self._attend(q, k, v, mask=mask, is_causal=False)


def swiglu_hidden_size(dim: int, multiple_of: int = 32) -> int:
    """LLaMa's MLP width: 2/3 of 4 * dim (keeps the parameter count of a 4x GELU MLP), rounded up to multiple_of."""
    hidden = int(8 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """Gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or swiglu_hidden_size(dim)
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down (output projection, scaled down at init)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, hidden) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: the residual stream is only ever added to, never normalised in place."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        mlp_hidden: int | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, norm_eps)
        self.attn = CausalSelfAttention(dim, num_heads, num_kv_heads)
        self.norm2 = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)  # (B, T, C)
        x = x + self.mlp(self.norm2(x))  # (B, T, C)
        return x

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache) -> Tensor:
        """forward() for new positions after those in cache (see CausalSelfAttention.forward_cached)."""
        x = x + self.attn.forward_cached(self.norm1(x), cos, sin, cache)  # (B, T, C)
        x = x + self.mlp(self.norm2(x))  # (B, T, C)
        return x

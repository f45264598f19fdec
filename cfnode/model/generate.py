"""Autoregressive sampling from a head and its body stages, with a KV cache so each new token costs one position.

Context: the model sees at most `seq_len` positions (the run's spec.seq_len, recorded on the HeadModule), the length
it was trained on. A prompt longer than that keeps only its last seq_len tokens. When the context is full, it slides:
the cache is rebuilt from the last seq_len // 2 tokens (positions restart at 0, as every training sequence does), so
generation can go on past seq_len at the price of one prefill of seq_len // 2 tokens every seq_len // 2 new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cfnode.model.stages import BodyStage, HeadModule, StageCache


def new_caches(stages: Sequence[BodyStage]) -> list[StageCache]:
    """An empty KV cache per body stage."""
    return [stage.new_cache() for stage in stages]


def logits_cached(
    head: HeadModule, stages: Sequence[BodyStage], caches: Sequence[StageCache], tokens: Tensor
) -> Tensor:
    """Logits (B, T, V) of tokens (B, T) placed after the positions already in caches, which take them in."""
    hidden = head.embed(tokens)  # (B, T, C)
    for stage, cache in zip(stages, caches, strict=True):
        hidden = stage.forward_cached(hidden, cache)  # (B, T, C)
    return head.logits(hidden)  # (B, T, V)


def sample_token(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> int:
    """One token from logits (V,): argmax at temperature 0, else a draw from softmax(logits / temperature) over the
    top_k most likely tokens (all when top_k is None)."""
    logits = logits.float()  # (V,); sampling in float32 whatever the compute dtype
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (V,)
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)  # a CPU generator drives the same draws whatever the model's device
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    head: HeadModule,
    stages: Sequence[BodyStage],
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
    seq_len: int | None = None,
) -> Tensor:
    """Up to max_new_tokens tokens (a 1-d long tensor on prompt's device) continuing prompt (T,).

    temperature 0 is greedy decoding; otherwise tokens are drawn with generator, so a generator seeded the same way
    gives the same tokens. Generation ends early after stop_token, which is included in the result. seq_len
    overrides the context length (default head.seq_len; see the module docstring for how a full context slides).
    """
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise ValueError(f"prompt must be a non-empty 1-d tensor of token ids, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be non-negative, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be non-negative, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None: no limit), got {top_k}")
    context = seq_len if seq_len is not None else head.seq_len
    if context < 1:
        raise ValueError(f"seq_len must be at least 1, got {context}")
    keep = max(1, context // 2)  # tokens that survive a slide
    device = head.embedding.weight.device
    history = prompt.to(device=device, dtype=torch.long)  # (T,), grows by each new token

    def prefill(window: Tensor) -> tuple[list[StageCache], Tensor]:
        caches = new_caches(stages)
        return caches, logits_cached(head, stages, caches, window[None])[0, -1]  # (V,)

    caches, logits = prefill(history[-context:])
    filled = min(history.numel(), context)  # positions in the caches
    new: list[int] = []
    while len(new) < max_new_tokens:
        token = sample_token(logits, temperature, top_k, generator)
        new.append(token)
        history = torch.cat((history, torch.tensor([token], device=device)))
        if token == stop_token or len(new) == max_new_tokens:
            break  # no forward for a token nothing will follow
        if filled >= context:
            caches, logits = prefill(history[-keep:])
            filled = keep
        else:
            logits = logits_cached(head, stages, caches, history[None, -1:])[0, -1]  # (V,)
            filled += 1
    return torch.tensor(new, dtype=torch.long, device=prompt.device)

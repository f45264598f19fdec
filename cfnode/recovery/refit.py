"""Refit a rebuilt stage on the lost stage's recent activations (beyond the CheckFree paper).

A rebuild (CheckFree's average of the neighbours, a CheckFree+ or plain copy) only approximates the lost stage. But
the trainer has just seen what the lost stage did: it sent the stage its inputs and got its outputs back for every
recent microbatch. `ActivationCache` keeps the last K of those (input, output) pairs per stage, in the order the
stage ran them; `refit` regresses the rebuilt weights onto them (mean squared error, Adam), holding some pairs out
to stop when they stop improving, and keeps the best weights it saw. Both are pure: the live swarm (trainer and
newcomer) and `cfnode bench churn` share them.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

Pair = tuple[torch.Tensor, torch.Tensor]  # (stage input, stage output), each (B, T, C)
# The rebuilds that are refitted: those made from live neighbours. Fresh weights (`fresh`, `random`: recovery none
# or random, or a swarm that never trained) stay as they are, so those modes mean what they say.
REFITTED_KINDS = ("checkfree", "checkfree+", "uniform", "copy")


def refits(kind: str) -> bool:
    """Whether a stage rebuilt as `kind` (a RebuildPlan's kind) is refitted on the trainer's cached activations."""
    return kind in REFITTED_KINDS


class ActivationCache:
    """Per stage, the (input, output) pairs of its last `size` microbatches, oldest first. Size 0 keeps nothing."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"cache size must be >= 0, got {size}")
        self.size = size
        self._pairs: dict[int, deque[Pair]] = {}

    def record(self, stage: int, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        if self.size == 0:
            return
        pairs = self._pairs.setdefault(stage, deque(maxlen=self.size))
        pairs.append((inputs.detach().to("cpu", copy=True), outputs.detach().to("cpu", copy=True)))

    def pairs(self, stage: int) -> list[Pair]:
        return list(self._pairs.get(stage, ()))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pairs in self._pairs.values() for pair in pairs for t in pair)


@dataclass(frozen=True)
class RefitResult:
    pairs: int  # cached pairs available
    steps: int  # optimisation steps taken
    loss_before: float  # mean squared error on the held-out pairs before the refit
    loss_after: float  # ... after it (the best weights seen, which the model keeps)
    stopped: str  # why it stopped: "no improvement", "max steps", "time budget" or "too few pairs"

    def to_wire(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


def refit(model: torch.nn.Module, pairs: list[Pair], max_steps: int, lr: float, holdout: float = 0.25,
          patience: int = 3, max_seconds: float = math.inf,
          progress: Callable[[int, float], None] | None = None) -> RefitResult:
    """Fit `model` (in place) so that model(input) matches the recorded output of each pair.

    Every ~1/holdout-th pair (at least one) is held out. One step is one Adam step on one training pair, in turn;
    after each pass over the training pairs the held-out loss is measured, and `patience` passes without a new best
    stop the loop, as do `max_steps` steps or `max_seconds` of wall time (a stage waiting to serve must not wait on
    a slow machine without bound). The model ends with the best weights seen (the rebuilt ones if nothing beat
    them). `progress(steps, best held-out loss)` is called after each pass.
    """
    if len(pairs) < 2:
        return RefitResult(len(pairs), 0, math.nan, math.nan, "too few pairs")
    stride = max(2, round(1 / holdout)) if holdout > 0 else len(pairs) + 1
    held = [p for i, p in enumerate(pairs) if i % stride == stride - 1] or [pairs[-1]]
    train = [p for p in pairs if not any(p is h for h in held)]
    device = next(model.parameters()).device

    def held_loss() -> float:
        with torch.no_grad():
            return sum(float(torch.nn.functional.mse_loss(model(x.to(device)), y.to(device))) for x, y in held) \
                / len(held)

    before = best = held_loss()
    best_state = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps, passes_without_gain, stopped = 0, 0, "max steps"
    deadline = time.monotonic() + max_seconds
    while steps < max_steps:
        if time.monotonic() > deadline:
            stopped = "time budget"
            break
        x, y = train[steps % len(train)]
        loss = torch.nn.functional.mse_loss(model(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % len(train) == 0 or steps == max_steps:
            current = held_loss()
            if current < best:
                best, best_state, passes_without_gain = current, copy.deepcopy(model.state_dict()), 0
            else:
                passes_without_gain += 1
                if passes_without_gain >= patience:
                    stopped = "no improvement"
                    break
            if progress is not None:
                progress(steps, best)
    model.load_state_dict(best_state)
    model.zero_grad(set_to_none=True)
    return RefitResult(len(pairs), steps, before, best, stopped)

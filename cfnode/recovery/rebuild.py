"""How a newcomer rebuilds a stage that lost every peer (CheckFree, arXiv 2506.15461, section 4.2).

`plan_rebuild` decides which stages to take weights from; `rebuild_weights` combines their state dicts.
Neither touches the network, so the live swarm and the benchmark share them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

EPSILON = 1e-8  # guards a zero gradient norm (a stage that has not trained yet)
REBUILD_MODES = ("checkfree", "uniform", "copy", "random")


@dataclass(frozen=True)
class RebuildPlan:
    """What to rebuild a lost stage from. `sources` are stage numbers, nearest live neighbour first per side."""

    stage: int
    kind: str  # the weight source the peer will announce: checkfree, uniform, copy, random, fresh
    sources: tuple[int, ...] = ()
    warnings: tuple[str, ...] = field(default=())


def nearest_live(stage: int, num_stages: int, live: set[int]) -> tuple[int | None, int | None]:
    """The closest live body stage below and above `stage` (None where there is none)."""
    below = next((s for s in range(stage - 1, 0, -1) if s in live), None)
    above = next((s for s in range(stage + 1, num_stages + 1) if s in live), None)
    return below, above


def plan_rebuild(stage: int, num_stages: int, live: set[int], mode: str, trained: bool) -> RebuildPlan:
    """The decision table for a stage with no live peer.

    - a swarm that never trained, or recovery `none`: fresh weights from the run spec's seed;
    - `random`: fresh weights as well (the paper's baseline);
    - `checkfree` / `uniform`: average the nearest live stage on each side; with only one side (an edge stage,
      or every stage on the other side lost), copy that one;
    - `checkfree+`: as checkfree, except that a lost edge stage (1 or S) copies its neighbour (2 or S-1), which
      the swap schedule trained to stand in for it;
    - `copy`: copy the previous live stage (the next one for stage 1).
    """
    if not 1 <= stage <= num_stages:
        raise ValueError(f"stage {stage} does not exist: stages are 1..{num_stages}")
    if not trained or mode == "none":
        return RebuildPlan(stage, "fresh")
    if mode == "random":
        return RebuildPlan(stage, "random")
    below, above = nearest_live(stage, num_stages, live)
    if below is None and above is None:
        return RebuildPlan(stage, "fresh", (), ("no other stage is live: starting from fresh weights",))
    warnings = []
    for side, neighbour in (("previous", below), ("next", above)):
        expected = stage - 1 if side == "previous" else stage + 1
        if neighbour is not None and neighbour != expected:
            warnings.append(f"the {side} stage {expected} is lost too: using stage {neighbour} instead")
    if mode == "copy":
        return RebuildPlan(stage, "copy", (below if below is not None else above,), tuple(warnings))
    if mode not in ("checkfree", "checkfree+", "uniform"):
        raise ValueError(f"unknown recovery mode {mode!r}")
    if below is None or above is None:
        only = below if below is not None else above
        if mode == "checkfree+" and stage in (1, num_stages) and abs(only - stage) == 1:
            # The swap schedule trained this neighbour to stand in for the lost edge stage: copy it exactly.
            return RebuildPlan(stage, "checkfree+", (only,), tuple(warnings))
        edge = "an edge stage" if stage in (1, num_stages) else "a stage with live stages on one side only"
        warnings.append(f"stage {stage} is {edge}: copying stage {only}, its only live neighbour")
        return RebuildPlan(stage, "copy", (only,), tuple(warnings))
    kind = "uniform" if mode == "uniform" else "checkfree"
    return RebuildPlan(stage, kind, (below, above), tuple(warnings))


def source_weights(kind: str, grad_norms: Sequence[float | None]) -> list[float]:
    """Averaging weights: CheckFree weighs each neighbour by its last gradient norm; uniform weighs them equally."""
    if kind == "checkfree":
        norms = [0.0 if n is None or not math.isfinite(n) else max(float(n), 0.0) for n in grad_norms]
        total = sum(norms)
        if total < EPSILON:  # neither neighbour has a gradient norm yet: fall back to equal weights
            return [1.0 / len(norms)] * len(norms)
        return [n / total for n in norms]
    return [1.0 / len(grad_norms)] * len(grad_norms)


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_j w_j W_j / sum_j w_j over state dicts with identical keys and shapes; each tensor keeps its dtype."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state dict, got {len(states)} states and {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")
    total = sum(weights)
    if total < EPSILON:
        raise ValueError("weights sum to zero")
    keys = list(states[0])
    for index, state in enumerate(states[1:], start=1):
        if set(state) != set(keys):
            missing, extra = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
            raise ValueError(f"state dict {index} does not match: missing {missing}, unexpected {extra}")
    averaged = {}
    for key in keys:
        tensors = [state[key] for state in states]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"{key} has different shapes across state dicts: {sorted(shapes)}")
        accumulator = torch.zeros_like(tensors[0], dtype=torch.float64)
        for tensor, weight in zip(tensors, weights):
            accumulator += tensor.to(torch.float64) * (weight / total)
        averaged[key] = accumulator.to(tensors[0].dtype)
    return averaged


def rebuild_weights(
    plan: RebuildPlan,
    source_states: Sequence[Mapping[str, torch.Tensor]],
    grad_norms: Sequence[float | None],
    fresh_state: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The lost stage's new weights from its plan: the sources' states (in plan order) or the fresh state."""
    if plan.kind in ("fresh", "random"):
        return {k: v.clone() for k, v in fresh_state.items()}
    if len(source_states) != len(plan.sources):
        raise ValueError(f"plan has {len(plan.sources)} sources but {len(source_states)} states were given")
    if plan.kind in ("copy", "checkfree+"):
        return {k: v.clone() for k, v in source_states[0].items()}
    return weighted_average(source_states, source_weights(plan.kind, grad_norms))

"""Seeded failure patterns: which stages lose all their peers at which step. Shared by `cfnode swarm --churn`
and the churn benchmark, so both see the same failures for the same seed."""

from __future__ import annotations

import random


def failure_schedule(num_stages: int, steps: int, rate: float, seed: int,
                     kills: list[tuple[int, int]] = ()) -> dict[int, list[int]]:
    """step -> sorted stages that fail when the trainer reaches that step.

    Each stage fails at each step independently with probability `rate`; `kills` adds fixed (stage, step) pairs.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"failure rate must be in [0, 1], got {rate}")
    rng = random.Random(seed)
    schedule: dict[int, set[int]] = {}
    for step in range(1, steps + 1):
        for stage in range(1, num_stages + 1):
            if rng.random() < rate:
                schedule.setdefault(step, set()).add(stage)
    for stage, step in kills:
        schedule.setdefault(step, set()).add(stage)
    return {step: sorted(stages) for step, stages in sorted(schedule.items())}

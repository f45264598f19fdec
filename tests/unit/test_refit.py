"""The refit loop and the activation cache (cfnode.recovery.refit)."""

from __future__ import annotations

import math

import torch

from cfnode.config import RunSpec
from cfnode.model import build_body_stage
from cfnode.recovery.refit import ActivationCache, refit

SPEC = RunSpec(num_stages=3, layers_per_stage=1, hidden_size=32, num_heads=2, seq_len=16)


def teacher_and_student():
    """A 'lost' stage (the teacher) and an approximation of it: its weights blended with another stage's."""
    torch.manual_seed(0)
    teacher, other, student = (build_body_stage(SPEC, s) for s in (2, 1, 2))
    with torch.no_grad():
        for t, o, s in zip(teacher.parameters(), other.parameters(), student.parameters()):
            s.copy_(0.5 * t + 0.5 * o)
    return teacher, student


def pairs_of(teacher, count: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(count):
        x = torch.randn(2, SPEC.seq_len, SPEC.hidden_size, generator=generator)
        with torch.no_grad():
            pairs.append((x, teacher(x)))
    return pairs


def error(model, pairs) -> float:
    with torch.no_grad():
        return sum(float(torch.nn.functional.mse_loss(model(x), y)) for x, y in pairs) / len(pairs)


def test_refit_moves_a_rebuilt_stage_towards_the_lost_one():
    teacher, student = teacher_and_student()
    unseen = pairs_of(teacher, 4, seed=99)
    before = error(student, unseen)
    result = refit(student, pairs_of(teacher, 12), max_steps=300, lr=3e-3)
    after = error(student, unseen)
    assert result.steps > 0 and result.pairs == 12
    assert result.loss_after < result.loss_before
    assert after < 0.7 * before, (before, after)  # on inputs it never saw, too


def test_refit_keeps_the_best_weights_and_never_worsens_the_held_out_loss():
    teacher, student = teacher_and_student()
    pairs = pairs_of(teacher, 8)
    result = refit(student, pairs, max_steps=50, lr=10.0)  # a learning rate that wrecks the weights
    assert result.loss_after <= result.loss_before
    assert math.isclose(error(student, [pairs[3], pairs[7]]), result.loss_after, rel_tol=1e-4)


def test_refit_with_too_few_pairs_changes_nothing():
    teacher, student = teacher_and_student()
    original = [p.clone() for p in student.parameters()]
    result = refit(student, pairs_of(teacher, 1), max_steps=100, lr=1e-3)
    assert result.stopped == "too few pairs" and result.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(original, student.parameters()))


def test_refit_stops_when_the_held_out_loss_stops_improving():
    teacher, _ = teacher_and_student()
    result = refit(teacher, pairs_of(teacher, 8), max_steps=10_000, lr=1e-3, patience=2)
    assert result.stopped == "no improvement" and result.steps < 10_000


def test_cache_keeps_the_last_k_pairs_per_stage_in_run_order():
    cache = ActivationCache(3)
    for i in range(5):
        cache.record(1, torch.full((1, 2, 4), float(i)), torch.full((1, 2, 4), float(10 + i)))
        if i % 2 == 0:
            cache.record(2, torch.full((1, 2, 4), float(i)), torch.zeros(1, 2, 4))
    assert [float(x[0, 0, 0]) for x, _ in cache.pairs(1)] == [2.0, 3.0, 4.0]
    assert [float(y[0, 0, 0]) for _, y in cache.pairs(1)] == [12.0, 13.0, 14.0]
    assert [float(x[0, 0, 0]) for x, _ in cache.pairs(2)] == [0.0, 2.0, 4.0]
    assert cache.pairs(3) == []
    assert cache.nbytes() == 6 * 2 * 8 * 4


def test_cache_of_size_zero_keeps_nothing():
    cache = ActivationCache(0)
    cache.record(1, torch.ones(1, 2, 4), torch.ones(1, 2, 4))
    assert cache.pairs(1) == [] and cache.nbytes() == 0


def test_cached_tensors_are_copies():
    cache = ActivationCache(2)
    x = torch.ones(1, 2, 4)
    cache.record(1, x, x)
    x.fill_(5.0)
    assert float(cache.pairs(1)[0][0].sum()) == 8.0


def test_only_rebuilds_from_neighbours_are_refitted():
    from cfnode.recovery.refit import refits

    assert [kind for kind in ("checkfree", "checkfree+", "uniform", "copy", "random", "fresh") if refits(kind)] == [
        "checkfree", "checkfree+", "uniform", "copy"]


def test_a_refit_stops_at_its_time_budget_with_the_weights_it_has():
    import torch

    from cfnode.recovery.refit import refit

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    pairs = [(torch.randn(2, 4), torch.randn(2, 4)) for _ in range(8)]
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    result = refit(model, pairs, 10_000, 1e-2, max_seconds=0.0, progress=lambda steps, best: seen.append(steps))
    assert (result.stopped, result.steps) == ("time budget", 0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing better found: unchanged
    result = refit(model, pairs, 12, 1e-2, progress=lambda steps, best: seen.append(steps))
    assert result.stopped in ("max steps", "no improvement") and seen and seen[-1] <= 12

"""The CheckFree rebuild rules: the decision table and the averaging math, on known tensors."""

import math

import pytest
import torch

from cfnode.recovery.rebuild import (
    EPSILON,
    nearest_live,
    plan_rebuild,
    rebuild_weights,
    source_weights,
    weighted_average,
)


def test_checkfree_formula_on_known_tensors():
    left = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    right = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([[3.0]])}
    # W = (w1 W1 + w3 W3) / (w1 + w3) with w1 = 1, w3 = 2
    plan = plan_rebuild(2, 3, {1, 3}, "checkfree", trained=True)
    rebuilt = rebuild_weights(plan, [left, right], [1.0, 2.0], fresh_state={})
    torch.testing.assert_close(rebuilt["w"], torch.tensor([3.0, 6.0]))
    torch.testing.assert_close(rebuilt["b"], torch.tensor([[2.0]]))


def test_weights_are_proportional_to_gradient_norms():
    assert source_weights("checkfree", [1.0, 3.0]) == pytest.approx([0.25, 0.75])
    assert source_weights("checkfree", [10.0, 10.0]) == pytest.approx([0.5, 0.5])
    assert source_weights("uniform", [1.0, 3.0]) == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("norms", [[0.0, 0.0], [None, None], [float("nan"), 0.0]])
def test_zero_or_missing_norms_fall_back_to_equal_weights(norms):
    assert source_weights("checkfree", norms) == pytest.approx([0.5, 0.5])


def test_one_zero_norm_gives_all_weight_to_the_other():
    assert source_weights("checkfree", [0.0, 2.0]) == pytest.approx([0.0, 1.0])
    assert EPSILON > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_average_keeps_dtype(dtype):
    a = {"x": torch.ones(3, dtype=dtype)}
    b = {"x": torch.full((3,), 3.0, dtype=dtype)}
    out = weighted_average([a, b], [1.0, 1.0])
    assert out["x"].dtype == dtype
    torch.testing.assert_close(out["x"], torch.full((3,), 2.0, dtype=dtype))


def test_average_rejects_mismatched_shapes_and_keys():
    with pytest.raises(ValueError, match="different shapes"):
        weighted_average([{"x": torch.ones(2)}, {"x": torch.ones(3)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="missing"):
        weighted_average([{"x": torch.ones(2)}, {"y": torch.ones(2)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="one weight per state"):
        weighted_average([{"x": torch.ones(2)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_average([{"x": torch.ones(2)}, {"x": torch.ones(2)}], [1.0, -1.0])
    with pytest.raises(ValueError, match="sum to zero"):
        weighted_average([{"x": torch.ones(2)}, {"x": torch.ones(2)}], [0.0, 0.0])


def test_inputs_are_not_modified_and_copies_are_independent():
    a, b = {"x": torch.ones(2)}, {"x": torch.zeros(2)}
    plan = plan_rebuild(1, 3, {2, 3}, "checkfree", trained=True)
    copied = rebuild_weights(plan, [a], [1.0], fresh_state={})
    copied["x"] += 5
    assert torch.equal(a["x"], torch.ones(2)) and torch.equal(b["x"], torch.zeros(2))


@pytest.mark.parametrize(
    "stage, live, expected",
    [
        (2, {1, 3}, (1, 3)),
        (3, {1, 5}, (1, 5)),
        (1, {2, 3}, (None, 2)),
        (4, {1, 2}, (2, None)),
        (2, set(), (None, None)),
    ],
)
def test_nearest_live(stage, live, expected):
    assert nearest_live(stage, 5, live) == expected


def test_decision_table():
    # Intermediate stage, both neighbours live: CheckFree from both.
    plan = plan_rebuild(2, 4, {1, 3, 4}, "checkfree", trained=True)
    assert (plan.kind, plan.sources, plan.warnings) == ("checkfree", (1, 3), ())
    # Uniform ablation.
    assert plan_rebuild(2, 4, {1, 3, 4}, "uniform", trained=True).kind == "uniform"
    # Edge stage without CheckFree+: copy the single neighbour, with a warning.
    edge = plan_rebuild(1, 4, {2, 3, 4}, "checkfree", trained=True)
    assert edge.kind == "copy" and edge.sources == (2,) and "edge stage" in edge.warnings[-1]
    last = plan_rebuild(4, 4, {1, 2, 3}, "checkfree", trained=True)
    assert last.sources == (3,)
    # Neighbours lost too: nearest live stage on each side, with a warning.
    far = plan_rebuild(3, 5, {1, 5}, "checkfree", trained=True)
    assert far.sources == (1, 5) and len(far.warnings) == 2
    # A swarm that never trained, recovery none and random: fresh weights.
    assert plan_rebuild(2, 4, {1, 3}, "checkfree", trained=False).kind == "fresh"
    assert plan_rebuild(2, 4, {1, 3}, "none", trained=True).kind == "fresh"
    assert plan_rebuild(2, 4, {1, 3}, "random", trained=True).kind == "random"
    # Copy ablation: the previous stage.
    assert plan_rebuild(3, 4, {2, 4}, "copy", trained=True).sources == (2,)
    # Nothing live at all.
    alone = plan_rebuild(2, 3, set(), "checkfree", trained=True)
    assert alone.kind == "fresh" and alone.warnings
    with pytest.raises(ValueError, match="does not exist"):
        plan_rebuild(5, 4, {1}, "checkfree", trained=True)


def test_fresh_and_random_use_the_fresh_state():
    fresh = {"x": torch.arange(3.0)}
    for mode in ("random", "none"):
        plan = plan_rebuild(2, 3, {1, 3}, mode, trained=True)
        out = rebuild_weights(plan, [], [], fresh)
        assert torch.equal(out["x"], fresh["x"]) and out["x"] is not fresh["x"]
    assert math.isclose(sum(source_weights("checkfree", [0.3, 0.7])), 1.0)


def test_checkfree_plus_copies_the_edge_neighbour_exactly():
    first = plan_rebuild(1, 4, {2, 3, 4}, "checkfree+", trained=True)
    assert (first.kind, first.sources, first.warnings) == ("checkfree+", (2,), ())
    last = plan_rebuild(4, 4, {1, 2, 3}, "checkfree+", trained=True)
    assert (last.kind, last.sources) == ("checkfree+", (3,))
    # Intermediate stages still average their neighbours.
    assert plan_rebuild(2, 4, {1, 3, 4}, "checkfree+", trained=True).kind == "checkfree"
    # The stand-in neighbour is lost as well: fall back to copying the nearest live stage, with a warning.
    far = plan_rebuild(1, 4, {3, 4}, "checkfree+", trained=True)
    assert far.kind == "copy" and far.sources == (3,) and far.warnings
    neighbour = {"x": torch.randn(4)}
    copied = rebuild_weights(first, [neighbour], [0.5], fresh_state={})
    assert torch.equal(copied["x"], neighbour["x"])

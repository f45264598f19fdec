import pytest

from cfnode.recovery.schedule import microbatch_routes, route_order


def test_paper_order_for_four_or_more_stages():
    assert route_order(4, swapped=False) == [1, 2, 3, 4]
    assert route_order(4, swapped=True) == [2, 1, 4, 3]
    assert route_order(6, swapped=True) == [2, 1, 3, 4, 6, 5]


def test_small_swarms():
    assert route_order(2, swapped=True) == [2, 1]
    assert route_order(3, swapped=True, variant=0) == [2, 1, 3]
    assert route_order(3, swapped=True, variant=1) == [1, 3, 2]
    assert route_order(1, swapped=False) == [1]
    with pytest.raises(ValueError, match="at least 2 body stages"):
        route_order(1, swapped=True)


@pytest.mark.parametrize("stages", [2, 3, 4, 7])
def test_every_route_visits_every_stage_once(stages):
    for route in microbatch_routes(stages, 8, "checkfree+", 0.5):
        assert sorted(route) == list(range(1, stages + 1))


def test_fraction_of_swapped_microbatches():
    routes = microbatch_routes(4, 8, "checkfree+", 0.5)
    assert sum(r != [1, 2, 3, 4] for r in routes) == 4
    assert routes[0] != routes[1]  # spread over the step, not bunched at the end
    assert sum(r != [1, 2, 3, 4] for r in microbatch_routes(4, 8, "checkfree+", 0.25)) == 2
    assert all(r == [1, 2, 3, 4] for r in microbatch_routes(4, 8, "checkfree+", 0.0))
    assert all(r == [2, 1, 4, 3] for r in microbatch_routes(4, 3, "checkfree+", 1.0))
    # Three stages: swapped microbatches alternate between the two half-swaps.
    swapped = [r for r in microbatch_routes(3, 4, "checkfree+", 0.5) if r != [1, 2, 3]]
    assert swapped == [[2, 1, 3], [1, 3, 2]]


@pytest.mark.parametrize("mode", ["none", "checkfree", "uniform", "copy", "random"])
def test_other_modes_never_swap(mode):
    assert all(r == [1, 2, 3, 4] for r in microbatch_routes(4, 6, mode, 0.5))


def test_bad_fraction():
    with pytest.raises(ValueError, match="swap fraction"):
        microbatch_routes(4, 4, "checkfree+", 1.5)

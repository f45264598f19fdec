import pytest

from cfnode.recovery.failures import failure_schedule


def test_schedule_is_seeded_and_rate_shaped():
    a = failure_schedule(4, 2000, 0.05, seed=7)
    assert a == failure_schedule(4, 2000, 0.05, seed=7)
    assert a != failure_schedule(4, 2000, 0.05, seed=8)
    failures = sum(len(stages) for stages in a.values())
    assert 0.04 * 8000 < failures < 0.06 * 8000
    assert all(1 <= stage <= 4 for stages in a.values() for stage in stages)
    assert all(1 <= step <= 2000 for step in a)


def test_fixed_kills_and_edge_rates():
    assert failure_schedule(3, 10, 0.0, seed=0) == {}
    assert failure_schedule(3, 10, 0.0, seed=0, kills=[(2, 4), (1, 4), (3, 9)]) == {4: [1, 2], 9: [3]}
    assert failure_schedule(2, 3, 1.0, seed=0) == {1: [1, 2], 2: [1, 2], 3: [1, 2]}
    with pytest.raises(ValueError, match="failure rate"):
        failure_schedule(3, 10, 1.5, seed=0)

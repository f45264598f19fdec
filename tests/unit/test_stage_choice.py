import pytest

from cfnode.node.stage_choice import choose_stage, stage_capacity
from cfnode.protocol.records import PeerState, StageAnnouncement

_counter = iter(range(10**6))


def peer(stage: int, throughput: float = 100.0, state: PeerState = PeerState.ONLINE) -> StageAnnouncement:
    return StageAnnouncement(peer_id=f"Qm{next(_counter)}", stage=stage, state=state, step=0, throughput=throughput,
                             load=0, grad_norm=None, source="fresh")


def test_empty_map_picks_stage_one():
    assert choose_stage({}, 3) == 1
    assert choose_stage({1: [], 2: [], 3: []}, 3) == 1


def test_lowest_lost_stage():
    stage_map = {1: [peer(1)], 2: [], 3: [peer(3)], 4: []}
    assert choose_stage(stage_map, 4) == 2
    # a stage missing from the map is lost too
    assert choose_stage({1: [peer(1)], 2: [peer(2)]}, 3) == 3
    # a lost stage wins over any throughput difference
    assert choose_stage({1: [peer(1, 1.0)], 2: [peer(2, 1e9)], 3: []}, 3) == 3


def test_joining_counts_as_live():
    stage_map = {1: [peer(1, state=PeerState.JOINING)], 2: [], 3: [peer(3)]}
    assert choose_stage(stage_map, 3) == 2


def test_leaving_does_not_count():
    stage_map = {1: [peer(1)], 2: [peer(2, 1e6, state=PeerState.LEAVING)], 3: [peer(3)]}
    assert choose_stage(stage_map, 3) == 2
    assert stage_capacity(stage_map[2]) == 0


def test_all_served_picks_least_throughput():
    stage_map = {1: [peer(1, 50), peer(1, 60)], 2: [peer(2, 100)], 3: [peer(3, 90)]}
    assert choose_stage(stage_map, 3) == 3
    assert stage_capacity(stage_map[1]) == 110


def test_throughput_counts_joining_not_leaving():
    stage_map = {
        1: [peer(1, 10), peer(1, 200, state=PeerState.JOINING)],  # 210
        2: [peer(2, 100), peer(2, 1000, state=PeerState.LEAVING)],  # 100
    }
    assert choose_stage(stage_map, 2) == 2


def test_tie_goes_to_fewer_peers():
    stage_map = {1: [peer(1, 50), peer(1, 50)], 2: [peer(2, 100)], 3: [peer(3, 150)]}
    assert choose_stage(stage_map, 3) == 2


def test_tie_in_both_goes_to_lower_number():
    stage_map = {1: [peer(1, 80)], 2: [peer(2, 50)], 3: [peer(3, 50)]}
    assert choose_stage(stage_map, 3) == 2
    stage_map = {1: [peer(1, 0.0)], 2: [peer(2, 0.0)], 3: [peer(3, 0.0)]}
    assert choose_stage(stage_map, 3) == 1


def test_stages_outside_range_ignored():
    stage_map = {1: [peer(1, 50)], 2: [peer(2, 100)], 7: [peer(7, 1)]}
    assert choose_stage(stage_map, 2) == 1


@pytest.mark.parametrize("num_stages", [1, 2, 5])
def test_single_stage_each(num_stages):
    stage_map = {s: [peer(s, 10.0 * s)] for s in range(1, num_stages + 1)}
    assert choose_stage(stage_map, num_stages) == 1

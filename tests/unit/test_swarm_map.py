from hivemind.utils import get_dht_time

from cfnode.node.swarm_map import merge_stage_maps, swarm_step
from cfnode.protocol.records import PeerState, StageAnnouncement


def record(peer: str, stage: int = 1, age: float = 0.0, state: PeerState = PeerState.ONLINE, step: int = 0):
    return StageAnnouncement(peer_id=peer, stage=stage, state=state, step=step, throughput=0.0, load=0,
                             grad_norm=None, source="fresh", announced_at=get_dht_time() - age)


def test_merge_keeps_the_latest_record_per_peer_and_drops_expired_ones():
    older = {1: [record("a", age=2.0), record("gone", age=30.0)], 2: [record("b", 2, age=1.0)]}
    newer = {1: [record("a", age=0.0, state=PeerState.LEAVING)], 2: []}
    merged = merge_stage_maps(older, newer, ttl=10.0)
    assert [(p.peer_id, p.state) for p in merged[1]] == [("a", PeerState.LEAVING)]
    # A read that came back empty does not erase a record that has not expired.
    assert [p.peer_id for p in merged[2]] == ["b"]


def test_swarm_step_is_the_highest_online_step():
    stage_map = {1: [record("a", step=4), record("b", step=9, state=PeerState.JOINING)], 2: [record("c", 2, step=5)]}
    assert swarm_step(stage_map) == 5
    assert swarm_step({1: [], 2: []}) == 0

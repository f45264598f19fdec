from hivemind.utils import get_dht_time

from cfnode.config import RunSpec
from cfnode.node.swarm_map import merge_stage_maps, swarm_step
from cfnode.protocol.identity import create_identity
from cfnode.protocol.records import PeerState, StageAnnouncement
from cfnode.protocol.trust import public_key_line, sign_step


def record(peer: str, stage: int = 1, age: float = 0.0, state: PeerState = PeerState.ONLINE, step: int = 0,
           proof: str = ""):
    return StageAnnouncement(peer_id=peer, stage=stage, state=state, step=step, throughput=0.0, load=0,
                             grad_norm=None, source="fresh", announced_at=get_dht_time() - age, step_proof=proof)


def test_merge_keeps_the_latest_record_per_peer_and_drops_expired_ones():
    older = {1: [record("a", age=2.0), record("gone", age=30.0)], 2: [record("b", 2, age=1.0)]}
    newer = {1: [record("a", age=0.0, state=PeerState.LEAVING)], 2: []}
    merged = merge_stage_maps(older, newer, ttl=10.0)
    assert [(p.peer_id, p.state) for p in merged[1]] == [("a", PeerState.LEAVING)]
    # A read that came back empty does not erase a record that has not expired.
    assert [p.peer_id for p in merged[2]] == ["b"]


def test_swarm_step_is_the_highest_online_step_a_trainer_of_the_run_signed(tmp_path):
    trainer = create_identity(str(tmp_path / "trainer.key"))
    forger = create_identity(str(tmp_path / "forger.key"))
    spec = RunSpec(trainer_keys=(public_key_line(trainer),))
    signed = {n: sign_step(trainer, spec.run_id, n) for n in (4, 5, 9)}
    stage_map = {1: [record("a", step=4, proof=signed[4]), record("b", step=9, state=PeerState.JOINING,
                                                                  proof=signed[9])],
                 2: [record("c", 2, step=5, proof=signed[5])]}
    assert swarm_step(stage_map, spec) == 5
    assert swarm_step({1: [], 2: []}, spec) == 0
    # Claims without a valid proof move nothing: none at all, another step's, another run's, a forger's.
    forged = [record("x", step=500), record("y", step=6, proof=signed[5]),
              record("z", step=7, proof=sign_step(trainer, "other-run", 7)),
              record("w", step=8, proof=sign_step(forger, spec.run_id, 8))]
    assert swarm_step({**stage_map, 3: forged}, spec) == 5

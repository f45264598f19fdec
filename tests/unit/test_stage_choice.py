import pytest

from cfnode.node.stage_choice import StageChoice, assign_stages, choose_stage, stage_capacity, typical_throughput
from cfnode.protocol.records import JoinClaim, PeerState, StageAnnouncement

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


def claim(name: str, at: float, stage: int = 0) -> JoinClaim:
    return JoinClaim(peer_id=name, claimed_at=at, stage=stage)


def test_six_newcomers_on_an_empty_three_stage_run_take_two_stages_each():
    claims = [claim(f"n{i}", 100.0 + i * 0.01) for i in range(6)]
    choices = assign_stages({}, claims, 3)
    assert [choices[f"n{i}"].stage for i in range(6)] == [1, 2, 3, 1, 2, 3]
    # The second on each stage knows the first, to copy it rather than start its own.
    assert [choices[f"n{i}"].ahead for i in range(3, 6)] == [("n0",), ("n1",), ("n2",)]
    assert all(choices[f"n{i}"].ahead == () for i in range(3))


def test_a_choice_depends_only_on_the_claims_before_it():
    claims = [claim(f"n{i}", 100.0 + i) for i in range(6)]
    everyone = assign_stages({}, claims, 3)
    for seen in range(1, 7):  # a newcomer that sees only the claims up to its own agrees with one that sees all
        partial = assign_stages({}, claims[:seen], 3)
        assert all(partial[c.peer_id] == everyone[c.peer_id] for c in claims[:seen])
    # Claims read in another order give the same queue: (claimed_at, peer id).
    assert assign_stages({}, list(reversed(claims)), 3) == everyone
    tied = assign_stages({}, [claim("b", 5.0), claim("a", 5.0)], 3)
    assert (tied["a"].stage, tied["b"].stage) == (1, 2)


def test_a_lost_stage_is_taken_first_and_no_herd_follows():
    stage_map = {1: [peer(1, 100)], 2: [], 3: [peer(3, 120)]}
    choices = assign_stages(stage_map, [claim("x", 1.0), claim("y", 2.0), claim("z", 3.0)], 3)
    assert choices["x"].stage == 2
    # A newcomer counts as a typical peer (the median online throughput, 110), so the next ones spread over the
    # weakest stages instead of all piling onto stage 1.
    assert [choices["y"].stage, choices["z"].stage] == [1, 2]
    assert choices["z"].ahead == ("x",)


def test_decided_and_announced_claimants():
    joining = peer(2, 0.0, state=PeerState.JOINING)
    stage_map = {1: [peer(1)], 2: [joining], 3: [peer(3)]}
    # An announced claimant is not pending; a claimant that asked for a stage holds it.
    choices = assign_stages(stage_map, [claim(joining.peer_id, 1.0), claim("asked", 2.0, stage=2),
                                        claim("free", 3.0)], 3)
    assert joining.peer_id not in choices
    assert choices["asked"] == StageChoice(2, (joining.peer_id,))
    assert choices["free"].stage in (1, 3)
    # A claim for a stage the run does not have is chosen for instead.
    assert 1 <= assign_stages({}, [claim("odd", 1.0, stage=9)], 3)["odd"].stage <= 3


def test_a_joining_peer_that_claimed_later_is_not_ahead():
    """Two newcomers for one lost stage: the one that claimed first was slow to choose, and the other chose and
    announced JOINING meanwhile. The first must not wait for the second, which waits for it: the queue order
    (claimed_at, peer id) decides who is ahead, whether the other is seen as a claim or as a JOINING record."""
    from dataclasses import replace

    later = replace(peer(2, 0.0, state=PeerState.JOINING), claimed_at=5.0)
    earlier = replace(peer(2, 0.0, state=PeerState.JOINING), claimed_at=1.0)
    stage_map = {1: [peer(1)], 2: [later], 3: [peer(3)]}
    assert assign_stages(stage_map, [claim("first", 2.0, stage=2)], 3)["first"] == StageChoice(2, ())
    # And the later one, choosing while the first still claimed, waits for it.
    assert assign_stages({1: [peer(1)], 2: [], 3: [peer(3)]}, [claim("first", 2.0), claim("second", 5.0, stage=2)],
                         3)["second"] == StageChoice(2, ("first",))
    # A JOINING record that claimed earlier is ahead, before earlier claimants that have not announced yet.
    stage_map = {1: [peer(1)], 2: [earlier, later], 3: [peer(3)]}
    assert assign_stages(stage_map, [claim("c", 0.5, stage=2), claim("d", 3.0, stage=2)], 3) == {
        "c": StageChoice(2, ()), "d": StageChoice(2, ("c", earlier.peer_id))}


def test_typical_throughput_is_the_online_median():
    stage_map = {1: [peer(1, 10), peer(1, 30)], 2: [peer(2, 20), peer(2, 999, state=PeerState.LEAVING)],
                 3: [peer(3, 0.0, state=PeerState.JOINING)]}
    assert typical_throughput(stage_map) == 20
    assert stage_capacity(stage_map[3], typical=20) == 20
    assert typical_throughput({}) == 0.0

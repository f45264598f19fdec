"""Newcomers that start together spread over the stages, and those that race for one stage become replicas of
the first: six `cfnode join --stage auto` on a new 3-stage run give two peers per stage, every time; two newcomers
for a lost stage give one rebuild and one exact copy of it, even when one of them first sees an empty swarm and the
rebuild takes longer than an announcement lives."""

from __future__ import annotations

from collections import Counter

from tests.integration.harness import wait_until


def test_six_simultaneous_newcomers_take_two_stages_each(swarm):
    swarm.start_bootstrap()
    newcomers = [swarm.start_peer("auto") for _ in range(6)]  # within a fraction of a second, as compose does
    swarm.wait_online({1: 2, 2: 2, 3: 2}, timeout=120)
    report = swarm.status()
    peers = [p for stage in report["stages"] for p in stage["peers"]]
    assert Counter(p["stage"] for p in peers if p["state"] == "ONLINE") == {1: 2, 2: 2, 3: 2}
    assert len(peers) == 6, peers
    for stage in report["stages"]:
        sources = sorted(p["source"] for p in stage["peers"])
        assert sources == ["fresh", "replica"], stage
        first = next(p for p in stage["peers"] if p["source"] == "fresh")
        second = next(p for p in stage["peers"] if p["source"] == "replica")
        assert second["recovered_from"] == [f"{stage['stage']}:{first['peer_id']}"]
    assert all(child.process.poll() is None for child in newcomers)


def test_newcomers_racing_for_a_lost_stage_rebuild_it_once(swarm):
    trainer, _ = swarm.train_then_kill(2, steps=12, kill_after=4)
    # Two newcomers for the lost stage at once. The first three looks of one of them at the swarm come back empty,
    # as through a bootstrap that has just restarted: it must wait for live stages, not start an island. Whichever
    # rebuilds then holds on for over twice the announcement TTL, as a long refit does: its JOINING record must stay
    # on the map meanwhile, or the other would take it for gone and rebuild the stage a second time.
    slow = {"CFNODE_FAULT_DELAY": str(2.5 * swarm.spec.announce_ttl)}
    blind = swarm.start_peer(2, env={"CFNODE_FAULTS": "empty_view,empty_view,empty_view,slow_rebuild", **slow})
    racers = [blind, swarm.start_peer(2, env={"CFNODE_FAULTS": "slow_rebuild", **slow})]
    assert trainer.process.wait(300) == 0, swarm.log(trainer)

    # A copy that joined in the last steps may not have been sent work since (it catches up at its next request),
    # so only the rebuilt peer is sure to announce the final step; announcements lag by up to a refresh.
    def stage2_at_the_end() -> list[dict]:
        online = [p for p in {s["stage"]: s for s in swarm.status()["stages"]}[2]["peers"] if p["state"] == "ONLINE"]
        return online if len(online) == 2 and max(p["step"] for p in online) == 12 else []

    mine = stage2 = wait_until(stage2_at_the_end, 30, "both stage 2 peers online, one at step 12")
    sources = Counter(p["source"] for p in mine)
    assert sources == {"checkfree": 1, "replica": 1}, stage2
    rebuilt = next(p for p in mine if p["source"] == "checkfree")
    copy = next(p for p in mine if p["source"] == "replica")
    assert copy["recovered_from"] == [f"2:{rebuilt['peer_id']}"]
    assert sum("rebuilt by checkfree" in swarm.log(r) for r in racers) == 1
    assert "waiting for one rather than starting from fresh weights" in swarm.log(blind)
    assert not any("source: fresh" in swarm.log(r) for r in racers)

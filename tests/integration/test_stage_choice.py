"""Newcomers that start together spread over the stages, and those that race for one stage become replicas of
the first: six `cfnode join --stage auto` on a new 3-stage run give two peers per stage, every time; two newcomers
for a lost stage give one rebuild and one exact copy of it."""

from __future__ import annotations

from collections import Counter


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
    trainer, _ = swarm.train_then_kill(2, steps=14, kill_after=4)
    racers = [swarm.start_peer(2), swarm.start_peer(2)]
    assert trainer.process.wait(300) == 0, swarm.log(trainer)
    stage2 = {s["stage"]: s for s in swarm.status()["stages"]}[2]["peers"]
    mine = [p for p in stage2 if p["peer_id"] != "" and p["state"] == "ONLINE"]
    sources = Counter(p["source"] for p in mine)
    assert sources == {"checkfree": 1, "replica": 1}, stage2
    rebuilt = next(p for p in mine if p["source"] == "checkfree")
    copy = next(p for p in mine if p["source"] == "replica")
    assert copy["recovered_from"] == [f"2:{rebuilt['peer_id']}"]
    assert copy["step"] == rebuilt["step"] == 14
    assert sum("rebuilt by checkfree" in swarm.log(r) for r in racers) == 1

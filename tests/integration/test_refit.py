"""A live swarm with refit on: a newcomer that rebuilds a lost stage refits it on the trainer's cached activations
and reports it; without a trainer to ask, it skips the refit and says why."""

from __future__ import annotations

from tests.integration.harness import read_events, wait_until


def steps_of(events):
    return [e for e in events if e["event"] == "step"]


def test_newcomer_refits_a_rebuilt_stage_from_the_trainers_cache(swarm):
    swarm.spec = swarm.spec.replace(refit_cache=8, refit_steps=100)
    swarm.start_bootstrap()
    peers = {stage: swarm.start_peer(stage) for stage in (1, 2, 3)}
    swarm.wait_online({1: 1, 2: 1, 3: 1})
    trainer, jsonl = swarm.start_trainer(24)
    wait_until(lambda: len(steps_of(read_events(jsonl))) >= 8, 180, "8 training steps")
    swarm.kill(peers[2])
    newcomer = swarm.start_peer("auto")
    assert trainer.process.wait(300) == 0, swarm.log(trainer)

    log = swarm.log(newcomer)
    assert "rebuilt by checkfree from stage 1" in log
    assert "refit on 8 cached pairs from trainer" in log, log
    (recovered,) = [e for e in read_events(jsonl) if e["event"] == "stage_recovered" and e["stage"] == 2]
    refit = recovered["refit"]
    assert recovered["source"] == "checkfree" and refit["pairs"] == 8 and refit["steps"] > 0
    assert refit["loss_after"] <= refit["loss_before"]
    (shown,) = swarm.online_peers(2)
    assert shown["refit"]["loss_after"] == refit["loss_after"]

    # The trainer is gone: the next newcomer that rebuilds stage 2 has no cache to ask, and says so.
    swarm.kill(newcomer)
    second = swarm.start_peer("auto")
    wait_until(lambda: "serving stage 2" in swarm.log(second), 120, "the second newcomer serving stage 2")
    assert "skipping the refit" in swarm.log(second)
    wait_until(lambda: "skipped" in (swarm.online_peers(2) or [{}])[0].get("refit", {}), 30, "status showing the skip")

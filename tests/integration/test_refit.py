"""A live swarm with refit on: a newcomer that rebuilds a lost stage refits it on the trainer's cached activations
and reports it; without a trainer to ask, it skips the refit and says why."""

from __future__ import annotations

from tests.integration.harness import read_events, wait_until


def test_newcomer_refits_a_rebuilt_stage_from_the_trainers_cache(swarm):
    swarm.spec = swarm.spec.replace(refit_cache=8, refit_steps=100)
    _, newcomer, jsonl = swarm.train_and_lose_stage(2, steps=24, lose_after=8)

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


def test_recovery_that_starts_from_fresh_weights_is_not_refitted(swarm):
    # The trainer holds cached activations of the lost stage, but `random` means fresh weights: no refit. (`none`
    # rebuilds as `fresh`, which tests/unit/test_refit.py covers with the same rule.)
    recovery, source = "random", "random"
    swarm.spec = swarm.spec.replace(recovery=recovery, refit_cache=8)
    _, newcomer, jsonl = swarm.train_and_lose_stage(2, steps=12, lose_after=4)
    assert "refit on" not in swarm.log(newcomer)
    (recovered,) = [e for e in read_events(jsonl) if e["event"] == "stage_recovered" and e["stage"] == 2]
    assert recovered["source"] == source
    assert recovered["refit"] == {"skipped": f"{source} weights are not refitted"}

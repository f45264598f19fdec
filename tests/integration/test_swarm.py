"""A live swarm of real processes on 127.0.0.1: training, replicas, failures and late joiners."""

from __future__ import annotations

import torch

from cfnode.bench.trace import read_traces, step_boundaries
from cfnode.node.runtime import connect
from cfnode.protocol.service import StageClient
from tests.integration.harness import client_identity, network, read_events, run_async, wait_until


def steps_of(events):
    return [e for e in events if e["event"] == "step"]


async def download_all(maddr: str, spec, stage: int, peer_ids: list[str]):
    async with connect(network(maddr, client_identity(maddr))) as (_dht, p2p, _identity):
        client = StageClient(p2p, 2**26, spec=spec)
        return [await client.download_state(peer, stage, timeout=60) for peer in peer_ids]


def assert_identical(states) -> None:
    first = states[0]
    for other in states[1:]:
        assert other.step == first.step
        assert other.names == first.names
        for name, a, b in zip(first.names, first.tensors, other.tensors):
            assert torch.equal(a, b), f"{name} differs between replicas"


def test_bootstrap_three_peers_and_trainer_loss_falls(swarm):
    swarm.start_bootstrap()
    traces = swarm.workdir / "traces"
    for stage in (1, 2, 3):
        swarm.start_peer(stage, "--trace-dir", str(traces))
    trainer, jsonl = swarm.start_trainer(20)
    assert trainer.process.wait(300) == 0, swarm.log(trainer)
    steps = steps_of(read_events(jsonl))
    assert [e["step"] for e in steps] == list(range(1, 21))
    first = sum(e["loss"] for e in steps[:3]) / 3
    last = sum(e["loss"] for e in steps[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert all(e["tokens"] == 8 * swarm.spec.seq_len and e["tokens_per_s"] > 0 for e in steps)
    # Every stage reports its step and gradient norm.
    report = swarm.status()
    for stage in report["stages"]:
        (peer,) = stage["peers"]
        assert peer["state"] == "ONLINE" and peer["step"] == 20 and peer["grad_norm"] > 0
        assert peer["source"] == "fresh"
    # Each stage traced every microbatch's forward and backward and every step it computed.
    calls = read_traces(traces)
    for stage in (1, 2, 3):
        mine = [c for c in calls if c.stage == stage]
        assert {c.step for c in mine if c.kind == "step"} == set(range(20))
        trained = {(s, m) for s in range(20) for m in range(4)}
        assert {(c.step, c.microbatch) for c in mine if c.kind == "backward"} == trained
        assert trained <= {(c.step, c.microbatch) for c in mine if c.kind == "forward"}
        assert all(0 <= c.end - c.start < 60 for c in mine)
    assert len(step_boundaries(calls)) == 19  # stage 1 between each two steps
    assert {c.step for c in calls if c.kind == "evaluate"} == {20}  # the validation loss at the end


def test_replica_killed_mid_run_and_late_joiner_gets_identical_state(swarm):
    swarm.start_bootstrap()
    swarm.start_peer(1)
    victim = swarm.start_peer(2)
    swarm.start_peer(2)
    swarm.start_peer(3)
    swarm.wait_online({1: 1, 2: 2, 3: 1})
    trainer, jsonl = swarm.start_trainer(30)
    wait_until(lambda: len(steps_of(read_events(jsonl))) >= 8, 180, "8 training steps")
    swarm.kill(victim)
    assert trainer.process.wait(300) == 0, swarm.log(trainer)
    events = read_events(jsonl)
    assert len(steps_of(events)) == 30
    assert steps_of(events)[-1]["step"] == 30

    # The surviving replica and a late joiner that copies it hold the same weights, optimiser state and step.
    survivors = swarm.online_peers(2)
    assert len(survivors) == 1 and survivors[0]["step"] == 30
    swarm.start_peer(2)
    wait_until(lambda: len(swarm.online_peers(2)) == 2, 90, "the late joiner to come online")
    peers = swarm.online_peers(2)
    (newcomer,) = [p for p in peers if p["peer_id"] != survivors[0]["peer_id"]]
    assert newcomer["source"] == "replica" and newcomer["recovered_from"] == [f"2:{survivors[0]['peer_id']}"]
    assert "copied step 30 from replica" in swarm.log(swarm.children[-1])
    states = run_async(download_all, swarm.maddr, swarm.spec, 2, [p["peer_id"] for p in peers])
    assert states[0].step == 30
    assert any(name.startswith("optim.") for name in states[0].names)
    assert_identical(states)


def test_replicas_stay_identical_while_training(swarm):
    swarm.spec = swarm.spec.replace(num_stages=2)
    swarm.start_bootstrap()
    swarm.start_peer(1)
    swarm.start_peer(1)
    swarm.start_peer(2)
    swarm.wait_online({1: 2, 2: 1})
    trainer, jsonl = swarm.start_trainer(10)
    assert trainer.process.wait(300) == 0, swarm.log(trainer)
    peers = swarm.online_peers(1)
    assert len(peers) == 2
    states = run_async(download_all, swarm.maddr, swarm.spec, 1, [p["peer_id"] for p in peers])
    assert states[0].step == 10
    assert_identical(states)


def test_trainer_waits_for_a_lost_stage_and_resumes(swarm):
    swarm.start_bootstrap()
    swarm.start_peer(1)
    victim = swarm.start_peer(2)
    swarm.start_peer(3)
    trainer, jsonl = swarm.start_trainer(16)
    wait_until(lambda: len(steps_of(read_events(jsonl))) >= 5, 180, "5 training steps")
    swarm.kill(victim)
    wait_until(lambda: any(e["event"] == "stage_lost" for e in read_events(jsonl)), 60, "stage_lost")
    swarm.start_peer(2)
    assert trainer.process.wait(300) == 0, swarm.log(trainer)
    events = read_events(jsonl)
    # Only stage 2's events matter: a loaded machine can add a transient blip of another stage.
    lost = [e for e in events if e["event"] == "stage_lost" and e["stage"] == 2]
    recovered = [e for e in events if e["event"] == "stage_recovered" and e["stage"] == 2]
    assert lost and recovered and recovered[-1]["downtime"] > 0
    assert len(steps_of(events)) == 16
    assert "stage 2 has no usable peer" in swarm.log(trainer)


def test_killed_peer_record_expires_within_ttl(swarm):
    swarm.start_bootstrap()
    victim = swarm.start_peer(1)
    swarm.wait_online({1: 1})
    swarm.kill(victim)
    import time

    killed_at = time.monotonic()
    wait_until(lambda: not swarm.status()["stages"][0]["peers"], swarm.spec.announce_ttl + 10, "the record to expire")
    # Each status call takes a moment of its own, so allow it on top of the TTL.
    assert time.monotonic() - killed_at < swarm.spec.announce_ttl + 10

"""A stopped trainer's successor resumes from the swarm's step with the embedding and head its predecessor saved."""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from cfnode.node.runtime import connect
from cfnode.node.stage_state import load_state_file
from cfnode.protocol.service import StageClient
from tests.integration.harness import client_identity, network, read_events, run_async, wait_until


def steps_of(events):
    return [e for e in events if e["event"] == "step"]


async def stage_steps(maddr: str, spec, peers: dict[int, str]) -> dict[int, int]:
    """Each stage peer's exact step, from a download of its state (announcements lag behind)."""
    async with connect(network(maddr, client_identity(maddr))) as (_dht, p2p, _identity):
        client = StageClient(p2p, 2**26, spec=spec)
        return {stage: (await client.download_state(peer, stage, timeout=60)).step for stage, peer in peers.items()}


def test_restarted_trainer_resumes_from_its_own_state_file(swarm):
    swarm.spec = swarm.spec.replace(head_copy_every=0)  # no copies at the edges: only the trainer's file holds them
    swarm.start_bootstrap()
    for stage in (1, 2, 3):
        swarm.start_peer(stage)
    state_file = swarm.workdir / "trainer-state.pt"
    first, jsonl = swarm.start_trainer(1000, "--state", str(state_file), "--state-every", "3")
    wait_until(lambda: len(steps_of(read_events(jsonl))) >= 8, 240, "8 training steps")
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(60) == 128 + signal.SIGTERM, swarm.log(first)
    before = steps_of(read_events(jsonl))
    saved = load_state_file(state_file, swarm.spec.run_id)
    # SIGTERM lets the step being applied finish, then saves: the file is at the swarm's step, not an older one.
    assert saved.step >= before[-1]["step"]
    assert all(torch.isfinite(t).all() for t in saved.tensors if t.is_floating_point())
    # Stages apply a step as soon as their own backwards are in, before the rest: a stop never leaves some of
    # them a step ahead of the others and of the saved head.
    peers = {stage: swarm.online_peers(stage)[0]["peer_id"] for stage in (1, 2, 3)}
    assert run_async(stage_steps, swarm.maddr, swarm.spec, peers) == {1: saved.step, 2: saved.step, 3: saved.step}

    second, jsonl2 = swarm.start_trainer(4, "--state", str(state_file), jsonl=Path(swarm.workdir / "second.jsonl"))
    assert second.process.wait(240) == 0, swarm.log(second)
    events = read_events(jsonl2)
    (restored,) = [e for e in events if e["event"] == "head_restored"]
    assert restored["source"] == "own state file" and restored["copied_at"] == saved.step
    after = steps_of(events)
    assert after[0]["step"] == saved.step + 1
    mean_before = sum(e["loss"] for e in before[-4:]) / 4
    assert after[0]["loss"] < mean_before + 0.5, (before[-4:], after)
    assert load_state_file(state_file, swarm.spec.run_id).step == saved.step + 4  # saved again on a clean exit

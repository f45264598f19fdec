"""No islands: a node never takes a view without stages as a new run. The bootstrap keeps the run's progress (the
furthest step a trainer proved) across its restarts, and a newcomer whose view of a trained run shows no live
stage waits for one instead of starting from fresh weights (a newcomer with an empty view of a run that lost a
stage: tests/integration/test_stage_choice.py)."""

from __future__ import annotations

import json
import socket

from tests.integration.harness import read_events, wait_until

WAITING = "waiting for one rather than starting from fresh weights"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_restarted_bootstrap_remembers_that_the_run_trained(swarm):
    port, identity = str(free_port()), str(swarm.workdir / "bootstrap.key")
    bootstrap_args = ("--identity", identity, "--port", port)
    bootstrap = swarm.start_bootstrap(*bootstrap_args)
    peers = [swarm.start_peer(s) for s in (1, 2, 3)]
    swarm.wait_online({1: 1, 2: 1, 3: 1})
    trainer, _ = swarm.start_trainer(6)
    assert trainer.process.wait(300) == 0, swarm.log(trainer)
    saved = swarm.workdir / "bootstrap.key.progress.json"
    wait_until(lambda: saved.exists() and json.loads(saved.read_text())["step"] == 6, 60,
               "the bootstrap to save the run's progress")
    # Everything goes: no node that held the run's records is left. Then the bootstrap comes back alone.
    for child in [*peers, *(c for c in swarm.children if "bootstrap" in c.name)]:
        swarm.kill(child)
    (swarm.workdir / "bootstrap.maddr").unlink()
    assert swarm.start_bootstrap(*bootstrap_args) == bootstrap
    restarted = swarm.children[-1]
    wait_until(lambda: "the run reached step 6 before this bootstrap restarted" in swarm.log(restarted), 30,
               "the restarted bootstrap to load the run's progress")
    # A newcomer sees no stage at all, yet it must not start a fresh run: it waits, and says why.
    newcomer = swarm.start_peer("auto")
    wait_until(lambda: WAITING in swarm.log(newcomer), 90, "the newcomer to wait for a live stage")
    assert newcomer.process.poll() is None
    assert "serving stage" not in swarm.log(newcomer)
    assert "the run reached step 6" in swarm.log(newcomer)


def test_a_peer_serving_outside_the_trained_swarm_stops_and_joins_it(swarm):
    _, trainer, jsonl = swarm.start_training(14, wait_steps=4)
    # An island, made on purpose: this newcomer's looks at the swarm come back empty and it finds no progress, so
    # it serves stage 2 from fresh weights at step 0. The trainer's first call to it shows it the run's step.
    island = swarm.start_peer(2, env={"CFNODE_FAULTS": "empty_view,empty_view,hide_progress,hide_progress"})
    wait_until(lambda: "serving stage 2 (source: fresh) at step 0" in swarm.log(island), 120, "the island to serve")
    assert trainer.process.wait(300) == 0, swarm.log(trainer)
    # On a loaded machine the trainer may finish before the island has taken the swarm's state: wait for it.
    def rejoined() -> bool:
        after = swarm.log(island).partition("this peer was outside it; joining it properly")[2]
        return "copied step" in after and "from replica" in after
    wait_until(rejoined, 120, "the island to find it was outside the run and copy the swarm's stage 2")
    events = read_events(jsonl)
    assert not [e for e in events if e["event"] == "step_mismatch"]
    assert [e["step"] for e in events if e["event"] == "step"][-1] == 14

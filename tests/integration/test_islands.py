"""No islands: a node never takes a view without stages as a new run. The bootstrap keeps the run's progress (the
furthest step a trainer proved) across its restarts, and a newcomer whose view of a trained run shows no live
stage waits for one instead of starting from fresh weights (a newcomer with an empty view of a run that lost a
stage: tests/integration/test_stage_choice.py)."""

from __future__ import annotations

import json
import socket

from tests.integration.harness import wait_until

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

"""CheckFree in a live swarm: a stage loses its only peer and a newcomer rebuilds it from its neighbours."""

from __future__ import annotations

import json
import re
import subprocess

from cfnode.launcher import cfnode_command
from tests.integration.harness import read_events, wait_until


def steps_of(events):
    return [e for e in events if e["event"] == "step"]


def test_newcomer_rebuilds_a_lost_middle_stage_from_both_neighbours(swarm):
    swarm.spec = swarm.spec.replace(num_stages=4, recovery="checkfree")
    _, newcomer, jsonl = swarm.train_and_lose_stage(2, steps=24, lose_after=8)

    log = swarm.log(newcomer)
    assert "joining stage 2 of 4" in log
    match = re.search(r"rebuilt by checkfree from stage 1 \(peer (\S+), grad norm ([\d.e-]+), weight ([\d.]+)\) "
                      r"and stage 3 \(peer (\S+), grad norm ([\d.e-]+), weight ([\d.]+)\)", log)
    assert match, log
    norm1, weight1, norm3, weight3 = (float(match.group(i)) for i in (2, 3, 5, 6))
    assert abs(weight1 + weight3 - 1) < 1e-3 and abs(weight1 - norm1 / (norm1 + norm3)) < 1e-3

    report = swarm.status()
    (rebuilt,) = report["stages"][1]["peers"]
    assert rebuilt["source"] == "checkfree"
    assert rebuilt["recovered_from"] == [f"1:{match.group(1)}", f"3:{match.group(4)}"]
    assert rebuilt["step"] == 24

    events = read_events(jsonl)
    assert len(steps_of(events)) == 24
    # Only stage 2's events matter: a loaded machine can add a transient blip of another stage.
    lost = [e for e in events if e["event"] == "stage_lost" and e["stage"] == 2]
    recovered = [e for e in events if e["event"] == "stage_recovered" and e["stage"] == 2]
    assert lost and recovered and recovered[-1]["source"] == "checkfree"
    assert recovered[-1]["downtime"] > 0 and recovered[-1]["recovered_from"] == rebuilt["recovered_from"]
    # The gradient norms every stage reported are in the step events.
    assert set(steps_of(events)[-1]["grad_norms"]) == {"0", "1", "2", "3", "4"}


def test_swarm_kill_schedule_rebuilds_the_stage(tmp_path):
    jsonl = tmp_path / "events.jsonl"
    result = subprocess.run(
        cfnode_command("swarm", "--stages", "3", "--steps", "14", "--batch-size", "4", "--microbatches", "2",
                       "--kill", "2@5", "--recovery", "uniform", "--log-jsonl", str(jsonl),
                       "--workdir", str(tmp_path / "swarm")),
        capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "churn: SIGKILLed 1 peer(s) of stage 2 at step 5" in result.stdout
    events = [json.loads(line) for line in jsonl.read_text().splitlines()]
    recovered = [e for e in events if e["event"] == "stage_recovered" and e["stage"] == 2]
    assert recovered and recovered[-1]["source"] == "uniform"
    assert len(steps_of(events)) == 14


def test_standby_peer_takes_over_a_lost_stage(swarm):
    swarm.start_bootstrap()
    peers = {stage: swarm.start_peer(stage) for stage in (1, 2, 3)}
    swarm.wait_online({1: 1, 2: 1, 3: 1})
    trainer, jsonl = swarm.start_trainer(14)
    spare = swarm.start_peer("auto", "--standby")
    wait_until(lambda: "standing by" in swarm.log(spare), 60, "the spare to stand by")
    wait_until(lambda: len(steps_of(read_events(jsonl))) >= 5, 180, "5 training steps")
    assert "joining stage" not in swarm.log(spare)  # nothing was lost yet: it waits
    swarm.kill(peers[2])
    assert trainer.process.wait(300) == 0, swarm.log(trainer)
    assert "joining stage 2 of 3" in swarm.log(spare)
    assert "serving stage 2 (source: checkfree" in swarm.log(spare)
    recovered = [e for e in read_events(jsonl) if e["event"] == "stage_recovered" and e["stage"] == 2]
    assert recovered and recovered[-1]["source"] == "checkfree"

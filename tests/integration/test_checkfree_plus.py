"""CheckFree+ in a live swarm: lost edge stages copy their swap-trained neighbour; a new trainer resumes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cfnode.launcher import cfnode_command
from tests.integration.harness import read_events, wait_until


def steps_of(events):
    return [e for e in events if e["event"] == "step"]


def test_lost_first_and_last_stages_copy_their_neighbours(tmp_path):
    jsonl, workdir = tmp_path / "events.jsonl", tmp_path / "swarm"
    result = subprocess.run(
        cfnode_command("swarm", "--stages", "4", "--steps", "20", "--batch-size", "4", "--microbatches", "2",
                       "--recovery", "checkfree+", "--kill", "1@5", "--kill", "4@12", "--log-jsonl", str(jsonl),
                       "--workdir", str(workdir)),
        capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(steps_of(events)) == 20
    recovered = {e["stage"]: e for e in events if e["event"] == "stage_recovered"}
    assert recovered[1]["source"] == "checkfree+" and recovered[1]["recovered_from"][0].startswith("2:")
    assert recovered[4]["source"] == "checkfree+" and recovered[4]["recovered_from"][0].startswith("3:")
    logs = "\n".join(p.read_text() for p in workdir.glob("peer-*-stage-auto.log"))
    assert "stage 1: rebuilt by checkfree+ from stage 2" in logs
    assert "stage 4: rebuilt by checkfree+ from stage 3" in logs


def test_new_trainer_restores_embedding_and_head_from_the_edges(swarm):
    swarm.spec = swarm.spec.replace(recovery="checkfree+", head_copy_every=1)
    swarm.start_bootstrap()
    for stage in (1, 2, 3):
        swarm.start_peer(stage)
    first, jsonl = swarm.start_trainer(1000)
    wait_until(lambda: len(steps_of(read_events(jsonl))) >= 30, 300, "30 training steps")
    swarm.kill(first)
    before = [e["loss"] for e in steps_of(read_events(jsonl))][-5:]

    second, jsonl2 = swarm.start_trainer(5, jsonl=Path(swarm.workdir / "second.jsonl"))
    assert second.process.wait(300) == 0, swarm.log(second)
    events = read_events(jsonl2)
    (restored,) = [e for e in events if e["event"] == "head_restored"]
    assert restored["copied_at"] >= 29
    after = [e["loss"] for e in steps_of(events)]
    assert steps_of(events)[0]["step"] > 30  # continues from the swarm's step, not from 1
    fresh_loss = 5.5  # ln(256): an untrained byte model
    mean_before, mean_after = sum(before) / len(before), sum(after[:3]) / 3
    assert mean_after < mean_before + 0.5, (before, after)
    assert mean_after < fresh_loss - 1.5, (before, after)
    assert "a new trainer session began" in "".join(swarm.log(c) for c in swarm.children if "peer" in c.name)

"""Joining a run through any live peer: a stage peer's address that `cfnode status` lists, with the bootstrap's
peer id as --spec-owner; and, without --spec-owner, a clear refusal instead of a wait for the spec."""

from __future__ import annotations

import json
import subprocess

import pytest

from cfnode.launcher import Child, cfnode_command, group_alive, spawn
from tests.integration.harness import TINY_SPEC, Swarm, wait_until


@pytest.fixture
def swarm(tmp_path):
    # Two stages: the fewest that give a peer to join through and another stage's peer to copy from.
    harness = Swarm(tmp_path, TINY_SPEC.replace(num_stages=2))
    yield harness
    harness.close()
    groups = [child.process.pid for child in harness.children]
    wait_until(lambda: not any(group_alive(g) for g in groups), 15, "every process of the test to exit")


def status(maddr: str) -> dict | None:
    """`cfnode status --json`'s report once both stages are online with an address each, else None."""
    result = subprocess.run(cfnode_command("status", "--initial-peers", maddr, "--json"), capture_output=True,
                            text=True, timeout=60)
    if result.returncode != 0:  # a peer's first announcement is not stored yet
        return None
    report = json.loads(result.stdout)
    return report if len(report["addresses"]) == 2 else None


def join(swarm: Swarm, name: str, *args: str) -> Child:
    """`cfnode join ARGS`, with initial peers of the test's choosing (Swarm.start_peer joins via the bootstrap)."""
    child = spawn(name, ["join", *args], swarm.workdir / f"{name}.log")
    swarm.children.append(child)
    return child


def test_join_through_a_stage_peer_with_the_spec_owner(swarm):
    bootstrap_id = swarm.start_bootstrap().rsplit("/p2p/", 1)[1]
    peers = [swarm.start_peer(1), swarm.start_peer(2)]
    # Their logs first (cheap to read), then the command a user runs: it exits 0 once every stage has a live peer.
    wait_until(lambda: all("serving stage" in swarm.log(p) for p in peers), 60, "both stage peers serving",
               interval=0.5)
    report = wait_until(lambda: status(swarm.maddr), 60, "`cfnode status` to list both peers' addresses")
    assert report["spec_owner"] == bootstrap_id
    (stage_1,) = report["stages"][0]["peers"]
    (entry,) = [a for a in report["addresses"] if a.endswith(f"/p2p/{stage_1['peer_id']}")]
    assert entry in stage_1["maddrs"] and len(report["addresses"]) == 2  # one address per online peer

    # Only stage 1's peer as the way in: the newcomer must find the spec and stage 2's peer through it.
    joined = join(swarm, "through-stage-1", "--initial-peers", entry, "--spec-owner", bootstrap_id, "--stage", "2")
    # ...and the same without --spec-owner, at the same time: it trusts only that stage peer, which signs no spec.
    refused = join(swarm, "without-owner", "--initial-peers", entry, "--stage", "2", "--connect-timeout", "5")

    wait_until(lambda: "serving stage 2 (source: replica" in swarm.log(joined), 60,
               "the newcomer joined through stage 1's peer to serve stage 2", interval=0.5)
    assert refused.process.wait(45) == 1, swarm.log(refused)
    error = [line for line in swarm.log(refused).splitlines() if line.startswith("cfnode join: error:")]
    assert len(error) == 1, swarm.log(refused)
    assert stage_1["peer_id"] in error[0] and "--spec-owner" in error[0], error[0]

"""Each microbatch's gradient is summed exactly once at every stage, under the faults that used to break it.

Every test trains the same 3 steps as a reference run without faults, injects one fault deterministically (a fault
point switched on in one peer, cfnode/faults.py), and asserts the exact outcome: the stages' weights equal the
reference's bit for bit, and the trainer checked every stage's ledger of every step and found no mismatch. Steps
have two microbatches: two gradients sum to the same bits in either order, so every run of the same data gives the
same weights, whichever replica computed what and in which order.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from cfnode.node.runtime import connect
from cfnode.node.swarm_map import read_stage_map
from cfnode.protocol.service import StageClient
from tests.integration.harness import TINY_SPEC, Swarm, network, read_events

SPEC = TINY_SPEC.replace(num_stages=2)
STEPS = 3
MICROBATCHES = ("--microbatches", "2")

pytestmark = pytest.mark.integration


async def final_weights(maddr: str, spec) -> dict[int, list[tuple[str, torch.Tensor]]]:
    """stage -> the model weights of its peers at the final step (a replica left behind is not counted)."""
    async with connect(network(maddr)) as (dht, p2p, _identity):
        client = StageClient(p2p, 2**26, spec=spec)
        stage_map = await read_stage_map(dht, spec)
        out: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for stage, peers in stage_map.items():
            for peer in peers:
                state = await client.download_state(peer.peer_id, stage, timeout=60, weights_only=True)
                if state.step == STEPS:
                    out.setdefault(stage, []).append((peer.peer_id, torch.cat([t.flatten() for t in state.tensors])))
        return out


def train(swarm: Swarm, replicas: dict[int, int], faulted: dict[int, dict[str, str]], *trainer_args: str):
    """Bootstrap, peers (every peer of a stage in `faulted` gets that environment), a 3-step trainer; returns
    (final weights, trainer events, peers)."""
    swarm.spec = SPEC
    swarm.start_bootstrap()
    peers = []
    for stage, count in replicas.items():
        for started in range(count):  # replicas copy the first exactly
            peers.append(swarm.start_peer(stage, env=faulted.get(stage)))
            swarm.wait_online({stage: started + 1})
    trainer, jsonl = swarm.start_trainer(STEPS, *MICROBATCHES, *trainer_args)
    assert trainer.process.wait(240) == 0, swarm.log(trainer)
    weights = asyncio.run(final_weights(swarm.maddr, swarm.spec))
    return weights, read_events(jsonl), peers


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    swarm = Swarm(tmp_path_factory.mktemp("reference"))
    try:
        weights, events, _ = train(swarm, {1: 1, 2: 1}, {})
    finally:
        swarm.close()
    return {stage: vectors[0][1] for stage, vectors in weights.items()}


def assert_exact(weights, events, reference) -> None:
    (finished,) = [e for e in events if e["event"] == "train_finished"]
    assert not [e for e in events if e["event"] == "step_mismatch"]
    for stage, expected in reference.items():
        assert weights.get(stage), f"no peer of stage {stage} reached step {STEPS}"
        for peer, vector in weights[stage]:
            assert torch.equal(vector, expected), (
                f"stage {stage} peer {peer} differs from the reference by {(vector - expected).abs().max():.3g}")
    assert len([e for e in events if e["event"] == "step"]) == STEPS
    # Every stage's step was checked: the replies' ledgers listed each microbatch exactly once.
    assert finished["ledger_checks"] >= STEPS * SPEC.num_stages and finished["step_mismatches"] == 0


def test_a_backward_cut_after_its_gradient_was_added_and_retried_counts_once(swarm, reference):
    # Stage 2's pipe breaks right after the autograd of step 1's microbatch 1; the trainer retries on the same peer.
    weights, events, peers = train(swarm, {1: 1, 2: 1}, {2: {"CFNODE_FAULTS": "cut_backward@1:1"}})
    assert "fault injected: cut_backward at step 1, microbatch 1" in swarm.log(peers[1])
    assert_exact(weights, events, reference)


def test_a_replica_that_timed_out_and_returns_before_the_step_does_not_sum_its_share_twice(swarm, reference):
    # Stage 2 has two replicas, and each holds its first backward reply of step 1 back past the trainer's deadline
    # (which replica gets which backward is the router's choice, so both are armed). The trainer bans a replica
    # that timed out for a millisecond, so it is usable again when the step group forms, with that microbatch
    # summed while another replica also summed it: it must stay out of the group, its share replayed elsewhere.
    weights, events, peers = train(swarm, {1: 1, 2: 2}, {2: {"CFNODE_FAULTS": "slow_backward@1",
                                                              "CFNODE_FAULT_DELAY": "12"}},
                                   "--request-timeout", "6", "--ban-seconds", "0.001")
    slow = [p for p in peers[1:] if "fault injected: slow_backward at step 1" in swarm.log(p)]
    assert slow  # step 1 has two backwards at stage 2; at least one reached an armed replica
    # The trainer's step 2 is the peers' step 1: a replica's call failed then, and it was kept out of the step (or,
    # if both were, the stage's share of the step started over).
    timed_out = {e["peer"] for e in events if e["event"] == "peer_failed" and e["step"] == 2}
    assert timed_out
    left_out = {e["peer"] for e in events if e["event"] == "replica_left_out" and e["step"] == 2}
    restarted = [e for e in events if e["event"] == "stage_step_restarted" and e["step"] == 2]
    assert (timed_out & left_out) or restarted, events
    assert all(p.process.poll() is None for p in slow)
    assert_exact(weights, events, reference)

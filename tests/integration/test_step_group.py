"""A replica alone in its step group steps on its own gradients in place; in a group it sums the replicas' copies.
Both give the same update, bit for bit."""

from __future__ import annotations

import asyncio

import torch

from cfnode.node.runtime import connect
from cfnode.node.swarm_map import read_stage_map
from cfnode.protocol.messages import BackwardRequest, StepRequest
from cfnode.protocol.service import StageClient
from tests.integration.harness import network


async def step_alone_and_in_group(maddr: str, spec) -> tuple[list, list]:
    async with connect(network(maddr)) as (dht, p2p, _identity):
        client = StageClient(p2p, 2**26)
        peers = sorted(p.peer_id for p in (await read_stage_map(dht, spec))[1])
        alone, grouped, idle = peers
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(2, spec.seq_len, spec.hidden_size, generator=gen)
        grad = torch.randn(2, spec.seq_len, spec.hidden_size, generator=gen)
        for peer in (alone, grouped):  # the same microbatch on two replicas; the third gets none (zero gradients)
            await client.backward(peer, BackwardRequest(1, 0, 0, hidden, grad), timeout=30)
        group = StepRequest(1, 0, sorted([grouped, idle]))
        replies = await asyncio.gather(client.step(alone, StepRequest(1, 0, [alone]), 30),
                                       client.step(grouped, group, 30), client.step(idle, group, 30))
        assert [r.step for r in replies] == [1, 1, 1]
        assert replies[0].grad_norm == replies[1].grad_norm
        states = [await client.download_state(peer, 1, timeout=60) for peer in (alone, grouped)]
        return states[0].tensors, states[1].tensors


def test_a_replica_alone_in_its_step_group_applies_the_grouped_update(swarm):
    swarm.spec = swarm.spec.replace(num_stages=1)
    swarm.start_bootstrap()
    swarm.start_peer(1)
    swarm.wait_online({1: 1})
    for _ in range(2):  # replicas copy the first peer exactly
        swarm.start_peer(1)
    swarm.wait_online({1: 3})
    alone, grouped = asyncio.run(step_alone_and_in_group(swarm.maddr, swarm.spec))
    assert len(alone) == len(grouped)
    for a, b in zip(alone, grouped):  # weights and AdamW moments
        assert torch.equal(a, b)

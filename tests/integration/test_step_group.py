"""A replica alone in its step group steps on its own gradients in place; in a group it sums the replicas' copies;
and a step that rides on the last backward applies what the step call would. All give the same update, bit for bit."""

from __future__ import annotations

import asyncio

import torch

from cfnode.node.runtime import connect
from cfnode.node.swarm_map import read_stage_map
from cfnode.protocol.messages import BackwardRequest, StepRequest
from cfnode.protocol.service import StageClient
from tests.integration.harness import Swarm, client_identity, network


async def step_alone_and_in_group(maddr: str, spec) -> tuple[list, list]:
    async with connect(network(maddr, client_identity(maddr))) as (dht, p2p, _identity):
        client = StageClient(p2p, 2**26, spec=spec)
        peers = sorted(p.peer_id for p in (await read_stage_map(dht, spec))[1])
        alone, grouped, idle = peers
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(2, spec.seq_len, spec.hidden_size, generator=gen)
        grad = torch.randn(2, spec.seq_len, spec.hidden_size, generator=gen)
        for peer in (alone, grouped):  # the same microbatch on two replicas; the third gets none (zero gradients)
            await client.backward(peer, BackwardRequest(1, 0, 0, hidden, grad), timeout=30)
        group = StepRequest(1, 0, sorted([grouped, idle]), ledger={grouped: [0]})
        replies = await asyncio.gather(client.step(alone, StepRequest(1, 0, [alone], ledger={alone: [0]}), 30),
                                       client.step(grouped, group, 30), client.step(idle, group, 30))
        assert [r.step for r in replies] == [1, 1, 1]
        assert replies[0].grad_norm == replies[1].grad_norm
        assert [(r.count, r.microbatches) for r in replies] == [(1, [0])] * 3  # the group summed microbatch 0 once
        assert replies[1].digest == replies[2].digest
        states = [await client.download_state(peer, 1, timeout=60) for peer in (alone, grouped)]
        return states[0].tensors, states[1].tensors


def start_three_replicas(swarm: Swarm) -> None:
    swarm.spec = swarm.spec.replace(num_stages=1)
    swarm.start_bootstrap()
    swarm.start_peer(1)
    swarm.wait_online({1: 1})
    for _ in range(2):  # replicas copy the first peer exactly
        swarm.start_peer(1)
    swarm.wait_online({1: 3})


def test_a_replica_alone_in_its_step_group_applies_the_grouped_update(swarm):
    start_three_replicas(swarm)
    alone, grouped = asyncio.run(step_alone_and_in_group(swarm.maddr, swarm.spec))
    assert len(alone) == len(grouped)
    for a, b in zip(alone, grouped):  # weights and AdamW moments
        assert torch.equal(a, b)


async def step_called_and_ridden(maddr: str, spec) -> dict:
    async with connect(network(maddr, client_identity(maddr))) as (dht, p2p, _identity):
        client = StageClient(p2p, 2**26, spec=spec)
        called, rode, bystander = sorted(p.peer_id for p in (await read_stage_map(dht, spec))[1])
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(2, spec.seq_len, spec.hidden_size, generator=gen)
        grad = torch.randn(2, spec.seq_len, spec.hidden_size, generator=gen)
        out = {}
        plain = await client.backward(called, BackwardRequest(1, 0, 0, hidden, grad), timeout=30)
        out["called"] = await client.step(called, StepRequest(1, 0, [called], ledger={called: [0]}), 30)
        out["plain reply"] = (plain.stepped, plain.step_refused)
        riding = BackwardRequest(1, 0, 0, hidden, grad, step_group=[rode], step_ledger={rode: [0]})
        out["ridden"] = await client.backward(rode, riding, timeout=30)
        # The reply was lost, say: the same backward again gets the same gradient and the step already applied.
        out["retried"] = await client.backward(rode, riding, timeout=30)
        # A peer outside the group computes the backward and leaves the step to the step call.
        out["bystander"] = await client.backward(bystander, BackwardRequest(1, 0, 0, hidden, grad,
                                                                            step_group=[rode],
                                                                            step_ledger={rode: [0]}), timeout=30)
        out["bystander step"] = (await client.info(bystander, 1, timeout=30))["step"]
        out["states"] = [(await client.download_state(peer, 1, timeout=60)).tensors for peer in (called, rode)]
        return out


def test_a_step_riding_on_the_last_backward_applies_the_step_calls_update(swarm):
    start_three_replicas(swarm)
    out = asyncio.run(step_called_and_ridden(swarm.maddr, swarm.spec))
    assert out["plain reply"] == (None, None)
    ridden, retried, bystander = out["ridden"], out["retried"], out["bystander"]
    assert ridden.stepped is not None and ridden.step_refused is None
    assert ridden.stepped.step == out["called"].step == 1
    assert ridden.stepped.grad_norm == out["called"].grad_norm
    assert ridden.stepped.digest == out["called"].digest and ridden.stepped.microbatches == [0]
    assert torch.equal(ridden.grad_input, bystander.grad_input)
    assert torch.equal(retried.grad_input, ridden.grad_input)
    assert retried.stepped is not None and retried.stepped.step == 1  # applied once, not twice
    assert (bystander.stepped, bystander.step_refused) == (None, None)
    assert out["bystander step"] == 0
    called, rode = out["states"]
    assert len(called) == len(rode)
    for a, b in zip(called, rode):  # weights and AdamW moments
        assert torch.equal(a, b)

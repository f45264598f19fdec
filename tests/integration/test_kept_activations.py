"""A stage peer keeps a training forward's activations for its backward; any other replica recomputes."""

from __future__ import annotations

import asyncio

import torch

from cfnode.node.runtime import connect
from cfnode.node.swarm_map import read_stage_map
from cfnode.protocol.messages import NO_ACTIVATIONS, BackwardRequest, ForwardRequest, RemoteError, StepRequest
from cfnode.protocol.service import StageClient
from tests.integration.harness import client_identity, network


async def exercise(maddr: str, spec) -> dict:
    async with connect(network(maddr, client_identity(maddr))) as (dht, p2p, _identity):
        client = StageClient(p2p, 2**26)
        peers = (await read_stage_map(dht, spec))[1]
        keeper = next(p.peer_id for p in peers if p.source == "fresh")  # started first, with --keep-activations 2
        other = next(p.peer_id for p in peers if p.peer_id != keeper)
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randn(2, spec.seq_len, spec.hidden_size, generator=gen) for _ in range(4)]
        grad = torch.randn(2, spec.seq_len, spec.hidden_size, generator=gen)

        async def backward(peer: str, mb: int, hidden: torch.Tensor | None, step: int = 0) -> torch.Tensor | str:
            try:
                return (await client.backward(peer, BackwardRequest(1, step, mb, hidden, grad), timeout=30)).grad_input
            except RemoteError as e:
                return e.code

        out = {}
        kept = await client.forward(keeper, ForwardRequest(1, 0, 0, inputs[0], keep=True), timeout=30)
        plain = await client.forward(other, ForwardRequest(1, 0, 0, inputs[0]), timeout=30)
        out["outputs equal"] = torch.equal(kept.output, plain.output)
        out["replies say kept"] = (kept.kept, plain.kept)
        out["kept"] = await backward(keeper, 0, None)  # from the kept graph
        out["recomputed"] = await backward(other, 0, inputs[0])  # another replica recomputes from the input
        out["never forwarded"] = await backward(keeper, 1, None)
        await client.forward(keeper, ForwardRequest(1, 0, 2, inputs[2]), timeout=30)  # keep=False: evaluation
        out["forward without keep"] = await backward(keeper, 2, None)
        out["fallback with input"] = await backward(keeper, 2, inputs[2])
        for mb in (3, 4, 5):  # keeps at most 2: the oldest (3) falls back to recomputation
            await client.forward(keeper, ForwardRequest(1, 0, mb, inputs[mb - 2], keep=True), timeout=30)
        out["evicted"] = await backward(keeper, 3, None)
        out["still kept"] = await backward(keeper, 5, None)
        # Both replicas accumulated microbatch 0 the same way: their step applies the same update.
        await client.forward(keeper, ForwardRequest(1, 0, 6, inputs[1], keep=True), timeout=30)
        request = StepRequest(1, 0, sorted([keeper, other]), ledger={keeper: [0, 2, 5], other: [0]})
        await asyncio.gather(client.step(keeper, request, 30), client.step(other, request, 30))
        out["after the step"] = await backward(keeper, 6, None, step=1)  # the step dropped what the forward kept
        return out


def test_kept_activations_match_recomputation_and_fall_back(swarm):
    swarm.spec = swarm.spec.replace(num_stages=1)
    swarm.start_bootstrap()
    swarm.start_peer(1, "--keep-activations", "2")
    swarm.wait_online({1: 1})
    swarm.start_peer(1)  # a replica: copies the first one exactly
    swarm.wait_online({1: 2})
    out = asyncio.run(exercise(swarm.maddr, swarm.spec))
    assert out["outputs equal"]
    assert out["replies say kept"] == (True, False)
    assert isinstance(out["kept"], torch.Tensor) and isinstance(out["recomputed"], torch.Tensor)
    assert torch.allclose(out["kept"], out["recomputed"], atol=1e-6), "kept and recomputed input grads differ"
    assert out["never forwarded"] == NO_ACTIVATIONS
    assert out["forward without keep"] == NO_ACTIVATIONS
    assert isinstance(out["fallback with input"], torch.Tensor)
    assert out["evicted"] == NO_ACTIVATIONS
    assert isinstance(out["still kept"], torch.Tensor)
    assert out["after the step"] == NO_ACTIVATIONS

"""Activations and their gradients in blockwise 8-bit (`wire_dtype: int8`, protocol/quantize.py) on a live swarm: a
stage peer computes on what arrives and replies in 8 bits, and the swarm trains."""

from __future__ import annotations

import asyncio

import torch

from cfnode.model import build_body_stage
from cfnode.node.runtime import connect
from cfnode.protocol import quantize
from cfnode.protocol.messages import ForwardRequest
from cfnode.protocol.service import StageClient
from tests.integration.harness import client_identity, network, read_events


async def forward(maddr: str, peer_id: str, spec, hidden: torch.Tensor) -> torch.Tensor:
    async with connect(network(maddr, client_identity(maddr))) as (_dht, p2p, _identity):
        client = StageClient(p2p, spec.max_message_bytes, spec.wire_dtype, spec=spec)
        try:
            return (await client.forward(peer_id, ForwardRequest(1, 0, 0, hidden), 60)).output
        finally:
            await client.close()


def round_trip(x: torch.Tensor) -> torch.Tensor:
    return quantize.dequantize_blockwise(*quantize.quantize_blockwise(x), tuple(x.shape))


def test_a_stage_replies_in_eight_bits_and_an_int8_swarm_trains(swarm):
    swarm.spec = spec = swarm.spec.replace(num_stages=2, wire_dtype="int8")
    swarm.start_bootstrap()
    swarm.start_peer(1)
    swarm.start_peer(2)
    swarm.wait_online({1: 1, 2: 1})
    (record,) = swarm.online_peers(1)
    hidden = torch.randn(2, spec.seq_len, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    reply = asyncio.run(forward(swarm.maddr, record["peer_id"], spec, hidden))

    # The peer computed on the 8-bit form of the input, and its output came back within half a quantization step of
    # that forward here (the processes' float sums may differ in the last bits, so not bit for bit).
    with torch.no_grad():
        expected = build_body_stage(spec, 1)(round_trip(hidden))
    blocks = expected.reshape(-1, quantize.BLOCK)
    step = blocks.abs().amax(dim=1, keepdim=True) / 127
    error = (reply.reshape(-1, quantize.BLOCK) - blocks).abs()
    assert torch.all(error <= step / 2 + 1e-4 * step.max()), float((error / step).max())
    # And it is 8-bit: within each block, every value is a whole multiple of the block's step.
    got = reply.reshape(-1, quantize.BLOCK)
    got_step = got.abs().amax(dim=1, keepdim=True) / 127
    assert torch.allclose(got / got_step, torch.round(got / got_step), atol=1e-3)
    assert not torch.equal(reply, expected)

    trainer, jsonl = swarm.start_trainer(20)
    assert trainer.process.wait(300) == 0, swarm.log(trainer)
    steps = [e for e in read_events(jsonl) if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 21))
    first = sum(e["loss"] for e in steps[:3]) / 3
    last = sum(e["loss"] for e in steps[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"

"""A replica that answers with NaN: the trainer refuses its replies, logs it, bans it and carries on elsewhere,
and its gradients never reach the honest replica's weights."""

from __future__ import annotations

import asyncio
import contextlib
import math

import torch

from cfnode.node.discovery import live_stage_map
from cfnode.node.runtime import connect
from cfnode.node.stage_peer import StagePeer
from cfnode.node.swarm_map import read_spec
from cfnode.protocol.records import PeerState
from cfnode.protocol.service import StageClient, StageService
from tests.integration.harness import network, read_events


async def serve_broken_replica(maddr: str, trainer_done) -> str:
    """Join stage 2 as an exact replica, then turn every weight to NaN and serve until the trainer is done."""
    async with connect(network(maddr)) as (dht, p2p, identity):
        spec = await read_spec(dht, network(maddr))
        client = StageClient(p2p, spec.max_message_bytes, spec=spec)
        peer = StagePeer(spec, 2, identity, dht, client)
        service = StageService(peer)
        await service.add_p2p_handlers(p2p)
        await peer.obtain_weights(await live_stage_map(dht, spec, client))
        with torch.no_grad():
            for parameter in peer.model.parameters():
                parameter.fill_(float("nan"))
        peer.state = PeerState.ONLINE
        announcer = asyncio.create_task(peer.announce_forever())
        try:
            deadline = asyncio.get_running_loop().time() + 300
            while not trainer_done() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.2)
        finally:
            announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await announcer
            peer.close()
        return peer.peer_id


def test_nan_replies_are_refused_and_the_peer_banned(swarm):
    _, trainer, jsonl = swarm.start_training(8)
    broken = asyncio.run(serve_broken_replica(swarm.maddr, lambda: trainer.process.poll() is not None))

    assert trainer.process.wait(60) == 0, swarm.log(trainer)
    events = read_events(jsonl)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 9))
    assert all(math.isfinite(e["loss"]) for e in steps)
    refusals = [e for e in events if e["event"] == "peer_failed" and e["peer"] == broken]
    assert refusals, "the trainer never noticed the broken replica"
    assert all("NaN" in e["reason"] for e in refusals), refusals
    # The honest replica of stage 2 kept finite weights and trained through every step.
    honest = [p for p in swarm.online_peers(2) if p["peer_id"] != broken]
    assert honest and honest[0]["step"] == 8 and math.isfinite(honest[0]["grad_norm"])

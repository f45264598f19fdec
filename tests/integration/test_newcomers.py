"""Newcomers that start together share the stages out, and several newcomers for one stage become exact replicas of
the first instead of rebuilding it each on its own."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch

from cfnode.node.runtime import connect
from cfnode.node.swarm_map import read_stage_map
from cfnode.protocol.records import PeerState
from cfnode.protocol.service import StageClient
from tests.integration.harness import network

pytestmark = pytest.mark.integration


async def states_by_stage(maddr: str, spec) -> dict[int, list]:
    async with connect(network(maddr)) as (dht, p2p, _identity):
        client = StageClient(p2p, 2**26, spec=spec)
        stage_map = await read_stage_map(dht, spec)
        return {stage: [await client.download_state(p.peer_id, stage, timeout=60) for p in peers
                        if p.state == PeerState.ONLINE] for stage, peers in stage_map.items()}


def test_six_newcomers_started_at_once_on_three_stages_go_two_per_stage_as_exact_replicas(swarm):
    swarm.start_bootstrap()
    peers = [swarm.start_peer("auto") for _ in range(6)]  # within a second of each other, as compose --scale does
    swarm.wait_online({1: 2, 2: 2, 3: 2}, timeout=240)
    report = {stage: swarm.online_peers(stage) for stage in (1, 2, 3)}
    assert {stage: len(online) for stage, online in report.items()} == {1: 2, 2: 2, 3: 2}, report
    for stage, online in report.items():  # one started the stage, the other copied it
        assert Counter(p["source"] for p in online) == {"fresh": 1, "replica": 1}, (stage, online)
    for stage, (first, second) in asyncio.run(states_by_stage(swarm.maddr, swarm.spec)).items():
        assert first.step == second.step == 0
        assert all(torch.equal(a, b) for a, b in zip(first.tensors, second.tensors)), f"stage {stage} replicas differ"
    assert all(p.process.poll() is None for p in peers)

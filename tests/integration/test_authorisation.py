"""Only the trainers the signed run spec names drive training: calls, copies, records and step claims of anyone else
are refused or ignored, and the peer keeps serving."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.utils import get_dht_time

from cfnode.model import build_body_stage, build_head
from cfnode.node.runtime import connect
from cfnode.node.stage_state import make_optimizer, snapshot
from cfnode.node.swarm_map import read_stage_map, read_trainers, swarm_step
from cfnode.protocol.keys import stage_key, trainer_key
from cfnode.protocol.messages import UNAUTHORISED, BackwardRequest, ForwardRequest, RemoteError, StepRequest
from cfnode.protocol.records import PeerState, StageAnnouncement, TrainerAnnouncement
from cfnode.protocol.service import StageClient
from tests.integration.harness import TINY_SPEC, network, read_events

pytestmark = pytest.mark.integration


async def rogue_visit(maddr: str, spec) -> dict:
    """A peer the run does not name tries every training call and copy, and forges a trainer record and a step."""
    out: dict = {}
    async with connect(network(maddr)) as (dht, p2p, identity):
        stage_map = await read_stage_map(dht, spec)
        (first,), (second,) = stage_map[1], stage_map[2]
        piped, streamed = StageClient(p2p, 2**26, spec=spec), StageClient(p2p, 2**26, spec=spec, pipe=False)
        hidden = torch.randn(2, spec.seq_len, spec.hidden_size)

        async def code(call) -> str:
            try:
                await call
            except RemoteError as e:
                return e.code
            return "accepted"

        out["forward on the pipe"] = await code(piped.forward(first.peer_id, ForwardRequest(1, 0, 0, hidden), 30))
        # A call of many megabytes on a new pipe: the peer refuses the stream and ends it while the message is still
        # being sent, so the send breaks; the caller must still get the refusal, not a broken pipe.
        large = torch.randn(1024, spec.seq_len, spec.hidden_size)
        out["large forward on a new pipe"] = await code(StageClient(p2p, 2**26, spec=spec).forward(
            first.peer_id, ForwardRequest(1, 0, 0, large), 30))
        out["backward on a stream"] = await code(streamed.backward(
            first.peer_id, BackwardRequest(1, 0, 0, hidden, hidden), 30))
        out["step"] = await code(piped.step(first.peer_id, StepRequest(1, 0, [first.peer_id], ledger={}), 30))
        head = build_head(spec)
        head_copy = snapshot(0, 5, None, head, torch.optim.AdamW(head.parameters()))
        out["head copy"] = await code(piped.put_copy(first.peer_id, head_copy, 30))
        stage_2 = build_body_stage(spec, 2)
        out["copy of a stage it does not serve"] = await code(piped.put_copy(
            first.peer_id, snapshot(2, 5, 0.1, stage_2, make_optimizer(stage_2, spec)), 30))
        out["still online"] = (await piped.info(first.peer_id, 1, 10))["state"]
        out["unused neighbour"] = second.peer_id

        # Forged records, validly signed by the rogue itself: a trainer serving activations, and a stage peer far
        # ahead of the swarm.
        me = identity.peer_id.to_base58()
        expiration = get_dht_time() + 600
        await dht.store(trainer_key(spec.run_id), TrainerAnnouncement(me, 10**6, 16, get_dht_time()).to_wire(),
                        expiration, subkey=identity.owner_subkey, return_future=True)
        forged = StageAnnouncement(me, 2, PeerState.ONLINE, 10**6, 1e9, 0, 1.0, "replica",
                                   announced_at=get_dht_time(), step_proof="Zm9yZ2Vk")
        await dht.store(stage_key(spec.run_id, 2), forged.to_wire(), expiration, subkey=identity.owner_subkey,
                        return_future=True)
        seen = await read_stage_map(dht, spec)
        out["forged step visible"] = any(p.step == 10**6 for p in seen[2])
        out["swarm step"] = swarm_step(seen, spec)
        out["trainers read"] = [t.peer_id for t in await read_trainers(dht, spec)]
    return out


def test_a_peer_the_run_does_not_name_cannot_train_copy_or_claim_steps(swarm):
    swarm.spec = TINY_SPEC.replace(num_stages=2)
    swarm.start_bootstrap()
    for stage in (1, 2):
        swarm.start_peer(stage)
    swarm.wait_online({1: 1, 2: 1})
    out = asyncio.run(rogue_visit(swarm.maddr, swarm.spec))
    for call in ("forward on the pipe", "large forward on a new pipe", "backward on a stream", "step", "head copy",
                 "copy of a stage it does not serve"):
        assert out[call] == UNAUTHORISED, (call, out[call])
    assert out["still online"] == "ONLINE"
    assert out["forged step visible"]  # the record is there, signed by its writer ...
    assert out["swarm step"] == 0  # ... but its step is not proven, so it moves nothing
    assert out["trainers read"] == []  # nor is a trainer record from a peer the run does not name
    # The real trainer starts at the swarm's real step, not the forged one, and trains.
    trainer, jsonl = swarm.start_trainer(2)
    assert trainer.process.wait(180) == 0, swarm.log(trainer)
    (started,) = [e for e in read_events(jsonl) if e["event"] == "train_started"]
    assert started["step"] == 0


def test_a_trainer_the_run_does_not_name_refuses_to_start(swarm):
    swarm.spec = TINY_SPEC.replace(num_stages=1)
    swarm.start_bootstrap()
    swarm.start_peer(1)
    swarm.wait_online({1: 1})
    trainer, _ = swarm.start_trainer(1, "--identity", str(swarm.workdir / "stranger.key"))
    assert trainer.process.wait(120) != 0
    assert "is not one the run" in swarm.log(trainer)

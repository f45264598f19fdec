"""What a node sees of the swarm: the live stage map (announcements checked against the peers themselves), and
the stage a newcomer takes."""

from __future__ import annotations

import asyncio
import random

import hivemind
from hivemind.utils.logging import get_logger

from cfnode.config import JoinConfig, RunSpec
from cfnode.node.stage_choice import choose_stage, is_live
from cfnode.node.swarm_map import StageMap, merge_stage_maps, read_stage_map
from cfnode.protocol.records import StageAnnouncement
from cfnode.protocol.service import StageClient

logger = get_logger(__name__)


async def pick_stage(config: JoinConfig, dht: hivemind.DHT, spec: RunSpec, client: StageClient) -> int:
    """The stage to serve: the one asked for, or the automatic choice after a short random delay.

    The delay spreads newcomers that start together, so they see each other's JOINING records.
    """
    if config.stage is not None:
        if not 1 <= config.stage <= spec.num_stages:
            raise ValueError(f"stage {config.stage} does not exist: this run has stages 1..{spec.num_stages}")
        return config.stage
    if config.standby:
        # A warm spare: already connected and imported, it claims a lost stage as soon as one appears.
        logger.info("standing by until a stage has no live peer")
        while True:
            stage_map = await live_stage_map(dht, spec, client)
            if any(not is_live(stage_map.get(s, [])) for s in range(1, spec.num_stages + 1)):
                return choose_stage(stage_map, spec.num_stages)
            await asyncio.sleep(config.standby_poll)
    await asyncio.sleep(random.uniform(0, 0.3))
    stage_map = await live_stage_map(dht, spec, client)
    return choose_stage(stage_map, spec.num_stages)


async def live_stage_map(dht: hivemind.DHT, spec: RunSpec, client: StageClient, timeout: float = 3.0) -> StageMap:
    """The stage map without peers that no longer answer: a SIGKILLed peer's record outlives it by up to its TTL,
    and a newcomer must see that stage as lost at once.

    The map is the union of two DHT reads: while a DHT node is unreachable (a host cut off, not a process
    killed) a single read can time out on it and come back without live stages, and a newcomer that trusted
    it would take a stage that has peers, or rebuild from one neighbour when it has two."""
    stage_map = merge_stage_maps(await read_stage_map(dht, spec), await read_stage_map(dht, spec), spec.announce_ttl)
    peers = [p for records in stage_map.values() for p in records]

    async def current(peer: StageAnnouncement) -> StageAnnouncement | None:
        """The peer's own account of itself (its step and state now), or None if it does not answer. An
        announcement can lag a step or two behind: peers refresh it at most every STEP_ANNOUNCE_SECONDS."""
        for attempt_timeout in (timeout, 3 * timeout):
            try:
                info = await client.info(peer.peer_id, peer.stage, attempt_timeout)
                break
            except asyncio.TimeoutError:
                # Slow, not gone: on an overloaded machine a live peer can miss a short deadline, and a newcomer
                # that took its stage for lost would rebuild a stage that has peers. A dead process refuses at once.
                continue
            except Exception:
                return None
        else:
            return None
        try:
            fresh = StageAnnouncement.from_wire(info)
        except Exception:
            return peer
        return fresh if (fresh.peer_id, fresh.stage) == (peer.peer_id, peer.stage) else peer

    answers = dict(zip([p.peer_id for p in peers], await asyncio.gather(*[current(p) for p in peers])))
    return {stage: [answers[p.peer_id] for p in records if answers[p.peer_id] is not None]
            for stage, records in stage_map.items()}

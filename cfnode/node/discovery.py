"""What a node sees of the swarm: the live stage map (announcements checked against the peers themselves), and
the stage a newcomer takes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import hivemind
from hivemind.utils import get_dht_time
from hivemind.utils.logging import get_logger

from cfnode.config import JoinConfig, RunSpec
from cfnode.node.stage_choice import ahead_of, choose_stage, is_live
from cfnode.node.swarm_map import StageMap, merge_stage_maps, read_stage_map
from cfnode.protocol.identity import Identity
from cfnode.protocol.keys import stage_key
from cfnode.protocol.records import PeerState, StageAnnouncement
from cfnode.protocol.service import StageClient

logger = get_logger(__name__)


# Newcomers that start together take turns: each claims its place in line (its claim's time), waits this long for
# the claims of the others to show, and chooses its stage once every earlier claimant has chosen, seeing their
# choices. The wait for earlier claimants is bounded: a claimant that died leaves its claim for under a TTL.
CLAIM_SETTLE = 1.0
CLAIM_POLL = 0.25
CLAIM_WAIT = 30.0


@dataclass(frozen=True)
class StageChoice:
    stage: int
    joined_at: float  # DHT time of the newcomer's first claim: orders newcomers racing for one lost stage


async def pick_stage(config: JoinConfig, dht: hivemind.DHT, spec: RunSpec, client: StageClient,
                     identity: Identity) -> StageChoice:
    """The stage to serve: the one asked for, or the automatic choice, settled with the newcomers that start at the
    same time (each builds its model only after this, so without claims none would see the others)."""
    joined_at = get_dht_time()
    if config.stage is not None:
        if not 1 <= config.stage <= spec.num_stages:
            raise ValueError(f"stage {config.stage} does not exist: this run has stages 1..{spec.num_stages}")
        return StageChoice(config.stage, joined_at)
    if config.standby:
        # A warm spare: already connected and imported, it claims a lost stage as soon as one appears.
        logger.info("standing by until a stage has no live peer")
        while True:
            stage_map = await live_stage_map(dht, spec, client)
            if any(not is_live(stage_map.get(s, [])) for s in range(1, spec.num_stages + 1)):
                break
            await asyncio.sleep(config.standby_poll)
        joined_at = get_dht_time()
    return StageChoice(await _take_turn(dht, spec, client, identity, joined_at), joined_at)


async def _take_turn(dht: hivemind.DHT, spec: RunSpec, client: StageClient, identity: Identity,
                     joined_at: float) -> int:
    """Claim a place in line, wait for the newcomers ahead to choose, then choose seeing their choices, and make
    the choice visible at once (before the model is built), so the next in line sees it too."""
    me = identity.peer_id.to_base58()
    view = await joining_view(dht, spec, client)
    provisional = choose_stage(view, spec.num_stages)
    await _store_claim(dht, spec, identity, provisional, joined_at, claim=True)
    await asyncio.sleep(CLAIM_SETTLE)
    deadline = time.monotonic() + CLAIM_WAIT
    while True:
        view = await joining_view(dht, spec, client)
        ahead = [p for peers in view.values() for p in peers if p.claim and p.peer_id != me
                 and (p.joined_at, p.peer_id) < (joined_at, me)]
        if not ahead or time.monotonic() > deadline:
            if ahead:
                logger.warning(f"{len(ahead)} newcomer(s) ahead have not chosen a stage in {CLAIM_WAIT:.0f} s; "
                               "choosing without them")
            committed = {s: [p for p in peers if not p.claim] for s, peers in view.items()}
            stage = choose_stage(committed, spec.num_stages)
            counts = ", ".join(f"{s}: {len([p for p in peers if p.state != PeerState.LEAVING])}"
                               for s, peers in committed.items())
            logger.info(f"chose stage {stage} (peers per stage: {counts}; {len(ahead)} newcomer(s) ahead)")
            await _store_claim(dht, spec, identity, stage, joined_at, claim=False)
            if stage != provisional:  # withdraw the claim on the other stage
                await _store_claim(dht, spec, identity, provisional, joined_at, claim=True, state=PeerState.LEAVING)
            return stage
        await asyncio.sleep(CLAIM_POLL)


async def _store_claim(dht: hivemind.DHT, spec: RunSpec, identity: Identity, stage: int, joined_at: float,
                       claim: bool, state: PeerState = PeerState.JOINING) -> None:
    """A JOINING record: a claim (still choosing) or the choice made, before the peer serves anything."""
    record = StageAnnouncement(identity.peer_id.to_base58(), stage, state, 0, 0.0, 0, None, "fresh",
                               announced_at=round(get_dht_time(), 3), claim=claim, joined_at=round(joined_at, 3))
    # 0.9 of a TTL: it outlives its newcomer only briefly, and the peer's own announcement, stored later under the
    # same subkey with a full TTL, always expires after it (the DHT keeps a subkey's latest-expiring value).
    await dht.store(stage_key(spec.run_id, stage), record.to_wire(), get_dht_time() + 0.9 * spec.announce_ttl,
                    subkey=identity.owner_subkey, return_future=True)


async def joining_view(dht: hivemind.DHT, spec: RunSpec, client: StageClient) -> StageMap:
    """The live stage map plus the JOINING records of newcomers that do not answer yet (still choosing, or building
    their model): for choosing a stage, a newcomer that has chosen counts even before it serves."""
    live, records = await live_stage_map(dht, spec, client), await read_stage_map(dht, spec)
    view = {}
    for stage in range(1, spec.num_stages + 1):
        known = {p.peer_id for p in live.get(stage, [])}
        view[stage] = [*live.get(stage, []), *(p for p in records.get(stage, [])
                                               if p.state == PeerState.JOINING and p.peer_id not in known)]
    return view


async def wait_for_first_joiner(dht: hivemind.DHT, spec: RunSpec, client: StageClient, stage: int, peer_id: str,
                                joined_at: float, timeout: float) -> StageMap:
    """While newcomers that joined `stage` before this one are still obtaining its weights (and none is ONLINE),
    wait: then this one copies the first exactly instead of rebuilding the stage a second time. Returns the live
    stage map it last read. Gives up after `timeout` seconds (the first one may be stuck) and says so."""
    deadline = time.monotonic() + timeout
    logged = False
    while True:
        stage_map = await joining_view(dht, spec, client)
        ahead = ahead_of(stage_map, stage, peer_id, joined_at)
        if not ahead:
            return await live_stage_map(dht, spec, client)
        if time.monotonic() > deadline:
            logger.warning(f"stage {stage}: {len(ahead)} earlier newcomer(s) still joining after {timeout:.0f} s; "
                           "obtaining the weights without them")
            return await live_stage_map(dht, spec, client)
        if not logged:
            logger.info(f"stage {stage}: waiting for {', '.join(p.peer_id for p in ahead)} to come online, to copy it")
            logged = True
        await asyncio.sleep(0.5)


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
        if fresh.peer_id != peer.peer_id:
            return peer
        return fresh if fresh.stage == peer.stage else None  # it serves another stage now: the record is stale

    answers = dict(zip([p.peer_id for p in peers], await asyncio.gather(*[current(p) for p in peers])))
    return {stage: [answers[p.peer_id] for p in records if answers[p.peer_id] is not None]
            for stage, records in stage_map.items()}

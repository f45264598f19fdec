"""What a node sees of the swarm: the live stage map (announcements checked against the peers themselves), and
the stage a newcomer takes."""

from __future__ import annotations

import asyncio
import time

import hivemind
from hivemind.utils.logging import get_logger

from cfnode.config import JoinConfig, RunSpec
from cfnode.faults import FAULTS
from cfnode.node.claims import CLAIM_SETTLE, ClaimHolder, read_claims
from cfnode.node.stage_choice import StageChoice, assign_stages, is_live
from cfnode.node.swarm_map import StageMap, merge_stage_maps, online, read_progress, read_stage_map
from cfnode.protocol.identity import Identity
from cfnode.protocol.records import StageAnnouncement
from cfnode.protocol.service import StageClient

logger = get_logger(__name__)


async def pick_stage(config: JoinConfig, dht: hivemind.DHT, spec: RunSpec, client: StageClient,
                     identity: Identity) -> tuple[StageChoice, ClaimHolder]:
    """The stage to serve, the one asked for or the automatic choice, and the claim that holds this newcomer's
    place until it has announced itself (release it then).

    Every newcomer stores a join claim, waits for the claims stored before it, then takes its place in
    `assign_stages`. Newcomers that start together thereby choose in turn, each seeing the choices before it,
    rather than all reading the same map at once and piling onto one stage; and those that take the same stage
    know who came first (a stage without a live replica is rebuilt once, by the first, and copied by the rest).
    """
    if config.stage is not None and not 1 <= config.stage <= spec.num_stages:
        raise ValueError(f"stage {config.stage} does not exist: this run has stages 1..{spec.num_stages}")
    if config.stage is None and config.standby:
        # A warm spare: already connected and imported, it claims a lost stage as soon as one appears.
        logger.info("standing by until a stage has no live peer")
        while True:
            stage_map = await live_stage_map(dht, spec, client)
            if any(not is_live(stage_map.get(s, [])) for s in range(1, spec.num_stages + 1)):
                break
            await asyncio.sleep(config.standby_poll)
    holder = ClaimHolder(dht, spec, identity, config.stage or 0)
    stored_in = await holder.place()
    # A claim stored before this one but slower to store than this one is still seen: the wait scales with how
    # long the DHT takes to store right now (a loaded machine is slower at everything).
    await asyncio.sleep(max(CLAIM_SETTLE, 2 * stored_in))
    gone: set[str] = set()  # peers with a record that did not answer: dead or cut off, not newcomers still choosing
    stage_map = await live_stage_map(dht, spec, client, unanswered=gone)
    if not any(online(peers) for peers in stage_map.values()):
        progress = await read_progress(dht, spec)
        if progress is not None:  # a view without stages of a run that trained is partial: never choose from it
            stage_map = await wait_for_live_stage(dht, spec, client, progress.step)
    # A claim outlives its claimant's announcement by up to its TTL: one whose peer announced and died since is no
    # newcomer, and counting it would hold the very stage that peer's death left without a live peer.
    claims = [c for c in await read_claims(dht, spec) if c.peer_id != holder.claim.peer_id and c.peer_id not in gone]
    choices = assign_stages(stage_map, [*claims, holder.claim], spec.num_stages)
    choice = choices[holder.claim.peer_id]
    await holder.decide(choice.stage)
    lost = [s for s in range(1, spec.num_stages + 1) if not is_live(stage_map.get(s, []))]
    logger.info(f"chose stage {choice.stage}: stages without a live peer {lost or 'none'}, {len(choices)} newcomers "
                f"choosing with this one, {len(choice.ahead)} ahead on this stage")
    return choice, holder


async def live_stage_map(dht: hivemind.DHT, spec: RunSpec, client: StageClient, timeout: float = 3.0,
                         unanswered: set[str] | None = None) -> StageMap:
    """The stage map without peers that no longer answer: a SIGKILLed peer's record outlives it by up to its TTL,
    and a newcomer must see that stage as lost at once.

    The map is the union of two DHT reads: while a DHT node is unreachable (a host cut off, not a process
    killed) a single read can time out on it and come back without live stages, and a newcomer that trusted
    it would take a stage that has peers, or rebuild from one neighbour when it has two.

    `unanswered`, if given, collects the peers that did not answer, and those already in it are not asked again
    (a second look in one join, which is after records the first missed, not after a host that is cut off)."""
    if FAULTS.fire("empty_view", 0, 0):
        return {s: [] for s in range(1, spec.num_stages + 1)}
    stage_map = merge_stage_maps(await read_stage_map(dht, spec), await read_stage_map(dht, spec), spec.announce_ttl)
    peers = [p for records in stage_map.values() for p in records]

    async def current(peer: StageAnnouncement) -> StageAnnouncement | None:
        """The peer's own account of itself (its step and state now), or None if it does not answer. An
        announcement can lag a step or two behind: peers refresh it at most every STEP_ANNOUNCE_SECONDS."""
        if unanswered is not None and peer.peer_id in unanswered:
            return None
        for attempt_timeout in (timeout, 3 * timeout):
            try:
                info = await client.info(peer.peer_id, peer.stage, attempt_timeout)
                break
            except asyncio.TimeoutError:
                # Slow, not gone: on an overloaded machine a live peer can miss a short deadline, and a newcomer
                # that took its stage for lost would rebuild a stage that has peers. A dead process refuses at once.
                continue
            except Exception:
                return gone(peer)
        else:
            return gone(peer)
        try:
            fresh = StageAnnouncement.from_wire(info)
        except Exception:
            return peer
        if fresh.peer_id != peer.peer_id:
            return peer
        # A peer that serves another stage now (it moved, or restarted with the same identity) left this record
        # behind: it is not a peer of this stage.
        return fresh if fresh.stage == peer.stage else None

    def gone(peer: StageAnnouncement) -> None:
        if unanswered is not None:
            unanswered.add(peer.peer_id)
        return None

    answers = dict(zip([p.peer_id for p in peers], await asyncio.gather(*[current(p) for p in peers])))
    return {stage: [answers[p.peer_id] for p in records if answers[p.peer_id] is not None]
            for stage, records in stage_map.items()}


async def wait_for_live_stage(dht: hivemind.DHT, spec: RunSpec, client: StageClient, reached: int,
                              besides: int | None = None) -> StageMap:
    """The run trained (a trainer proved step `reached`), yet this node sees no live stage (other than `besides`).
    Its view is partial (a bootstrap that restarted with an empty routing table, a DHT read that timed out, its own
    slow start) or every stage is gone; either way fresh weights, or a stage chosen from this view, would start an
    island: a second run that the trainer never sees. So it waits, saying why, until a stage shows up."""
    started = logged = time.monotonic()
    while True:
        await asyncio.sleep(2.0)
        stage_map = await live_stage_map(dht, spec, client)
        if any(online(peers) for s, peers in stage_map.items() if s != besides):
            logger.info(f"live stages found after {time.monotonic() - started:.0f} s")
            return stage_map
        if time.monotonic() - logged >= 30.0 or logged == started:
            logged = time.monotonic()
            logger.warning(f"the run reached step {reached} but no {'other ' if besides else ''}stage answers; "
                           f"waiting for one rather than starting from fresh weights "
                           f"({logged - started:.0f} s so far)")

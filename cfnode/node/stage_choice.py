"""Which stage a newcomer should serve: pure decision math over a stage map and the newcomers' claims."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cfnode.protocol.records import JoinClaim, PeerState, StageAnnouncement

StageMap = dict[int, list[StageAnnouncement]]


def _serving(peers: list[StageAnnouncement]) -> list[StageAnnouncement]:
    return [p for p in peers if p.state in (PeerState.ONLINE, PeerState.JOINING)]


def typical_throughput(stage_map: StageMap) -> float:
    """What a peer that has not measured itself yet is expected to bring: the median of the online peers'."""
    rates = [p.throughput for peers in stage_map.values() for p in peers
             if p.state == PeerState.ONLINE and p.throughput > 0]
    return statistics.median(rates) if rates else 0.0


def stage_capacity(peers: list[StageAnnouncement], typical: float = 0.0) -> float:
    """Total throughput of the peers that serve or are about to serve a stage; one that has not measured itself
    yet (a newcomer) counts as `typical`, so newcomers spread instead of all filling the weakest stage."""
    return sum(p.throughput or typical for p in _serving(peers))


def is_live(peers: list[StageAnnouncement]) -> bool:
    """A stage is live while some peer serves it or is about to."""
    return bool(_serving(peers))


def choose_stage(stage_map: StageMap, num_stages: int) -> int:
    """A stage with no live peer first (lowest number), then the stage with the least throughput.

    JOINING peers count as live: they will serve soon, and counting them keeps two newcomers from
    rebuilding the same stage. Ties go to the stage with fewer peers, then the lower number.
    """
    stages = range(1, num_stages + 1)
    lost = [s for s in stages if not is_live(stage_map.get(s, []))]
    if lost:
        return lost[0]
    typical = typical_throughput(stage_map)
    return min(stages, key=lambda s: (stage_capacity(stage_map.get(s, []), typical),
                                      len(_serving(stage_map.get(s, []))), s))


@dataclass(frozen=True)
class StageChoice:
    """A newcomer's stage, and the peers that took it before this one and are still obtaining weights: where the
    stage has no live replica, the newcomer waits for the first of them and copies it, rather than rebuilding the
    stage a second time on its own."""

    stage: int
    ahead: tuple[str, ...] = ()


def assign_stages(stage_map: StageMap, claims: Sequence[JoinClaim], num_stages: int) -> dict[str, StageChoice]:
    """The stage of every pending claimant, in queue order (claimed_at, then peer id).

    A claimant that has announced on a stage already is not pending (the map counts it). One that has chosen
    (its claim names a stage) holds that stage. Each undecided one takes `choose_stage` of the map with every
    claimant before it added as JOINING. The choice of a claimant depends only on the map and on the claimants
    before it, so newcomers that read the same claims agree, whatever claims came after theirs.

    `ahead` is in the same queue order: a JOINING peer of the map that claimed after this claimant (it chose while
    this one was slow to choose) waits for this one, so it is not ahead of it.
    """
    announced = {p.peer_id for peers in stage_map.values() for p in peers}
    pending = sorted((c for c in claims if c.peer_id not in announced), key=lambda c: (c.claimed_at, c.peer_id))
    view: StageMap = {s: list(stage_map.get(s, [])) for s in range(1, num_stages + 1)}
    queued: dict[int, list[tuple[float, str]]] = {s: [(p.claimed_at, p.peer_id) for p in view[s]
                                                      if p.state == PeerState.JOINING] for s in view}
    choices: dict[str, StageChoice] = {}
    for claim in pending:
        stage = claim.stage if 1 <= claim.stage <= num_stages else choose_stage(view, num_stages)
        place = (claim.claimed_at, claim.peer_id)
        ahead = tuple(peer for claimed_at, peer in sorted(queued[stage]) if (claimed_at, peer) < place)
        choices[claim.peer_id] = StageChoice(stage, ahead)
        view[stage].append(_newcomer(claim.peer_id, stage))
        queued[stage].append(place)
    return choices


_PLACEHOLDER = StageAnnouncement(peer_id="-", stage=1, state=PeerState.JOINING, step=0, throughput=0.0, load=0,
                                 grad_norm=None, source="fresh")


def _newcomer(peer_id: str, stage: int) -> StageAnnouncement:
    return replace(_PLACEHOLDER, peer_id=peer_id, stage=stage)

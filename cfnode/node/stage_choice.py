"""Which stage a newcomer should serve: pure decision math over a stage map."""

from __future__ import annotations

from cfnode.protocol.records import PeerState, StageAnnouncement


def stage_capacity(peers: list[StageAnnouncement]) -> float:
    """Total measured throughput of the peers that serve or are about to serve a stage."""
    return sum(p.throughput for p in peers if p.state in (PeerState.ONLINE, PeerState.JOINING))


def is_live(peers: list[StageAnnouncement]) -> bool:
    """A stage is live while some peer serves it or is about to."""
    return any(p.state in (PeerState.ONLINE, PeerState.JOINING) for p in peers)


def choose_stage(stage_map: dict[int, list[StageAnnouncement]], num_stages: int) -> int:
    """A stage with no live peer first (lowest number), then the stage with the least throughput.

    JOINING peers count as live: they will serve soon, and counting them keeps two newcomers from
    rebuilding the same stage. Ties go to the stage with fewer peers, then the lower number.
    """
    def live(stage: int) -> list[StageAnnouncement]:
        return [p for p in stage_map.get(stage, []) if p.state in (PeerState.ONLINE, PeerState.JOINING)]

    stages = range(1, num_stages + 1)
    lost = [s for s in stages if not live(s)]
    if lost:
        return lost[0]
    return min(stages, key=lambda s: (stage_capacity(live(s)), len(live(s)), s))

"""Which peer of a stage gets the next call: the live stage map, bans, load, and waiting for a lost stage."""

from __future__ import annotations

import asyncio
import random
import time

import hivemind
from hivemind.utils.logging import get_logger

from cfnode.config import RunSpec
from cfnode.node.swarm_map import StageMap, merge_stage_maps, online, read_stage_map
from cfnode.protocol.records import StageAnnouncement

logger = get_logger(__name__)


FIRST_BAN_SECONDS = 1.0


class StageUnavailable(RuntimeError):
    """A stage had no usable peer for longer than the trainer is willing to wait."""


class Backoff:
    """Exponential delays between min_delay and max_delay, with jitter; one policy for every wait."""

    def __init__(self, min_delay: float = 0.2, max_delay: float = 5.0):
        self.min_delay, self.max_delay = min_delay, max_delay
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.max_delay, self.min_delay * 2.0 ** min(self.attempt, 60))
        self.attempt += 1
        return delay * random.uniform(0.8, 1.2)


class Router:
    def __init__(self, dht: hivemind.DHT, spec: RunSpec, ban_seconds: float, refresh_seconds: float = 1.0):
        self.dht, self.spec = dht, spec
        self.ban_seconds = ban_seconds
        self.refresh_seconds = refresh_seconds
        self.stage_map: StageMap = {s: [] for s in range(1, spec.num_stages + 1)}
        self._banned: dict[str, float] = {}  # peer id -> monotonic time the ban ends
        self._inflight: dict[str, int] = {}
        self._strikes: dict[str, int] = {}  # consecutive failures per peer
        self._refreshed_at = 0.0
        self._refresh_lock = asyncio.Lock()

    async def refresh(self, max_age: float = 0.0) -> StageMap:
        async with self._refresh_lock:
            if time.monotonic() - self._refreshed_at > max_age:
                fresh = await read_stage_map(self.dht, self.spec)
                self.stage_map = merge_stage_maps(self.stage_map, fresh, self.spec.announce_ttl)
                self._refreshed_at = time.monotonic()
        return self.stage_map

    async def refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:
                logger.warning(f"reading the stage map failed: {e}")
            await asyncio.sleep(self.refresh_seconds)

    def ban(self, peer_id: str, seconds: float | None = None) -> float:
        """Skip a peer for a while. Without `seconds`, bans escalate: a peer that failed once is retried soon
        (a single lost stream should not take a stage offline), one that keeps failing waits up to ban_seconds."""
        if seconds is None:
            strikes = self._strikes.get(peer_id, 0)
            self._strikes[peer_id] = strikes + 1
            seconds = min(self.ban_seconds, FIRST_BAN_SECONDS * 2.0 ** min(strikes, 30))
        self._banned[peer_id] = time.monotonic() + seconds
        return seconds

    def strikes(self, peer_id: str) -> int:
        """How many times in a row the peer has failed."""
        return self._strikes.get(peer_id, 0)

    def unban(self, peer_id: str) -> None:
        self._banned.pop(peer_id, None)

    def succeeded(self, peer_id: str) -> None:
        self._strikes.pop(peer_id, None)

    def is_banned(self, peer_id: str) -> bool:
        return self._banned.get(peer_id, 0.0) > time.monotonic()

    def usable(self, stage: int) -> list[StageAnnouncement]:
        return [p for p in online(self.stage_map.get(stage, [])) if not self.is_banned(p.peer_id)]

    def pick(self, stage: int, exclude: set[str] = frozenset()) -> str | None:
        """The least loaded usable peer of a stage (fewest calls in flight from here, then fastest)."""
        candidates = [p for p in self.usable(stage) if p.peer_id not in exclude]
        if not candidates:
            return None
        random.shuffle(candidates)
        best = min(candidates, key=lambda p: (self._inflight.get(p.peer_id, 0), -p.throughput))
        return best.peer_id

    def started(self, peer_id: str) -> None:
        self._inflight[peer_id] = self._inflight.get(peer_id, 0) + 1

    def finished(self, peer_id: str) -> None:
        self._inflight[peer_id] = max(0, self._inflight.get(peer_id, 0) - 1)

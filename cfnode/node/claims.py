"""Newcomers' join claims on the DHT: written before a newcomer chooses a stage, so newcomers that start together
(`docker compose up --scale peer=6`) see each other and spread over the stages instead of herding onto one."""

from __future__ import annotations

import asyncio
import contextlib
import time

import hivemind
from hivemind.utils import get_dht_time
from hivemind.utils.logging import get_logger

from cfnode.config import RunSpec
from cfnode.node.swarm_map import owned_records
from cfnode.protocol.identity import Identity
from cfnode.protocol.keys import claims_key
from cfnode.protocol.records import JoinClaim

logger = get_logger(__name__)

CLAIM_TTL = 12.0  # a claimant that dies holds its place this long at most
CLAIM_REFRESH = 3.0
CLAIM_SETTLE = 1.5  # how long a claimant waits, after its claim is stored, for the claims stored before it


async def store_claim(dht: hivemind.DHT, spec: RunSpec, identity: Identity, claim: JoinClaim) -> bool:
    return bool(await dht.store(claims_key(spec.run_id), claim.to_wire(), get_dht_time() + CLAIM_TTL,
                                subkey=identity.owner_subkey, return_future=True))


async def read_claims(dht: hivemind.DHT, spec: RunSpec) -> list[JoinClaim]:
    found = await dht.get(claims_key(spec.run_id), latest=True, return_future=True)
    return owned_records(found, JoinClaim.from_wire)


class ClaimHolder:
    """This newcomer's claim, stored and refreshed until its JOINING announcement is on the DHT (`release`)."""

    def __init__(self, dht: hivemind.DHT, spec: RunSpec, identity: Identity, stage: int = 0):
        """`stage`: the stage asked for (`--stage N`), 0 to choose one."""
        self.dht, self.spec, self.identity = dht, spec, identity
        self.claim = JoinClaim(peer_id=identity.peer_id.to_base58(), claimed_at=round(get_dht_time(), 4), stage=stage)
        self._task: asyncio.Task | None = None

    async def place(self) -> float:
        """Store the claim (retrying until it is stored); return how long storing took."""
        started = time.monotonic()
        while not await store_claim(self.dht, self.spec, self.identity, self.claim):
            logger.warning("the join claim was not stored; retrying")
            await asyncio.sleep(0.5)
        self._task = asyncio.create_task(self._refresh_forever())
        return time.monotonic() - started

    async def decide(self, stage: int) -> None:
        """Name the chosen stage in the claim, so later newcomers count it before its announcement is visible."""
        self.claim = JoinClaim(self.claim.peer_id, self.claim.claimed_at, stage)
        with contextlib.suppress(Exception):
            await store_claim(self.dht, self.spec, self.identity, self.claim)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(CLAIM_REFRESH)
            try:
                await store_claim(self.dht, self.spec, self.identity, self.claim)
            except Exception as e:  # a DHT hiccup: the next round retries, and the TTL covers the gap
                logger.debug(f"refreshing the join claim failed: {e}")

    def release(self) -> None:
        """Stop refreshing: the announcement stands for this peer now (readers drop claims of announced peers)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

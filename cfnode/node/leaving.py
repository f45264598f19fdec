"""A clean leave: a stage peer on SIGTERM stops taking work, finishes what is in flight and, as its stage's last
peer, hands the exact state over to a newcomer and to a neighbouring stage."""

from __future__ import annotations

import asyncio
import time

from hivemind.utils.logging import get_logger

from cfnode.node.discovery import live_stage_map
from cfnode.node.stage_state import snapshot
from cfnode.node.swarm_map import StageMap, online, read_stage_map
from cfnode.protocol.records import PeerState

logger = get_logger(__name__)


class Leaving:
    """The leaving half of StagePeer (its state lives there)."""

    async def leave(self, timeout: float) -> None:
        """A clean exit: take no new work, finish what is in flight and, as the stage's last peer, hand the exact
        state over (to a newcomer copying it now, and to a neighbour for the next one), so nothing is rebuilt."""
        deadline = time.monotonic() + timeout
        self.state = PeerState.LEAVING  # forward, backward and step are refused from now on: the state is frozen
        await self.announce()
        while self.load > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stage_map = await live_stage_map(self.dht, self.spec, self.client)
        others = [p for p in online(stage_map.get(self.stage, [])) if p.peer_id != self.peer_id]
        if others:
            logger.info(f"stage {self.stage}: leaving; {len(others)} other replica(s) keep serving it")
            return
        if self.current_step > 0:  # an untrained stage has nothing worth handing over
            await self._hand_to_neighbours(stage_map, deadline)
        await self._wait_for_newcomer(deadline)

    async def _hand_to_neighbours(self, stage_map: StageMap, deadline: float) -> None:
        async with self._state_lock:  # an in-flight step finishes first
            state = await self._compute(snapshot, self.stage, self.current_step, self.grad_norm, self.model,
                                        self.optimizer, False, self.step_proof)
        holders = []
        for stage in (self.stage + 1, self.stage - 1):
            for peer in online(stage_map.get(stage, [])):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await self.client.put_copy(peer.peer_id, state, min(self.request_timeout * 4, remaining))
                except Exception as e:
                    logger.warning(f"stage {self.stage}: stage {stage} peer {peer.peer_id} did not take the state: {e}")
                    continue
                holders.append(f"{stage}:{peer.peer_id}")
                break
        if holders:
            logger.info(f"stage {self.stage}: last peer leaving; left its exact state (step {state.step}) with "
                        f"{', '.join(holders)}")
        else:
            logger.warning(f"stage {self.stage}: last peer leaving and no neighbour took its state; the next "
                           f"newcomer rebuilds the stage by {self.spec.recovery}")

    async def _wait_for_newcomer(self, deadline: float, grace: float = 3.0) -> None:
        """Stay while a newcomer joining this stage copies this peer, until it is online. A standby spare claims
        the stage within its poll interval, so wait `grace` seconds for one to show up."""
        noticed_by = time.monotonic() + grace
        while time.monotonic() < deadline:
            peers = [p for p in (await read_stage_map(self.dht, self.spec)).get(self.stage, [])
                     if p.peer_id != self.peer_id]
            taken = online(peers)
            if taken:
                logger.info(f"stage {self.stage}: handed over to {', '.join(p.peer_id for p in taken)}")
                return
            if not any(p.state == PeerState.JOINING for p in peers) and time.monotonic() > noticed_by:
                return
            await asyncio.sleep(0.25)
        logger.warning(f"stage {self.stage}: a newcomer was still joining when the leave timeout ran out")

"""`cfnode join`: learn the run spec, pick and obtain a stage, announce it, serve until stopped."""

from __future__ import annotations

import asyncio
import contextlib

from hivemind.utils.logging import get_logger

from cfnode.config import JoinConfig
from cfnode.node.discovery import live_stage_map, pick_stage
from cfnode.node.metrics import PeerMetrics, serving
from cfnode.node.runtime import connect, wait_forever
from cfnode.node.stage_peer import StagePeer
from cfnode.node.swarm_map import read_spec
from cfnode.node.trace import ComputeTrace
from cfnode.protocol.records import PeerState
from cfnode.protocol.service import StageClient, StageService

logger = get_logger(__name__)


async def run_join(config: JoinConfig, ready: asyncio.Event | None = None) -> None:
    async with connect(config.network) as (dht, p2p, identity):
        spec = await read_spec(dht, config.network)
        client = StageClient(p2p, spec.max_message_bytes, spec.wire_dtype, spec=spec)
        choice, claim = await pick_stage(config, dht, spec, client, identity)
        stage = choice.stage
        trace = ComputeTrace(config.trace_dir, stage, identity.peer_id.to_base58()) if config.trace_dir else None
        peer = StagePeer(spec, stage, identity, dht, client, config.device, config.request_timeout,
                         config.keep_activations, trace, config.init_from, config.state_path, config.state_every)
        peer.claimed_at = claim.claim.claimed_at
        metrics = PeerMetrics(peer)
        metrics_server = contextlib.ExitStack()  # bound first: a busy port fails before this peer announces
        metrics_server.enter_context(serving(metrics.registry, config.network.host, config.metrics_port))
        service = StageService(metrics.instrument(peer))
        await service.add_p2p_handlers(p2p)
        announcer = None
        try:
            logger.info(f"joining stage {stage} of {spec.num_stages} as {peer.peer_id}")
            if peer.maddrs:  # any of them works as an initial peer for other nodes (with --spec-owner)
                logger.info(f"reachable at {' '.join(peer.maddrs[:2])}")
            await peer.announce()  # JOINING: other newcomers now see this stage as taken
            claim.release()
            # Refreshed while the weights come (a rebuild with its refit can outlast the TTL many times over): a
            # lapsed JOINING record would show the stage as empty again, and a newcomer waiting to copy this one
            # would take it for gone and rebuild the stage a second time.
            announcer = asyncio.create_task(peer.announce_forever())
            await peer.obtain_weights(await live_stage_map(dht, spec, client, unanswered=peer.unanswered),
                                      choice.ahead)
            peer.state = PeerState.ONLINE
            await peer.announce()
            recovered = f", from {', '.join(peer.recovered_from)}" if peer.recovered_from else ""
            logger.info(f"serving stage {stage} (source: {peer.source}{recovered}) at step {peer.current_step}")
            if ready is not None:
                ready.set()
            await wait_forever()
        finally:
            claim.release()
            served = peer.state == PeerState.ONLINE
            if peer.state == PeerState.ONLINE and config.leave_timeout > 0:  # the announcer refreshes LEAVING
                logger.info(f"stage {stage}: leaving (up to {config.leave_timeout:.0f} s to hand over)")
                try:
                    await peer.leave(config.leave_timeout)
                except Exception as e:
                    logger.warning(f"stage {stage}: the clean leave failed: {type(e).__name__}: {e}")
            if announcer is not None:
                announcer.cancel()
            peer.state = PeerState.LEAVING
            with contextlib.suppress(Exception):
                await asyncio.wait_for(peer.announce(), 2.0)
            if served:  # its final state, for an offline export (a peer that never served keeps the old file)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(peer.save_state(), config.leave_timeout or 10.0)
            with contextlib.suppress(Exception):
                await service.remove_p2p_handlers(p2p)
            peer.close()
            metrics_server.close()
            logger.info(f"stage {stage}: left the swarm")

"""What every cfnode process does around its role: the event loop, the DHT and p2p, and clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import hivemind
import uvloop
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils.logging import get_logger

from cfnode.config import NetworkConfig
from cfnode.node.dht import start_dht
from cfnode.protocol.identity import Identity, create_identity, load_identity
from cfnode.protocol.record_validator import run_validators

logger = get_logger(__name__)
T = TypeVar("T")


def run_role(main: Callable[[], Awaitable[T]]) -> T:
    """Run a role's coroutine on uvloop. SIGINT and SIGTERM cancel it, so its cleanup runs, and then the process
    exits with the usual status for that signal (130, 143)."""
    received: list[int] = []

    async def guarded() -> T:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda s=sig: (received.append(s), task.cancel()))
        return await main()

    try:
        return uvloop.run(guarded())
    except asyncio.CancelledError:
        if received:
            logger.info(f"stopped by {signal.Signals(received[0]).name}")
            raise SystemExit(128 + received[0]) from None
        raise


@contextlib.asynccontextmanager
async def connect(network: NetworkConfig) -> AsyncIterator[tuple[hivemind.DHT, P2P, Identity]]:
    """Start the DHT (in its child process) and a p2p handle in this process; shut both down on exit.

    The node's identity key is its libp2p identity and signs its DHT records: `--identity` names a file to reuse
    (created if missing); without it a fresh key lives in a temporary file only until the daemon has read it.
    """
    identity, fresh = _identity(network.identity_path)
    try:
        dht = await asyncio.get_running_loop().run_in_executor(None, lambda: start_dht(
            initial_peers=network.initial_peers, host=network.host, port=network.port,
            identity_path=identity.path, client_mode=network.client_mode,
            announce_maddrs=network.announce_maddrs, timeout=network.connect_timeout,
            record_validators=run_validators(network.run_id, identity), check_identity_free=not fresh,
        ))
    finally:
        if network.identity_path is None:
            shutil.rmtree(os.path.dirname(identity.path), ignore_errors=True)
    p2p = None
    # The peers joined through and the spec owners (the bootstrap, where a node joined through another peer)
    targets = tuple(dict.fromkeys((*network.initial_peer_ids, *network.spec_owners)))
    keepalive = asyncio.create_task(keep_in_touch(dht, targets)) if targets else None
    try:
        p2p = await dht.replicate_p2p()
        yield dht, p2p, identity
    finally:
        if keepalive is not None:
            keepalive.cancel()
        if p2p is not None:
            with contextlib.suppress(Exception):
                await p2p.shutdown()
        await asyncio.get_running_loop().run_in_executor(None, dht.shutdown)


KEEPALIVE_SECONDS = 2.0


async def keep_in_touch(dht: hivemind.DHT, peer_ids: tuple[str, ...]) -> None:
    """Ping the initial peers and the spec owners now and then. A bootstrap that restarts (same identity, same
    address) comes back with an empty routing table; the pings put every node back in it within seconds, so
    newcomers that join through it see the whole swarm instead of an island of other newcomers."""
    targets = [PeerID.from_base58(p) for p in peer_ids]
    while True:
        await asyncio.sleep(KEEPALIVE_SECONDS)
        try:
            await dht.run_coroutine(functools.partial(_ping, targets=targets), return_future=True)
        except Exception as e:  # the DHT process is shutting down, or a hiccup: the next round tries again
            logger.debug(f"keepalive ping failed: {e}")


async def _ping(_dht: hivemind.DHT, node: DHTNode, targets: list[PeerID]) -> None:
    await asyncio.gather(*[node.protocol.call_ping(peer) for peer in targets], return_exceptions=True)


def _identity(path: str | None) -> tuple[Identity, bool]:
    """The identity at `path` (generated there if missing) or a fresh one; and whether it was just generated."""
    if path is None:
        return create_identity(os.path.join(tempfile.mkdtemp(prefix="cfnode-id-"), "identity.key")), True
    if os.path.exists(path):
        return load_identity(path), False
    return create_identity(path), True


async def wait_forever() -> None:
    await asyncio.Event().wait()

"""`cfnode bootstrap`: the DHT entry point. Publishes the run spec and keeps it fresh."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hivemind.utils import get_dht_time
from hivemind.utils.logging import get_logger

from cfnode.config import NetworkConfig, RunSpec
from cfnode.node.runtime import connect
from cfnode.protocol.identity import Identity
from cfnode.protocol.keys import spec_key

logger = get_logger(__name__)

SPEC_TTL = 3600.0  # the spec outlives a bootstrap restart; it is refreshed long before it expires
SPEC_REFRESH = 60.0


async def run_bootstrap(network: NetworkConfig, spec: RunSpec, maddr_file: str | None = None) -> None:
    async with connect(network) as (dht, _p2p, identity):
        await _publish(dht, spec, identity)
        maddr = pick_public_maddr([str(m) for m in dht.get_visible_maddrs()], network.host)
        if maddr_file:
            Path(maddr_file).write_text(maddr + "\n")
        logger.info(f"run {spec.run_id!r}: {spec.num_stages} stages x {spec.layers_per_stage} layers, "
                    f"hidden {spec.hidden_size}, recovery {spec.recovery}")
        print(f"bootstrap ready: {maddr}", flush=True)
        while True:
            await asyncio.sleep(SPEC_REFRESH)
            await _publish(dht, spec, identity)


async def _publish(dht, spec: RunSpec, identity: Identity) -> None:
    # Under the bootstrap's own signed subkey: nobody else can overwrite it, and readers trust only this signer.
    stored = await dht.store(spec_key(spec.run_id), spec.to_dict(), get_dht_time() + SPEC_TTL,
                             subkey=identity.owner_subkey, return_future=True)
    if not stored:
        logger.warning("the run spec was not stored on the DHT; retrying at the next refresh")


def pick_public_maddr(maddrs: list[str], host: str) -> str:
    """The address to hand out: the one on the asked-for host, else (listening on all) a non-loopback one."""
    if not maddrs:
        raise RuntimeError("the DHT reports no address to be reached at")
    exact = [m for m in maddrs if f"/{host}/" in m]
    if exact:
        return exact[0]
    routable = [m for m in maddrs if "/127." not in m and "/::1/" not in m]
    return (routable or maddrs)[0]

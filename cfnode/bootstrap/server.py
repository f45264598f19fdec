"""`cfnode bootstrap`: the DHT entry point. Publishes the run spec and keeps it fresh, and keeps the run's progress
(the furthest step a trainer proved) across its own restarts, so a newcomer that joins through a bootstrap that has
just come back, with an empty routing table, still learns that the run trained (and does not start an island)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from hivemind.utils import get_dht_time
from hivemind.utils.logging import get_logger

from cfnode.config import NetworkConfig, RunSpec
from cfnode.node.runtime import connect
from cfnode.node.swarm_map import read_progress
from cfnode.protocol.identity import Identity
from cfnode.protocol.keys import progress_key, spec_key
from cfnode.protocol.records import PROGRESS_TTL, RecordError, RunProgress
from cfnode.protocol.trust import step_proven

logger = get_logger(__name__)

SPEC_TTL = 3600.0  # the spec outlives a bootstrap restart; it is refreshed long before it expires
SPEC_REFRESH = 60.0
PROGRESS_POLL = 10.0


def progress_path(network: NetworkConfig) -> Path | None:
    """Where a bootstrap with a kept identity keeps the run's progress: next to its identity file."""
    return Path(f"{network.identity_path}.progress.json") if network.identity_path else None


def load_progress(path: Path | None, spec: RunSpec) -> RunProgress | None:
    """The progress saved by an earlier life of this bootstrap, if it is this run's and its proof holds."""
    if path is None or not path.exists():
        return None
    try:
        record = RunProgress.from_wire(json.loads(path.read_text()))
    except (OSError, ValueError, RecordError) as e:
        logger.warning(f"ignoring the saved run progress {path}: {e}")
        return None
    if not step_proven(spec, record.step, record.step_proof):
        logger.warning(f"ignoring the saved run progress {path}: its step {record.step} is not proven for this run")
        return None
    return record


def save_progress(path: Path | None, record: RunProgress) -> None:
    if path is None:
        return
    try:
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(record.to_wire()))
        os.replace(temporary, path)  # a crash mid-write leaves the previous file
    except OSError as e:
        logger.warning(f"could not save the run progress to {path}: {e}")


async def run_bootstrap(network: NetworkConfig, spec: RunSpec, maddr_file: str | None = None) -> None:
    async with connect(network) as (dht, _p2p, identity):
        await _publish(dht, spec, identity)
        path = progress_path(network)
        progress = load_progress(path, spec)
        if progress is not None:
            await _publish_progress(dht, spec, identity, progress)
            logger.info(f"the run reached step {progress.step} before this bootstrap restarted")
        maddr = pick_public_maddr([str(m) for m in dht.get_visible_maddrs()], network.host)
        if maddr_file:
            Path(maddr_file).write_text(maddr + "\n")
        logger.info(f"run {spec.run_id!r}: {spec.num_stages} stages x {spec.layers_per_stage} layers, "
                    f"hidden {spec.hidden_size}, recovery {spec.recovery}")
        print(f"bootstrap ready: {maddr}", flush=True)
        published = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(PROGRESS_POLL)
            try:
                seen = await read_progress(dht, spec)
                if seen is not None and (progress is None or seen.step > progress.step):
                    progress = seen
                    save_progress(path, progress)
                    await _publish_progress(dht, spec, identity, progress)
                if asyncio.get_running_loop().time() - published >= SPEC_REFRESH:
                    published = asyncio.get_running_loop().time()
                    await _publish(dht, spec, identity)
                    if progress is not None:
                        await _publish_progress(dht, spec, identity, progress)
            except Exception as e:  # a DHT hiccup: the next round tries again
                logger.warning(f"refreshing the bootstrap's records failed: {type(e).__name__}: {e}")


async def _publish(dht, spec: RunSpec, identity: Identity) -> None:
    # Under the bootstrap's own signed subkey: nobody else can overwrite it, and readers trust only this signer.
    stored = await dht.store(spec_key(spec.run_id), spec.to_dict(), get_dht_time() + SPEC_TTL,
                             subkey=identity.owner_subkey, return_future=True)
    if not stored:
        logger.warning("the run spec was not stored on the DHT; retrying at the next refresh")


async def _publish_progress(dht, spec: RunSpec, identity: Identity, progress: RunProgress) -> None:
    await dht.store(progress_key(spec.run_id), progress.to_wire(), get_dht_time() + PROGRESS_TTL,
                    subkey=identity.owner_subkey, return_future=True)


def pick_public_maddr(maddrs: list[str], host: str) -> str:
    """The address to hand out: the one on the asked-for host, else (listening on all) a non-loopback one."""
    if not maddrs:
        raise RuntimeError("the DHT reports no address to be reached at")
    exact = [m for m in maddrs if f"/{host}/" in m]
    if exact:
        return exact[0]
    routable = [m for m in maddrs if "/127." not in m and "/::1/" not in m]
    return (routable or maddrs)[0]

"""Reading the run spec and the live stage map from the DHT."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import hivemind
from hivemind.utils import get_dht_time
from hivemind.utils.logging import get_logger

from cfnode.config import NetworkConfig, RunSpec
from cfnode.faults import FAULTS
from cfnode.protocol.identity import owner_peer_id
from cfnode.protocol.keys import progress_key, spec_key, stage_key, trainer_key
from cfnode.protocol.records import (
    PeerState,
    RecordError,
    RunProgress,
    StageAnnouncement,
    TrainerAnnouncement,
    spec_from_wire,
)
from cfnode.protocol.trust import is_trainer, step_proven

logger = get_logger(__name__)

StageMap = dict[int, list[StageAnnouncement]]
R = TypeVar("R", StageAnnouncement, TrainerAnnouncement)


class SpecNotFound(RuntimeError):
    pass


async def read_spec(dht: hivemind.DHT, network: NetworkConfig) -> RunSpec:
    """The run spec signed by a trusted owner (`network.spec_owners`, the first one that has published wins);
    waits for it up to `network.connect_timeout` seconds. Specs signed by anyone else are ignored."""
    run_id, owners = network.run_id, network.spec_owners
    if not owners:
        raise SpecNotFound("no trusted run spec owner: --initial-peers must name the bootstrap as /.../p2p/<peer id>")
    deadline = time.monotonic() + network.connect_timeout
    delay = 0.2
    untrusted: set[str] = set()  # signers of specs that were found but are not trusted, for the error
    while True:
        found = await dht.get(spec_key(run_id), latest=True, return_future=True)
        specs = {}
        if found is not None and isinstance(found.value, dict):
            for subkey, entry in found.value.items():
                owner = owner_peer_id(subkey)
                if owner is None or owner.to_base58() not in owners:
                    logger.debug(f"ignoring a run spec signed by an untrusted peer {owner}")
                    if owner is not None:
                        untrusted.add(owner.to_base58())
                    continue
                try:
                    specs[owner.to_base58()] = spec_from_wire(entry.value)
                except RecordError as e:
                    logger.warning(f"ignoring a malformed run spec record: {e}")
        for owner in owners:
            if owner in specs:
                return specs[owner]
        if time.monotonic() + delay > deadline:
            seen = (f"; a spec signed by {', '.join(sorted(untrusted))} is there: if that is this run's bootstrap, "
                    "pass --spec-owner with its peer id") if untrusted else ""
            raise SpecNotFound(
                f"no run spec for run {run_id!r} signed by {', '.join(owners)} on the DHT after "
                f"{network.connect_timeout:.0f} s: is the bootstrap for this run up?{seen}"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def read_stage_map(dht: hivemind.DHT, spec: RunSpec) -> StageMap:
    """Every valid, unexpired announcement of every body stage, keyed by stage number."""
    futures = [dht.get(stage_key(spec.run_id, s), latest=True, return_future=True)
               for s in range(1, spec.num_stages + 1)]
    results = await asyncio.gather(*futures)
    return {stage: sorted((r for r in owned_records(found, StageAnnouncement.from_wire) if r.stage == stage),
                          key=lambda r: r.peer_id)
            for stage, found in zip(range(1, spec.num_stages + 1), results)}


async def read_trainers(dht: hivemind.DHT, spec: RunSpec) -> list[TrainerAnnouncement]:
    """The trainers announcing cached activations (normally one), most recently announced first. Only trainers the
    run spec authorises count: a record anyone else signed is skipped (protocol/trust.py)."""
    found = await dht.get(trainer_key(spec.run_id), latest=True, return_future=True)
    records = owned_records(found, TrainerAnnouncement.from_wire)
    for record in records:
        if not is_trainer(spec, record.peer_id):
            logger.warning(f"ignoring a trainer record of {record.peer_id}: the run spec does not authorise it")
    return sorted((r for r in records if is_trainer(spec, r.peer_id)), key=lambda t: -t.announced_at)


async def read_progress(dht: hivemind.DHT, spec: RunSpec) -> RunProgress | None:
    """The furthest step any writer says the run reached with a trainer's proof of it (the trainer and the
    bootstrap write it; an unproven claim is skipped, so who wrote it does not matter)."""
    if FAULTS.fire("hide_progress", 0, 0):
        return None
    found = await dht.get(progress_key(spec.run_id), latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return None
    best = None
    for entry in found.value.values():
        try:
            record = RunProgress.from_wire(entry.value)
        except RecordError:
            continue
        if record.step > 0 and step_proven(spec, record.step, record.step_proof) and (
                best is None or record.step > best.step):
            best = record
    return best


def owned_records(found: Any, parse: Callable[[Any], R]) -> list[R]:
    """The unexpired records under a DHT key that parse and that their owner wrote about itself (peer_id matches
    the owner subkey's key: the DHT validator checked this on store and on read, and readers check it again)."""
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    records = []
    for subkey, entry in found.value.items():
        if entry.expiration_time < now:
            continue
        try:
            record = parse(entry.value)
        except RecordError as e:
            logger.debug(f"skipping a malformed record: {e}")
            continue
        owner = owner_peer_id(subkey)
        if owner is None or record.peer_id != owner.to_base58():
            logger.debug(f"skipping a record filed under the wrong key by {owner}")
            continue
        records.append(record)
    return records


def merge_stage_maps(older: StageMap, newer: StageMap, ttl: float) -> StageMap:
    """The union of two reads, the latest announcement per peer, without announcements older than `ttl`.

    While a DHT node is unreachable (a host cut off rather than a process killed) one read can time out on it and
    come back without live peers; a record is only gone when its TTL says so.
    """
    oldest = get_dht_time() - ttl
    merged: StageMap = {}
    for stage in sorted(set(older) | set(newer)):
        latest: dict[str, StageAnnouncement] = {}
        for record in [*older.get(stage, []), *newer.get(stage, [])]:
            known = latest.get(record.peer_id)
            if record.announced_at >= oldest and (known is None or record.announced_at >= known.announced_at):
                latest[record.peer_id] = record
        merged[stage] = sorted(latest.values(), key=lambda r: r.peer_id)
    return merged


def online(peers: list[StageAnnouncement]) -> list[StageAnnouncement]:
    return [p for p in peers if p.state == PeerState.ONLINE]


def swarm_step(stage_map: StageMap, spec: RunSpec) -> int:
    """The step the swarm is at: the highest step an online peer reports with a proof that a trainer of the run
    signed it (protocol/trust.py). An unproven claim is ignored, so no forged record moves a trainer's step."""
    proven = [p.step for peers in stage_map.values() for p in online(peers) if step_proven(spec, p.step, p.step_proof)]
    return max(proven, default=0)

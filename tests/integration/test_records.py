"""Signed DHT records on a live swarm: a rogue node cannot overwrite another peer's announcement or the run spec,
cannot announce as someone else and cannot store a record of the wrong shape; honest readers see none of it."""

from __future__ import annotations

import asyncio

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from cfnode.node.runtime import connect
from cfnode.node.swarm_map import read_spec, read_stage_map
from cfnode.protocol.identity import owner_peer_id
from cfnode.protocol.keys import spec_key, stage_key
from tests.integration.harness import network, wait_until


async def attack(maddr: str, spec) -> dict[str, bool]:
    """What a tampered client without cfnode's validators manages to store; and what honest readers then see."""
    rogue_key = RSAPrivateKey()
    rogue = hivemind.DHT(initial_peers=[maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=True,
                         record_validators=[RSASignatureValidator(rogue_key)], start=True)
    rogue_subkey = RSASignatureValidator(rogue_key).local_public_key
    try:
        expiration = get_dht_time() + 600
        announcements = (await rogue.get(stage_key(spec.run_id, 1), latest=True, return_future=True)).value
        (victim_subkey, victim_entry), = announcements.items()
        victim = dict(victim_entry.value)
        specs = (await rogue.get(spec_key(spec.run_id), latest=True, return_future=True)).value
        (bootstrap_subkey, spec_entry), = specs.items()
        forged_spec = {**spec_entry.value, "lr": 1.0}
        tries = iter(range(100))

        async def store(key, value, subkey) -> bool:
            # Distinct expirations: hivemind's own cache orders a key's subkeys by expiration, then by subkey, and
            # cannot compare str with bytes.
            return await rogue.store(key, value, expiration + next(tries), subkey=subkey,
                                     return_future=True)

        stage_1, stage_2 = stage_key(spec.run_id, 1), stage_key(spec.run_id, 2)
        outcome = {
            "unowned announcement": await store(stage_2, victim, subkey=victim["peer_id"]),
            "overwrite announcement": await store(stage_1, {**victim, "state": "LEAVING"}, subkey=victim_subkey),
            "overwrite spec": await store(spec_key(spec.run_id), forged_spec, subkey=bootstrap_subkey),
            "announce as another peer": await store(stage_2, {**victim, "stage": 2}, subkey=rogue_subkey),
            "wrong shape": await store(stage_2, {"peer_id": 3}, subkey=rogue_subkey),
            "own spec": await store(spec_key(spec.run_id), forged_spec, subkey=rogue_subkey),
        }
    finally:
        await asyncio.get_running_loop().run_in_executor(None, rogue.shutdown)

    async with connect(network(maddr)) as (dht, _p2p, _identity):
        outcome["spec read"] = await read_spec(dht, network(maddr))
        outcome["stage map"] = await read_stage_map(dht, spec)
    outcome["victim"] = victim
    outcome["owner"] = owner_peer_id(victim_subkey).to_base58()
    return outcome


def test_rogue_records_are_refused(swarm):
    maddr = swarm.start_bootstrap()
    swarm.start_peer(1)
    swarm.wait_online({1: 1})
    outcome = asyncio.run(attack(maddr, swarm.spec))

    for refused in ("overwrite announcement", "overwrite spec", "announce as another peer", "wrong shape",
                    "unowned announcement"):
        assert outcome[refused] is False, f"{refused} was stored"
    # A record signed by its own writer is accepted by the DHT, but a run spec counts only from the bootstrap.
    assert outcome["own spec"] is True
    assert outcome["spec read"].trainer_keys  # the bootstrap named the run's trainers in it
    assert outcome["spec read"].replace(trainer_keys=()) == swarm.spec

    assert outcome["owner"] == outcome["victim"]["peer_id"]
    stage_map = outcome["stage map"]
    assert [p.peer_id for p in stage_map[1]] == [outcome["victim"]["peer_id"]]
    assert stage_map[2] == []
    wait_until(lambda: swarm.online_peers(1), 30, "the victim still listed ONLINE")

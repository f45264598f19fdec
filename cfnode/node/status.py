"""`cfnode status`: the stage map as a table or as JSON."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import hivemind
from hivemind.utils import get_dht_time
from hivemind.utils.logging import get_logger

from cfnode.config import NetworkConfig, RunSpec
from cfnode.node.runtime import connect
from cfnode.node.swarm_map import StageMap, read_spec, read_stage_map
from cfnode.protocol.identity import owner_peer_id
from cfnode.protocol.keys import spec_key
from cfnode.protocol.records import PeerState

logger = get_logger(__name__)

SHOWN_ADDRESSES = 3  # entry points `cfnode status` lists: a few, so one gone still leaves others


async def collect_status(network: NetworkConfig) -> dict[str, Any]:
    async with connect(network) as (dht, _p2p, _identity):
        spec = await read_spec(dht, network)
        return await stage_report(dht, spec, await spec_signer(dht, network))


async def watch_status(network: NetworkConfig, interval: float, show: Callable[[dict[str, Any]], None]) -> None:
    """Connect once, then show a fresh report every `interval` seconds until cancelled (Ctrl-C)."""
    async with connect(network) as (dht, _p2p, _identity):
        spec = await read_spec(dht, network)
        owner = await spec_signer(dht, network)
        while True:
            try:
                report = await stage_report(dht, spec, owner)
            except Exception as e:  # a DHT hiccup: say so and try again at the next refresh
                logger.warning(f"could not read the stage map: {type(e).__name__}: {e}")
            else:
                show(report)
            await asyncio.sleep(interval)


async def spec_signer(dht: hivemind.DHT, network: NetworkConfig) -> str | None:
    """Which of `network.spec_owners` signed the run spec read_spec returned: the first of them that has published
    one (as read_spec takes it). A newcomer names it with --spec-owner to join through any live peer."""
    owners = network.spec_owners
    if len(owners) <= 1:  # the usual case (status run against the bootstrap): no second look needed
        return owners[0] if owners else None
    found = await dht.get(spec_key(network.run_id), latest=True, return_future=True)
    subkeys = found.value if found is not None and isinstance(found.value, dict) else {}
    signers = {str(owner) for owner in map(owner_peer_id, subkeys) if owner is not None}
    return next((owner for owner in owners if owner in signers), owners[0])


def entry_addresses(stage_map: StageMap, limit: int = SHOWN_ADDRESSES) -> list[str]:
    """One address each of up to `limit` online peers, taken round-robin over the stages (peers of different stages
    fail independently); a routable address before a loopback one, which serves only this machine."""
    queues = [[p for p in peers if p.state == PeerState.ONLINE and p.maddrs] for _, peers in sorted(stage_map.items())]
    chosen: list[str] = []
    for rank in range(max(map(len, queues), default=0)):
        for queue in queues:
            if rank < len(queue) and len(chosen) < limit:
                routable = [m for m in queue[rank].maddrs if "/127." not in m and "/ip6/::1/" not in m]
                chosen.append((routable or queue[rank].maddrs)[0])
    return chosen


async def stage_report(dht: hivemind.DHT, spec: RunSpec, spec_owner: str | None = None) -> dict[str, Any]:
    """The stage map as plain data; with the spec owner's peer id and a few online peers' addresses, the flags a
    newcomer needs to join through any of them."""
    stage_map = await read_stage_map(dht, spec)
    now = get_dht_time()
    stages = []
    for stage, peers in sorted(stage_map.items()):
        rows = []
        for p in peers:
            row = p.to_wire()
            row["age"] = round(max(0.0, now - p.announced_at), 1)
            rows.append(row)
        stages.append({"stage": stage, "online": sum(p.state == PeerState.ONLINE for p in peers), "peers": rows})
    return {"run_id": spec.run_id, "num_stages": spec.num_stages, "recovery": spec.recovery, "stages": stages,
            "spec_owner": spec_owner, "addresses": entry_addresses(stage_map)}


def join_command(report: dict[str, Any]) -> str | None:
    """A `cfnode join` line that works through the listed peers, or None without an owner or an address."""
    owner, addresses = report.get("spec_owner"), report.get("addresses") or []
    if not owner or not addresses:
        return None
    return "cfnode join " + " ".join(f"--initial-peers {a}" for a in addresses) + f" --spec-owner {owner}"


def render_table(report: dict[str, Any]) -> str:
    header = (f"{'stage':>5}  {'peer':<20} {'state':<8} {'step':>6} {'tok/s':>9} {'grad norm':>10} "
              f"{'source':<10} {'age':>6}")
    lines = [f"run {report['run_id']}: {report['num_stages']} stages, recovery {report['recovery']}", header]
    for stage in report["stages"]:
        if not stage["peers"]:
            lines.append(f"{stage['stage']:>5}  {'(no live peer: stage lost)':<20}")
        for p in stage["peers"]:
            norm = f"{p['grad_norm']:.4f}" if p["grad_norm"] is not None else "-"
            peer = "…" + p["peer_id"][-18:]
            source = p["source"] + (f" <- {', '.join(p['recovered_from'])}" if p["source"] not in ("fresh", "replica")
                                    and p["recovered_from"] else "")
            refit = p.get("refit") or {}
            if "loss_after" in refit:
                source += f", refit {refit['steps']} steps: {refit['loss_before']:.3g} -> {refit['loss_after']:.3g}"
            elif "skipped" in refit:
                source += ", refit skipped"
            lines.append(f"{stage['stage']:>5}  {peer:<20} {p['state']:<8} {p['step']:>6} {p['throughput']:>9.0f} "
                         f"{norm:>10} {source:<10} {p['age']:>5.1f}s")
    if report.get("spec_owner"):
        lines.append(f"\nspec owner (signs the run spec): {report['spec_owner']}")
    command = join_command(report)
    if command is not None:
        lines.append(f"join through any of these: {command}")
    elif report.get("spec_owner"):
        lines.append("no online peer announces an address to join through yet")
    return "\n".join(lines)

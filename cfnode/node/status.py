"""`cfnode status`: the stage map as a table or as JSON."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from hivemind.utils import get_dht_time
from hivemind.utils.logging import get_logger

from cfnode.config import NetworkConfig
from cfnode.node.runtime import connect
from cfnode.node.swarm_map import read_spec, read_stage_map
from cfnode.protocol.records import PeerState

logger = get_logger(__name__)


async def collect_status(network: NetworkConfig) -> dict[str, Any]:
    async with connect(network) as (dht, _p2p, _identity):
        spec = await read_spec(dht, network)
        return await stage_report(dht, spec)


async def watch_status(network: NetworkConfig, interval: float, show: Callable[[dict[str, Any]], None]) -> None:
    """Connect once, then show a fresh report every `interval` seconds until cancelled (Ctrl-C)."""
    async with connect(network) as (dht, _p2p, _identity):
        spec = await read_spec(dht, network)
        while True:
            try:
                report = await stage_report(dht, spec)
            except Exception as e:  # a DHT hiccup: say so and try again at the next refresh
                logger.warning(f"could not read the stage map: {type(e).__name__}: {e}")
            else:
                show(report)
            await asyncio.sleep(interval)


async def stage_report(dht, spec) -> dict[str, Any]:
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
    return {"run_id": spec.run_id, "num_stages": spec.num_stages, "recovery": spec.recovery, "stages": stages}


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
    return "\n".join(lines)

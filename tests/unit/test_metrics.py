"""Metrics and address helpers, offline: no DHT, no daemon (one HTTP server on 127.0.0.1)."""

import asyncio
import math
import socket
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cfnode.node.dht import announce_maddr
from cfnode.node.metrics import PeerMetrics, TrainerMetrics, check, serving
from cfnode.protocol.messages import STALE, ProtocolError
from cfnode.protocol.records import PeerState
from cfnode.protocol.service import RequestRefused


def samples(registry) -> dict:
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trainer_metrics_follow_the_event_log():
    metrics = TrainerMetrics()
    before = samples(metrics.registry)
    assert math.isnan(before[("cfnode_trainer_val_loss", ())])  # nothing measured is not a loss of 0
    metrics.on_event("step", dict(step=5, loss=2.5, tokens=512, tokens_per_s=900.0))
    metrics.on_event("step", dict(step=6, loss=2.25, tokens=512, tokens_per_s=1000.0, val_loss=2.75))
    metrics.on_event("peer_failed", dict(stage=2))
    metrics.on_event("step_mismatch", dict(stage=1, missing=[], doubled=[2]))
    metrics.on_event("stage_lost", dict(stage=2))
    metrics.on_event("stage_recovered", dict(stage=2, source="checkfree", downtime=4.5))
    metrics.on_event("head_copied", dict(step=6))
    got = samples(metrics.registry)
    assert got[("cfnode_trainer_step", ())] == 6
    assert got[("cfnode_trainer_loss", ())] == 2.25
    assert got[("cfnode_trainer_val_loss", ())] == 2.75
    assert got[("cfnode_trainer_tokens_total", ())] == 1024
    assert got[("cfnode_trainer_tokens_per_second", ())] == 1000.0
    assert got[("cfnode_trainer_failures_total", (("kind", "peer_failed"),))] == 1
    assert got[("cfnode_trainer_failures_total", (("kind", "step_mismatch"),))] == 1
    assert got[("cfnode_trainer_failures_total", (("kind", "stage_lost"),))] == 1
    assert got[("cfnode_trainer_recoveries_total", (("source", "checkfree"),))] == 1
    assert got[("cfnode_trainer_last_stage_downtime_seconds", ())] == 4.5


def test_trainer_metrics_time_rpcs_even_when_they_fail():
    metrics = TrainerMetrics()

    async def ok():
        await asyncio.sleep(0.01)
        return 7

    async def fail():
        raise TimeoutError

    async def run():
        assert await metrics.timed("forward", ok()) == 7
        with pytest.raises(TimeoutError):
            await metrics.timed("backward", fail())
        assert await metrics.timed("wait", ok()) == 7  # not an RPC: not recorded

    asyncio.run(run())
    got = samples(metrics.registry)
    assert got[("cfnode_trainer_rpc_seconds_count", (("kind", "forward"),))] == 1
    assert got[("cfnode_trainer_rpc_seconds_sum", (("kind", "forward"),))] >= 0.01
    assert got[("cfnode_trainer_rpc_seconds_count", (("kind", "backward"),))] == 1
    assert not any(labels == (("kind", "wait"),) for _, labels in got)


class FakePeer:
    stage = 2
    current_step = 11
    grad_norm = None
    state = PeerState.JOINING
    load = 0
    throughput = SimpleNamespace(value=123.0)
    max_request_bytes = 99

    async def forward(self, request):
        return "out"

    async def backward(self, request):
        raise RequestRefused(STALE, "peer is at step 11")

    async def apply_step(self, request):
        raise ProtocolError("bad")

    async def describe(self):
        raise RuntimeError("boom")


def test_peer_metrics_count_requests_and_errors_by_code():
    peer = FakePeer()
    metrics = PeerMetrics(peer)
    backend = metrics.instrument(peer)
    assert backend.max_request_bytes == 99  # the service reads the peer's attributes through the wrapper

    async def run():
        assert await backend.forward(None) == "out"
        with pytest.raises(RequestRefused):
            await backend.backward(None)
        with pytest.raises(ProtocolError):
            await backend.apply_step(None)
        with pytest.raises(RuntimeError):
            await backend.describe()

    asyncio.run(run())
    peer.state, peer.grad_norm, peer.current_step = PeerState.ONLINE, 0.5, 12
    got = samples(metrics.registry)
    for kind in ("forward", "backward", "step", "info"):
        assert got[("cfnode_peer_requests_total", (("kind", kind),))] == 1
        assert got[("cfnode_peer_request_seconds_count", (("kind", kind),))] == 1
    assert got[("cfnode_peer_errors_total", (("code", "stale"),))] == 1
    assert got[("cfnode_peer_errors_total", (("code", "bad_request"),))] == 1
    assert got[("cfnode_peer_errors_total", (("code", "internal"),))] == 1
    assert got[("cfnode_peer_errors_total", (("code", "not_ready"),))] == 0
    assert got[("cfnode_peer_step", ())] == 12  # read from the peer when scraped
    assert got[("cfnode_peer_grad_norm", ())] == 0.5
    assert got[("cfnode_peer_stage", ())] == 2
    assert got[("cfnode_peer_state", (("state", "ONLINE"),))] == 1
    assert got[("cfnode_peer_state", (("state", "JOINING"),))] == 0


def test_two_registries_in_one_process_do_not_collide():
    a, b = TrainerMetrics(), TrainerMetrics()
    a.on_event("step", dict(step=1, loss=1.0, tokens=1, tokens_per_s=1.0))
    assert samples(b.registry)[("cfnode_trainer_step", ())] == 0
    PeerMetrics(FakePeer()), PeerMetrics(FakePeer())


def test_serving_and_the_health_probe():
    peer = FakePeer()
    metrics = PeerMetrics(peer)
    port = free_port()
    with serving(metrics.registry, "127.0.0.1", port):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "cfnode_peer_step 11.0" in text
        assert check("127.0.0.1", port) == (False, "stage peer is not ONLINE")
        peer.state = PeerState.ONLINE
        assert check("127.0.0.1", port) == (True, "stage peer is ONLINE")
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            with serving(metrics.registry, "127.0.0.1", port):
                pass
    healthy, reason = check("127.0.0.1", port, timeout=2)
    assert not healthy and "no metrics" in reason  # the server is gone after the block
    with serving(metrics.registry, "127.0.0.1", None):  # no port: nothing is served
        pass


def test_announce_maddr(monkeypatch):
    assert announce_maddr("203.0.113.7", 31337) == "/ip4/203.0.113.7/tcp/31337"
    assert announce_maddr("2001:db8::1", 31337) == "/ip6/2001:db8::1/tcp/31337"

    def resolve(host, port, family, kind):  # no DNS query leaves the test
        if host == "bootstrap":
            return [(family, kind, 6, "", ("172.18.0.5", 0))]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert announce_maddr("bootstrap", 4000) == "/ip4/172.18.0.5/tcp/4000"  # a container's hostname
    with pytest.raises(ValueError, match="fixed --port"):
        announce_maddr("203.0.113.7", 0)
    with pytest.raises(ValueError, match="not 0.0.0.0"):
        announce_maddr("0.0.0.0", 31337)
    with pytest.raises(ValueError, match="does not resolve"):
        announce_maddr("no-such-host.invalid", 31337)

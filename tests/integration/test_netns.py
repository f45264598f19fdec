"""CheckFree across real hosts: every role in its own Linux network namespace, joined by a test bridge.

Each "host" is a network namespace with one veth into a bridge that this test creates (cfnode.bench.netlab). The
bridge has no address and no uplink, and the namespaces have no default route: 10.213.0.0/24 exists only inside
the test, so no packet can leave it. The bootstrap, three stage peers and the trainer run in five
namespaces. After some steps stage 2's link goes down: its peer is still running but unreachable, as a
host that drops off the network would be. A newcomer in a sixth namespace rebuilds stage 2 from stages
1 and 3, and the run completes.

Needs root or CAP_NET_ADMIN (`ip netns add`); skipped otherwise.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from cfnode.bench.load import busy_from_env, busy_loops
from cfnode.bench.netlab import Lab, unavailable
from cfnode.launcher import Child
from tests.integration.harness import TINY_SPEC, read_events, wait_until

SUBNET = "10.213.0"  # /24, only on the test's bridge
BOOTSTRAP_PORT = 31337


@pytest.fixture
def lab(tmp_path):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    lab = None
    try:
        lab = Lab(tmp_path, SUBNET)
        yield lab
    finally:
        if lab is not None:
            lab.close()
            assert not lab.leftovers(), f"left behind: {lab.leftovers()}"


@pytest.fixture
def load():
    """Busy processes beside the swarm, when CFNODE_TEST_BUSY asks for them (make test-load): a loaded machine."""
    with busy_loops(busy_from_env()) as loops:
        yield loops


def steps_of(events):
    return [e for e in events if e["event"] == "step"]


def wait_for_log(lab: Lab, child: Child, pattern: str, timeout: float) -> re.Match:
    def found():
        if child.process.poll() is not None:
            raise AssertionError(f"{child.name} exited with {child.process.returncode}:\n{lab.log(child)[-3000:]}")
        return re.search(pattern, lab.log(child))

    try:
        return wait_until(found, timeout, f"{pattern!r} in {child.name}'s log", interval=0.3)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{lab.logs()}") from None


def test_stage_lost_to_a_dead_link_is_rebuilt_across_hosts(lab, load, tmp_path):
    # The default announcement TTL (10 s): a DHT store that waits out an unreachable node takes ~3 s, so the
    # tiny spec's 4 s TTL would let live peers' announcements lapse once stage 2 is cut off.
    spec = TINY_SPEC.replace(num_stages=3, recovery="checkfree", announce_ttl=10.0)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec.to_dict()))
    boot_host, *peer_hosts, trainer_host, newcomer_host = [lab.add_host() for _ in range(6)]

    maddr_path = tmp_path / "bootstrap.maddr"
    trainer_key = tmp_path / "trainer.key"  # the bootstrap creates it and names it in the run spec
    bootstrap = lab.start(boot_host, "bootstrap", "bootstrap", "--host", boot_host.address,
                          "--port", str(BOOTSTRAP_PORT), "--config", str(spec_path), "--maddr-file", str(maddr_path),
                          "--trainer", str(trainer_key))
    wait_until(lambda: maddr_path.exists() and maddr_path.read_text().strip() or bootstrap.process.poll() is not None,
               90, "the bootstrap's multiaddr")
    assert bootstrap.process.poll() is None, lab.logs()
    maddr = maddr_path.read_text().strip()
    assert maddr.startswith(f"/ip4/{boot_host.address}/tcp/{BOOTSTRAP_PORT}/p2p/"), lab.logs()

    peers = {}
    for stage, host in enumerate(peer_hosts, start=1):
        if stage == 1:
            # Listens on every interface of its namespace and announces the one address others can dial.
            where = ["--host", "0.0.0.0", "--port", "31338", "--announce-host", host.address]
        else:
            where = ["--host", host.address]
        peers[stage] = lab.start(host, f"peer-stage-{stage}", "join", "--initial-peers", maddr,
                                 "--stage", str(stage), *where)
    for stage, peer in peers.items():
        wait_for_log(lab, peer, rf"serving stage {stage} ", 120)

    jsonl = tmp_path / "events.jsonl"
    trainer = lab.start(trainer_host, "trainer", "train", "--initial-peers", maddr, "--identity", str(trainer_key),
                        "--steps", "24",
                        "--host", trainer_host.address, "--client-mode", "--batch-size", "8", "--microbatches", "4",
                        "--eval-every", "0", "--request-timeout", "5", "--ban-seconds", "3",
                        "--log-jsonl", str(jsonl))

    def progress():
        if trainer.process.poll() is not None:
            raise AssertionError(f"the trainer exited early:\n{lab.logs()}")
        return len(steps_of(read_events(jsonl))) >= 12

    wait_until(progress, 300, "12 training steps across the namespaces", interval=0.5)

    # Stage 2's host drops off the network: its process keeps running, but nothing reaches it any more.
    lab.link_down(peer_hosts[1])
    lost_at, cut_at = time.monotonic(), time.time()
    newcomer = lab.start(newcomer_host, "newcomer", "join", "--initial-peers", maddr, "--stage", "auto",
                         "--host", newcomer_host.address)
    try:
        code = trainer.process.wait(360)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the trainer did not finish:\n{lab.logs()}") from None
    assert code == 0, lab.logs()
    assert peers[2].process.poll() is None, "the cut-off peer was meant to stay alive, unreachable"

    log = lab.log(newcomer)
    assert "joining stage 2 of 3" in log, lab.logs()
    match = re.search(r"rebuilt by checkfree from stage 1 \(peer (\S+), .*\) and stage 3 \(peer (\S+), ", log)
    assert match, log

    events = read_events(jsonl)
    assert len(steps_of(events)) == 24
    lost = [e for e in events if e["event"] == "stage_lost"]
    recovered = [e for e in events if e["event"] == "stage_recovered"]
    failed = [e for e in events if e["event"] == "peer_failed"]
    # Only stage 2 was cut off, but other stages may show a brief stage_lost too, so that is not asserted: while
    # the cut-off node is still in the DHT's routing tables, a read of the stage map can time out on it and
    # come back without a live stage.
    assert 2 in [e["stage"] for e in lost], events
    assert 2 in [e["stage"] for e in failed], events
    # The recovery that follows the cut: under load a read of the stage map can time out before it, and the trainer
    # then logs a brief loss and recovery of a stage that was never gone.
    rebuilt = next(e for e in recovered if e["stage"] == 2 and e["time"] >= cut_at)
    assert rebuilt["source"] == "checkfree", rebuilt
    assert 0 < rebuilt["downtime"] < time.monotonic() - lost_at + 1
    assert steps_of(events)[-1]["step"] > rebuilt["step"]

    # `cfnode status` from yet another namespace, listening on its own loopback only (the default --host), as
    # the containers' health checks do: it dials out to the bootstrap and reads the map.
    result = lab.run(trainer_host, "status", "--initial-peers", maddr, "--json", "--connect-timeout", "30")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    stage2 = [p for p in report["stages"][1]["peers"] if p["state"] == "ONLINE"]
    assert [p["source"] for p in stage2] == ["checkfree"]
    assert stage2[0]["recovered_from"] == [f"1:{match.group(1)}", f"3:{match.group(2)}"]


def test_a_limited_link_carries_no_more_than_its_rate_and_counts_every_byte(lab):
    """The benchmarks' slow links (benchmarks/slow_links.py): tc's token bucket holds a host to its rate each way,
    and the link's counters see the bytes sent through it."""
    sender, receiver = lab.add_host(), lab.add_host()
    lab.limit(sender, 16.0)  # 2 MB/s each way
    payload = 4_000_000
    sink = (f"import socket\ns = socket.create_server(({receiver.address!r}, 9999))\nc, _ = s.accept()\nn = 0\n"
            "while (d := c.recv(65536)):\n    n += len(d)\nprint(n)")
    source = f"import socket\ns = socket.create_connection(({receiver.address!r}, 9999))\ns.sendall(bytes({payload}))"
    server = lab.start(receiver, "sink", argv=[sys.executable, "-c", sink])
    wait_until(lambda: "9999" in lab.run_raw(receiver, "ss", "-ltn").stdout, 30, "the sink to listen")
    sent_before, _ = lab.link_bytes(sender)
    started = time.monotonic()
    send = lab.run_raw(sender, sys.executable, "-c", source)
    assert send.returncode == 0, send.stderr
    assert server.process.wait(30) == 0
    elapsed = time.monotonic() - started
    assert lab.log(server).strip() == str(payload)
    sent = lab.link_bytes(sender)[0] - sent_before
    assert payload <= sent < payload * 1.1  # the payload, and TCP/IP headers
    assert elapsed > 0.8 * payload / 2e6, elapsed  # 4 MB through a 2 MB/s link: about 2 s, not milliseconds
    lab.limit(sender, None)

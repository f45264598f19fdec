"""CheckFree across real hosts: every role in its own Linux network namespace, joined by a test bridge.

Each "host" is a network namespace with one veth into a bridge that this test creates. The bridge has
no address and no uplink, and the namespaces have no default route: 10.213.0.0/24 exists only inside
the test, so no packet can leave it. The bootstrap, three stage peers and the trainer run in five
namespaces. After some steps stage 2's link goes down: its peer is still running but unreachable, as a
host that drops off the network would be. A newcomer in a sixth namespace rebuilds stage 2 from stages
1 and 3, and the run completes.

Needs root or CAP_NET_ADMIN (`ip netns add`); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cfnode.bench.load import busy_from_env, busy_loops
from cfnode.launcher import Child, stop_all
from tests.integration.harness import TINY_SPEC, read_events, wait_until

SUBNET = "10.213.0"  # /24, only on the test's bridge
BOOTSTRAP_PORT = 31337


@dataclass
class Host:
    namespace: str
    inside: str  # the veth end in the namespace
    outside: str  # the veth end on the bridge
    address: str


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_unavailable() -> str | None:
    """Why this machine cannot run the test, or None."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"cfnode-probe-{os.getpid()}"
    added = ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"`ip netns add` is not permitted here (needs root or CAP_NET_ADMIN): {added.stderr.strip()}"
    try:
        veth = ip("link", "add", f"cfp{os.getpid() % 100000}a", "type", "veth", "peer", "name",
                  f"cfp{os.getpid() % 100000}b", "netns", probe, check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair here: {veth.stderr.strip()}"
        ip("link", "del", f"cfp{os.getpid() % 100000}a", check=False)
    finally:
        ip("netns", "del", probe, check=False)
    return None


class Lab:
    """Namespaces on one bridge, and the cfnode processes running in them; close() removes all of it."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.tag = f"{os.getpid() % 100000:05d}"
        self.bridge = f"cfb{self.tag}"
        self.hosts: list[Host] = []
        self.children: list[Child] = []
        ip("link", "add", self.bridge, "type", "bridge")
        ip("link", "set", self.bridge, "up")

    def add_host(self) -> Host:
        index = len(self.hosts)
        host = Host(namespace=f"cfnode-{self.tag}-{index}", inside=f"cfn{self.tag}{index}",
                    outside=f"cfh{self.tag}{index}", address=f"{SUBNET}.{10 + index}")
        self.hosts.append(host)
        ip("netns", "add", host.namespace)
        ip("link", "add", host.outside, "type", "veth", "peer", "name", host.inside, "netns", host.namespace)
        ip("link", "set", host.outside, "master", self.bridge, "up")
        ns = ("-n", host.namespace)
        ip(*ns, "link", "set", "lo", "up")
        ip(*ns, "addr", "add", f"{host.address}/24", "dev", host.inside)
        ip(*ns, "link", "set", host.inside, "up")
        routes = ip(*ns, "route", "show").stdout
        assert "default" not in routes, routes
        return host

    def start(self, host: Host, name: str, *args: str) -> Child:
        """`python -m cfnode ARGS` inside the host's namespace, in a process group of its own."""
        log_path = self.workdir / f"{len(self.children):02d}-{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", host.namespace, sys.executable, "-m", "cfnode", *args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def run(self, host: Host, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", host.namespace, sys.executable, "-m", "cfnode", *args],
                              capture_output=True, text=True, timeout=timeout)

    def link_down(self, host: Host) -> None:
        ip("-n", host.namespace, "link", "set", host.inside, "down")

    @staticmethod
    def log(child: Child) -> str:
        return child.log_path.read_text(errors="replace") if child.log_path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ---\n{self.log(c)[-3000:]}" for c in self.children)

    def close(self) -> None:
        stop_all(self.children, grace=3.0)
        for host in self.hosts:
            # Anything still running in a namespace of this test (only processes it started) goes too.
            pids = ip("netns", "pids", host.namespace, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for host in self.hosts:
            ip("netns", "del", host.namespace, check=False)
            ip("link", "del", host.outside, check=False)
        ip("link", "del", self.bridge, check=False)


@pytest.fixture
def lab(tmp_path):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    lab = None
    try:
        lab = Lab(tmp_path)
        yield lab
    finally:
        if lab is not None:
            lab.close()
            leftovers = [h.namespace for h in lab.hosts if h.namespace in ip("netns", "list").stdout]
            assert not leftovers, f"namespaces left behind: {leftovers}"
            assert lab.bridge not in ip("link", "show").stdout


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

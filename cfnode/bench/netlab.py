"""Hosts on a private network inside this machine: Linux network namespaces on one bridge, each link optionally
limited to a rate with `tc` (token bucket, tbf), and the processes run in them.

Each "host" is a network namespace with one veth into a bridge the lab creates. The bridge has no address and no
uplink, and the namespaces have no default route: the lab's subnet exists only inside it, so no packet can leave.
A host's link limit applies to both directions: the namespace end's egress is its upload, the bridge end's egress
its download. This kernel has no `netem`, so links add no latency of their own.

Needs root or CAP_NET_ADMIN (`ip netns add`); `unavailable()` says why not where it cannot run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cfnode.launcher import Child, stop_all


@dataclass
class Host:
    namespace: str
    inside: str  # the veth end in the namespace
    outside: str  # the veth end on the bridge
    address: str


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("ip", *args, check=check)


def tc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("tc", *args, check=check)


def _run(*command: str, check: bool) -> subprocess.CompletedProcess:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result


def unavailable(rate_limits: bool = False) -> str | None:
    """Why this machine cannot host a lab (with `rate_limits`, one whose links are limited), or None."""
    for tool in ("ip", "tc") if rate_limits else ("ip",):
        if shutil.which(tool) is None:
            return f"the `{tool}` command (iproute2) is not installed"
    tag = os.getpid() % 100000
    probe = f"cfnode-probe-{tag}"
    added = ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"`ip netns add` is not permitted here (needs root or CAP_NET_ADMIN): {added.stderr.strip()}"
    try:
        veth = ip("link", "add", f"cfp{tag}a", "type", "veth", "peer", "name", f"cfp{tag}b", "netns", probe,
                  check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair here: {veth.stderr.strip()}"
        if rate_limits:
            limited = tc("qdisc", "add", "dev", f"cfp{tag}a", "root", *tbf_args(10.0), check=False)
            if limited.returncode != 0:
                return f"cannot limit a link with tc tbf here: {limited.stderr.strip()}"
        ip("link", "del", f"cfp{tag}a", check=False)
    finally:
        ip("netns", "del", probe, check=False)
    return None


def tbf_args(mbit: float) -> list[str]:
    """A token bucket of `mbit` Mbit/s: a burst of 10 ms of traffic (at least 32 KiB, so a full-size packet always
    fits) and up to 200 ms of queue before drops."""
    rate_bytes = mbit * 1e6 / 8
    burst = max(32 * 1024, int(rate_bytes * 0.01))
    return ["tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "200ms"]


class Lab:
    """Namespaces on one bridge, and the processes running in them; close() removes all of it."""

    def __init__(self, workdir: Path, subnet: str = "10.213.0"):
        self.workdir = workdir
        self.subnet = subnet  # a /24, only on the lab's bridge
        self.tag = f"{os.getpid() % 100000:05d}"
        self.bridge = f"cfb{self.tag}"
        self.hosts: list[Host] = []
        self.children: list[Child] = []
        ip("link", "add", self.bridge, "type", "bridge")
        ip("link", "set", self.bridge, "up")

    def add_host(self) -> Host:
        index = len(self.hosts)
        host = Host(namespace=f"cfnode-{self.tag}-{index}", inside=f"cfn{self.tag}{index}",
                    outside=f"cfh{self.tag}{index}", address=f"{self.subnet}.{10 + index}")
        self.hosts.append(host)
        ip("netns", "add", host.namespace)
        ip("link", "add", host.outside, "type", "veth", "peer", "name", host.inside, "netns", host.namespace)
        ip("link", "set", host.outside, "master", self.bridge, "up")
        ns = ("-n", host.namespace)
        ip(*ns, "link", "set", "lo", "up")
        ip(*ns, "addr", "add", f"{host.address}/24", "dev", host.inside)
        ip(*ns, "link", "set", host.inside, "up")
        routes = ip(*ns, "route", "show").stdout
        if "default" in routes:
            raise RuntimeError(f"namespace {host.namespace} has a default route: {routes}")
        return host

    def limit(self, host: Host, mbit: float | None) -> None:
        """Limit the host's link to `mbit` Mbit/s each way (None: no limit)."""
        for args in (("-n", host.namespace, "qdisc"), ("qdisc",)):
            device = host.inside if args[0] == "-n" else host.outside
            tc(*args, "del", "dev", device, "root", check=False)
            if mbit is not None:
                tc(*args, "add", "dev", device, "root", *tbf_args(mbit))

    @staticmethod
    def link_bytes(host: Host) -> tuple[int, int]:
        """Bytes the host has sent and received on its link so far (the bridge end's counters, read from here)."""
        stats = Path("/sys/class/net") / host.outside / "statistics"
        # The bridge end receives what the host sends.
        return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())

    def command(self, host: Host, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", host.namespace, *argv]

    def start(self, host: Host, name: str, *args: str, argv: list[str] | None = None,
              env: dict[str, str] | None = None) -> Child:
        """`python -m cfnode ARGS` (or `argv`) inside the host's namespace, in a process group of its own."""
        log_path = self.workdir / f"{len(self.children):02d}-{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                self.command(host, *(argv or [sys.executable, "-m", "cfnode", *args])),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def run(self, host: Host, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`python -m cfnode ARGS` inside the host's namespace, to its end."""
        return self.run_raw(host, sys.executable, "-m", "cfnode", *args, timeout=timeout)

    def run_raw(self, host: Host, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, *argv), capture_output=True, text=True, timeout=timeout)

    def link_down(self, host: Host) -> None:
        ip("-n", host.namespace, "link", "set", host.inside, "down")

    @staticmethod
    def log(child: Child) -> str:
        return child.log_path.read_text(errors="replace") if child.log_path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ---\n{self.log(c)[-3000:]}" for c in self.children)

    def stop_processes(self) -> None:
        """Stop every process the lab started, and anything else still running in its namespaces."""
        stop_all(self.children, grace=3.0)
        for host in self.hosts:
            for pid in ip("netns", "pids", host.namespace, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        self.children = []

    def close(self) -> None:
        self.stop_processes()
        for host in self.hosts:
            ip("netns", "del", host.namespace, check=False)
            ip("link", "del", host.outside, check=False)
        ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces or links of this lab that are still there (after close: none)."""
        namespaces = ip("netns", "list", check=False).stdout
        links = ip("link", "show", check=False).stdout
        return [h.namespace for h in self.hosts if h.namespace in namespaces] + (
            [self.bridge] if self.bridge in links else [])

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

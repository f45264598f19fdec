"""Starting a hivemind DHT for a cfnode process, with clear errors and no orphans."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import hivemind
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.logging import get_logger

logger = get_logger(__name__)


class DHTStartError(RuntimeError):
    """The DHT could not start or could not reach its initial peers."""


class _OwnedDHT(hivemind.DHT):
    """A DHT whose child process (and its p2p daemon) dies when the process that started it dies.

    hivemind runs the DHT in a child process that starts a p2pd daemon. If the parent is SIGKILLed, both
    would linger as orphans; a watchdog thread in the child notices the re-parenting and takes them down.
    """

    def run(self) -> None:
        # The fork inherited the parent's asyncio signal handling (a wakeup fd into the parent's loop): undo it,
        # so SIGTERM stops this process instead of poking the parent.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        parent = os.getppid()

        def watch_parent() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            _kill_children()
            os._exit(1)

        threading.Thread(target=watch_parent, name="cfnode-parent-watch", daemon=True).start()
        super().run()


def _kill_children() -> None:
    for children_file in Path("/proc/self/task").glob("*/children"):
        try:
            pids = children_file.read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def announce_maddr(host: str, port: int) -> str:
    """The multiaddr other peers should dial for `--announce-host HOST` and `--port PORT`.

    HOST is an IP address or a name that resolves on this machine (a container's hostname does, to the
    container's address); a name is resolved once, here, because peers elsewhere may not resolve it.
    """
    if not 0 < port <= 65535:
        raise ValueError("--announce-host needs a fixed --port: other peers dial HOST at that port, and with "
                         "--port 0 it is not known in advance")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            raise ValueError(f"--announce-host {host!r} does not resolve: {e.strerror or e}") from None
        address = ipaddress.ip_address(infos[0][4][0])
    if address.is_unspecified:
        raise ValueError(f"--announce-host must be an address other peers can dial, not {host}")
    return f"/ip{address.version}/{address}/tcp/{port}"


def start_dht(
    initial_peers: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    identity_path: str | None = None,
    client_mode: bool = False,
    announce_maddrs: Sequence[str] = (),
    timeout: float = 30.0,
    record_validators: Sequence[RecordValidatorBase] = (),
    check_identity_free: bool = True,
) -> hivemind.DHT:
    """Start a DHT and join the swarm through `initial_peers`; raise DHTStartError within `timeout`.

    `check_identity_free=False` skips hivemind's probe for another peer using the same identity (a second daemon
    started and stopped), which a freshly generated identity does not need."""
    kwargs: dict = dict(
        host_maddrs=[f"/ip4/{host}/tcp/{port}"] if ":" not in host else [f"/ip6/{host}/tcp/{port}"],
        client_mode=client_mode,
        startup_timeout=timeout,
        record_validators=list(record_validators),
    )
    if identity_path is not None:
        kwargs["identity_path"] = str(identity_path)
        kwargs["check_if_identity_free"] = check_identity_free
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    for maddr in initial_peers:
        if "/p2p/" not in maddr:
            raise DHTStartError(f"initial peer {maddr!r} must be a full multiaddr ending in /p2p/<peer id>")
    dht = _OwnedDHT(initial_peers=list(initial_peers) or None, start=False, **kwargs)
    try:
        dht.run_in_background(await_ready=True, timeout=timeout)
    except TimeoutError:
        _terminate(dht)
        raise DHTStartError(f"no answer from initial peers {', '.join(initial_peers)} within {timeout:.0f} s") from None
    except P2PDaemonError as e:
        _terminate(dht)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if initial_peers and "bootstrap" in reason:
            raise DHTStartError(f"cannot reach initial peers {', '.join(initial_peers)}: {reason}") from None
        raise DHTStartError(f"cannot start the p2p daemon: {reason}") from None
    except Exception as e:
        _terminate(dht)
        raise DHTStartError(f"cannot start the DHT: {type(e).__name__}: {e}") from None
    return dht


def _terminate(dht: hivemind.DHT) -> None:
    if dht.is_alive():
        dht.terminate()
        dht.join(5)

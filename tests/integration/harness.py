"""Real processes on 127.0.0.1 for integration tests: a bootstrap, stage peers, trainers, status calls."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from hivemind.p2p import P2P

from cfnode.config import NetworkConfig, RunSpec
from cfnode.launcher import Child, kill_group, spawn, stop_all, wait_for_maddr
from cfnode.node.runtime import connect
from cfnode.node.status import stage_report

T = TypeVar("T")

# Small enough that a step takes a fraction of a second on two cores, large enough that the loss visibly falls.
# A short refit keeps rebuilds quick; tests/integration/test_refit.py sets its own.
TINY_SPEC = RunSpec(num_stages=3, layers_per_stage=1, hidden_size=64, num_heads=4, seq_len=64, lr=3e-3,
                    announce_ttl=4.0, refit_steps=20)


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `condition` until it returns something truthy; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Swarm:
    """Processes of one test; every one is killed with its process group at teardown."""

    def __init__(self, workdir: Path, spec: RunSpec = TINY_SPEC):
        self.workdir = workdir
        self.spec = spec
        self.children: list[Child] = []
        self.maddr = ""
        self._count = 0
        self._observer: LoopThread | None = None

    @property
    def trainer_identity(self) -> Path:
        return self.workdir / "trainer.key"

    @property
    def client_identity(self) -> Path:
        return self.workdir / "client.key"

    def _name(self, role: str) -> str:
        self._count += 1
        return f"{self._count:02d}-{role}"

    def start_bootstrap(self, *extra: str) -> str:
        spec_path = self.workdir / "spec.json"
        spec_path.write_text(json.dumps(self.spec.to_dict()))
        maddr_path = self.workdir / "bootstrap.maddr"
        name = self._name("bootstrap")
        # Two trainers are authorised: trainer processes use one identity, test code driving RPCs the other.
        child = spawn(name, ["bootstrap", "--config", str(spec_path), "--maddr-file", str(maddr_path),
                             "--trainer", str(self.trainer_identity), "--trainer", str(self.client_identity), *extra],
                      self.workdir / f"{name}.log")
        self.children.append(child)
        self.maddr = wait_for_maddr(maddr_path, child, timeout=60)
        _CLIENT_IDENTITIES[self.maddr] = self.client_identity
        return self.maddr

    def start_peer(self, stage: int | str, *extra: str, env: dict[str, str] | None = None) -> Child:
        """A stage peer; `env` may arm fault points in it (CFNODE_FAULTS, cfnode/faults.py)."""
        name = self._name(f"peer-stage-{stage}")
        child = spawn(name, ["join", "--initial-peers", self.maddr, "--stage", str(stage), *extra],
                      self.workdir / f"{name}.log", env=env)
        self.children.append(child)
        return child

    def start_trainer(self, steps: int, *extra: str, jsonl: Path | None = None) -> tuple[Child, Path]:
        name = self._name("trainer")
        jsonl = jsonl or self.workdir / f"{name}.jsonl"
        child = spawn(name, ["train", "--initial-peers", self.maddr, "--identity", str(self.trainer_identity),
                             "--steps", str(steps), "--batch-size", "8",
                             "--microbatches", "4", "--eval-every", "0", "--log-jsonl", str(jsonl),
                             "--request-timeout", "10", "--ban-seconds", "3", *extra],
                      self.workdir / f"{name}.log")
        self.children.append(child)
        return child, jsonl

    def start_training(self, steps: int, wait_steps: int = 0) -> tuple[dict[int, Child], Child, Path]:
        """A bootstrap, one peer per stage and a trainer for `steps` steps; returns once it has done `wait_steps`.
        Returns (peers by stage, trainer, events) with the trainer still running."""
        self.start_bootstrap()
        stages = range(1, self.spec.num_stages + 1)
        peers = {s: self.start_peer(s) for s in stages}
        self.wait_online({s: 1 for s in stages})
        trainer, jsonl = self.start_trainer(steps)
        wait_until(lambda: sum(e["event"] == "step" for e in read_events(jsonl)) >= wait_steps, 180,
                   f"{wait_steps} training steps")
        return peers, trainer, jsonl

    def train_then_kill(self, stage: int, steps: int, kill_after: int) -> tuple[Child, Path]:
        """`start_training`, then after `kill_after` steps SIGKILL `stage`'s peer. Returns (trainer, events) with
        the trainer still running."""
        peers, trainer, jsonl = self.start_training(steps, kill_after)
        self.kill(peers[stage])
        return trainer, jsonl

    def train_and_lose_stage(self, stage: int, steps: int, lose_after: int) -> tuple[Child, Child, Path]:
        """`train_then_kill`, then a newcomer with --stage auto; wait for the trainer to finish. Returns (trainer,
        newcomer, events)."""
        trainer, jsonl = self.train_then_kill(stage, steps, lose_after)
        newcomer = self.start_peer("auto")
        assert trainer.process.wait(300) == 0, self.log(trainer)
        return trainer, newcomer, jsonl

    def status(self) -> dict[str, Any]:
        """What `cfnode status --json` reports, read over one DHT connection that the test keeps (a status process
        per call would spend seconds starting; tests/integration/test_cli.py runs the command itself)."""
        if self._observer is None:
            self._observer = LoopThread(self.maddr)
        observer = self._observer
        return observer.run(stage_report(observer.dht, self.spec))

    def online_peers(self, stage: int) -> list[dict[str, Any]]:
        stages = {s["stage"]: s for s in self.status()["stages"]}
        return [p for p in stages[stage]["peers"] if p["state"] == "ONLINE"]

    def wait_online(self, counts: dict[int, int], timeout: float = 90) -> None:
        wait_until(lambda: all(len(self.online_peers(s)) >= n for s, n in counts.items()), timeout,
                   f"online peers per stage {counts}")

    def kill(self, child: Child) -> None:
        kill_group(child, signal.SIGKILL)
        child.process.wait(10)

    def log(self, child: Child) -> str:
        return child.log_path.read_text(errors="replace") if child.log_path.exists() else ""

    def close(self) -> None:
        if self._observer is not None:
            self._observer.close()
        # Teardown: no clean leaves (every peer would wait for a hand-over that cannot come), just stop.
        stop_all(self.children, grace=0.5)


class LoopThread:
    """An event loop in a thread holding one DHT and p2p connection, for synchronous test code (status reads,
    hypothesis examples) to run coroutines on."""

    def __init__(self, maddr: str, identity: Path | None = None):
        self.identity = identity
        self.loop = asyncio.new_event_loop()
        self.ready: Future = Future()
        self._stop = asyncio.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(maddr),), daemon=True)
        self.thread.start()
        self.p2p: P2P = self.ready.result(timeout=60)

    async def _main(self, maddr: str) -> None:
        try:
            async with connect(network(maddr, self.identity)) as (dht, p2p, _identity):
                self.dht = dht
                self.ready.set_result(p2p)
                await self._stop.wait()
        except BaseException as e:
            if not self.ready.done():
                self.ready.set_exception(e)

    def run(self, coroutine, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


def run_async(coro_fn: Callable[..., Any], *args: Any) -> Any:
    return asyncio.run(coro_fn(*args))


_CLIENT_IDENTITIES: dict[str, Path] = {}  # bootstrap address -> the identity its run authorises for test code


def client_identity(maddr: str) -> Path:
    """The identity under which test code makes training calls itself (backward, step) in the run at `maddr`: a
    trainer the run authorises. Use it for one connection at a time (two daemons must not share a peer id)."""
    return _CLIENT_IDENTITIES[maddr]


def network(maddr: str, identity: Path | None = None) -> NetworkConfig:
    return NetworkConfig(initial_peers=(maddr,), client_mode=True, connect_timeout=30,
                         identity_path=str(identity) if identity else None)

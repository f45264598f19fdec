"""A chaos run: a local swarm trains while stage peers and the bootstrap are SIGKILLed at random times and newcomers
keep joining. Only the trainer, which holds the data, is spared.

The bootstrap comes back the way a supervisor would bring it back: same identity file, same port, so the address
every process knows stays valid; the run spec it signed is still on the other DHT nodes meanwhile. Newcomers are
given the bootstrap's address and two live peers', with the bootstrap's peer id to trust the spec from, so they can
join while it is down; one that fails to connect anyway is started again, as a volunteer's restart loop would.
`busy` runs the whole swarm beside processes that keep cores busy: a loaded machine.

`ChaosResult.summary` counts what happened: the chaos's kills and newcomers, and from the trainer's events the lost
and recovered stages (each stage_lost matched by a stage_recovered; transient ones, which a peer known before the
loss ended), replayed microbatches, refused and restarted stage steps, step mismatches (must be 0), the ledger checks
its train_finished event reports and the longest stall between two steps; from the newcomers' logs, islands
(newcomers serving step 0 of the trained run) and fresh restarts of a trained stage (both must be 0).

`run_chaos` is shared by `benchmarks/chaos.py` (a long run beside a failure-free one) and the test suite (short).
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemind.utils.logging import get_logger

from cfnode.bench.load import busy_loops
from cfnode.config import RunSpec
from cfnode.launcher import Child, group_alive, kill_group, spawn, stop_all, wait_for_maddr
from cfnode.node.events import EventFollower

logger = get_logger(__name__)

REACHABLE = re.compile(r"reachable at (/\S+/p2p/\S+)")
SERVING = re.compile(r"serving stage (?P<stage>\d+) \(source: (?P<source>[\w+]+).*?\) at step (?P<step>\d+)")


@dataclass(frozen=True)
class ChaosConfig:
    spec: RunSpec
    workdir: Path
    steps: int = 60
    replicas: int = 1  # peers per stage at the start
    batch_size: int = 8
    microbatches: int = 4
    data_path: str | None = None
    seed: int = 0
    chaos: bool = True  # False: the failure-free baseline, same everything else
    kill_interval: tuple[float, float] = (4.0, 10.0)  # seconds between kills, drawn uniformly
    bootstrap_share: float = 0.2  # chance that a kill hits the bootstrap (the first kill always does, if > 0)
    join_delay: tuple[float, float] = (0.5, 4.0)  # a killed peer's replacement starts after this long
    extra_join_every: float = 15.0  # an extra newcomer (--stage auto) joins this often (0: never)
    max_peers: int = 8  # extra newcomers stop once this many stage peers run
    bootstrap_downtime: tuple[float, float] = (1.0, 4.0)
    timeout: float = 1800.0
    busy: int = 0  # processes that keep a core busy for the whole run (bench/load.py): a loaded machine


@dataclass
class ChaosResult:
    exit_code: int
    steps: list[dict[str, Any]]
    events: list[dict[str, Any]]
    actions: list[dict[str, Any]] = field(default_factory=list)  # what the chaos did, with times
    wall_seconds: float = 0.0
    leftover_groups: list[int] = field(default_factory=list)  # process groups still alive after the stop
    newcomers_served: list[dict[str, Any]] = field(default_factory=list)  # each newcomer's source and first step

    @property
    def final_loss(self) -> float:
        return self.steps[-1]["loss"] if self.steps else float("nan")

    @property
    def final_val_loss(self) -> float | None:
        vals = [s["val_loss"] for s in self.steps if "val_loss" in s]
        return vals[-1] if vals else None

    def unmatched_losses(self) -> list[dict[str, Any]]:
        """stage_lost events with no stage_recovered for that stage after them."""
        open_losses: dict[int, list[dict[str, Any]]] = {}
        for event in self.events:
            if event["event"] == "stage_lost":
                open_losses.setdefault(event["stage"], []).append(event)
            elif event["event"] == "stage_recovered" and open_losses.get(event["stage"]):
                open_losses[event["stage"]].pop(0)
        return [e for losses in open_losses.values() for e in losses]

    def event_count(self, name: str) -> int:
        return sum(e["event"] == name for e in self.events)

    @property
    def ledger_checks(self) -> int:
        """Stage steps whose summed microbatches the trainer checked and found exact, from its train_finished
        events (one per trainer run; a run that did not finish reports none)."""
        return sum(e.get("ledger_checks", 0) for e in self.events if e["event"] == "train_finished")

    @property
    def step_mismatches(self) -> int:
        """Stage steps that summed a microbatch twice or missed one: the step_mismatch events, or the count a
        train_finished reports if that is higher. Must be 0."""
        reported = sum(e.get("step_mismatches", 0) for e in self.events if e["event"] == "train_finished")
        return max(self.event_count("step_mismatch"), reported)

    @property
    def islands(self) -> list[dict[str, Any]]:
        """Newcomers that served step 0 although the run had trained (every newcomer joins after the first step):
        a swarm of their own, which the trainer never sees."""
        return [n for n in self.newcomers_served if n["step"] == 0]

    @property
    def fresh_restarts(self) -> list[dict[str, Any]]:
        """Newcomers that started a stage of the trained run from fresh weights."""
        return [n for n in self.newcomers_served if n["source"] == "fresh"]

    @property
    def longest_stall(self) -> float:
        """The longest time between two consecutive steps, in seconds."""
        times = [s["time"] for s in self.steps if "time" in s]
        return round(max((b - a for a, b in zip(times, times[1:])), default=0.0), 2)

    def transient_losses(self) -> list[dict[str, Any]]:
        """stage_lost events that a peer known before the loss ended: the stage was live, only slow or briefly
        banned; a real loss is ended by a newcomer."""
        known: set[str] = set()
        lost_at: dict[int, int] = {}
        transient = []
        for index, event in enumerate(self.events):
            if event["event"] == "stage_lost":
                lost_at.setdefault(event["stage"], index)
            elif event["event"] == "stage_recovered":
                start = lost_at.pop(event["stage"], None)
                if start is not None and event.get("peer") in known:
                    transient.append(self.events[start])
            if event.get("peer"):
                known.add(event["peer"])
        return transient

    def summary(self) -> dict[str, Any]:
        counts = Counter(a["action"] for a in self.actions)
        recovered = [e for e in self.events if e["event"] == "stage_recovered"]
        downtimes = [e["downtime"] for e in recovered]
        lost = self.event_count("stage_lost")
        unmatched = len(self.unmatched_losses())
        return {
            "exit_code": self.exit_code, "steps": len(self.steps), "wall_seconds": round(self.wall_seconds, 1),
            "final_loss": self.final_loss, "final_val_loss": self.final_val_loss,
            "peers_killed": counts["kill_peer"], "bootstrap_kills": counts["kill_bootstrap"],
            "newcomers": counts["join"], "failed_joins": counts["join_failed"],
            "stage_lost": lost, "transient_stage_lost": len(self.transient_losses()),
            "stage_recovered": len(recovered),
            "losses_matched": lost - unmatched, "unmatched_losses": unmatched,
            "recovery_sources": dict(Counter(e["source"] for e in recovered)),
            "mean_downtime": round(sum(downtimes) / len(downtimes), 2) if downtimes else None,
            "peer_failures": self.event_count("peer_failed"),
            "microbatches_replayed": self.event_count("microbatch_replayed"),
            "replicas_left_out": self.event_count("replica_left_out"),
            "ledger_refused": self.event_count("ledger_refused"),
            "stage_steps_restarted": self.event_count("stage_step_restarted"),
            "step_mismatches": self.step_mismatches,
            "ledger_checks": self.ledger_checks,
            "islands": len(self.islands), "fresh_restarts": len(self.fresh_restarts),
            "longest_stall_s": self.longest_stall,
            "leftover_process_groups": len(self.leftover_groups),
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChaosSwarm:
    def __init__(self, config: ChaosConfig):
        self.config = config
        self.workdir = config.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(config.seed)
        self.children: list[Child] = []
        self.peers: list[Child] = []
        self.bootstrap: Child | None = None
        self.port = free_port()
        self.maddr = ""
        self.actions: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._pending_joins: list[float] = []  # monotonic times at which a newcomer is due
        self._joining: list[Child] = []  # newcomers not yet known to have connected
        self._stop = threading.Event()

    def _act(self, action: str, **fields: Any) -> None:
        record = {"action": action, "t": round(time.monotonic() - self.started, 2), **fields}
        self.actions.append(record)
        logger.info(f"chaos: {action} {json.dumps(fields) if fields else ''}")

    def _spawn(self, name: str, args: list[str]) -> Child:
        child = spawn(name, args, self.workdir / f"{name}.log")
        self.children.append(child)
        return child

    def start_bootstrap(self) -> None:
        spec_path = self.workdir / "spec.json"
        spec_path.write_text(json.dumps(self.config.spec.to_dict(), indent=2))
        maddr_path = self.workdir / "bootstrap.maddr"
        maddr_path.unlink(missing_ok=True)
        name = f"bootstrap-{sum(c.name.startswith('bootstrap') for c in self.children)}"
        self.bootstrap = self._spawn(name, [
            "bootstrap", "--config", str(spec_path), "--maddr-file", str(maddr_path), "--port", str(self.port),
            "--identity", str(self.workdir / "bootstrap.key"), "--trainer", str(self.workdir / "trainer.key"),
            "--run-id", self.config.spec.run_id])
        self.maddr = wait_for_maddr(maddr_path, self.bootstrap, timeout=60)

    def start_peer(self, stage: int | str) -> Child:
        # As a volunteer would be told: the bootstrap and a few peers' addresses, and the bootstrap's peer id to
        # trust the run spec from, so a newcomer joins while the bootstrap is down.
        entry = [self.maddr, *self.rng.sample(self.peer_addresses(), min(2, len(self.peer_addresses())))]
        owner = self.maddr.rsplit("/p2p/", 1)[1]
        child = self._spawn(f"peer-{len(self.peers)}-stage-{stage}", [
            "join", *(arg for maddr in entry for arg in ("--initial-peers", maddr)), "--spec-owner", owner,
            "--stage", str(stage), "--run-id", self.config.spec.run_id,
            "--connect-timeout", "10", "--leave-timeout", "0"])  # kills are SIGKILLs; the final stop is for all
        self.peers.append(child)
        return child

    def live_peers(self) -> list[Child]:
        return [c for c in self.peers if c.process.poll() is None]

    def peer_addresses(self) -> list[str]:
        """An address of each live peer that has logged one (`reachable at ...`)."""
        found = []
        for child in self.live_peers():
            match = REACHABLE.search(child.log_path.read_text(errors="replace")) if child.log_path.exists() else None
            if match:
                found.append(match[1])
        return found

    def can_join(self) -> bool:
        return self.bootstrap_up() or (bool(self.maddr) and bool(self.peer_addresses()))

    def run(self) -> ChaosResult:
        config = self.config
        events_path = self.workdir / "events.jsonl"
        stop = self._stop
        try:
            self.start_bootstrap()
            for stage in range(1, config.spec.num_stages + 1):
                for _ in range(config.replicas):
                    self.start_peer(stage)
            args = ["train", "--initial-peers", self.maddr, "--identity", str(self.workdir / "trainer.key"),
                    "--steps", str(config.steps),
                    "--batch-size", str(config.batch_size), "--microbatches", str(config.microbatches),
                    "--run-id", config.spec.run_id, "--log-jsonl", str(events_path), "--seed", str(config.seed),
                    "--request-timeout", "10", "--ban-seconds", "3", "--eval-every", "10"]
            if config.data_path:
                args += ["--data", config.data_path]
            trainer = self._spawn("trainer", args)
            follower = EventFollower(events_path)
            if config.chaos:
                threading.Thread(target=self._chaos, args=(follower, stop), daemon=True).start()
            deadline = time.monotonic() + config.timeout
            while trainer.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            exit_code = trainer.process.poll()
            if exit_code is None:
                logger.warning(f"the trainer did not finish within {config.timeout:.0f} s")
                exit_code = -1
        finally:
            stop.set()
            with self._lock:
                stop_all(self.children)
        groups = [c.process.pid for c in self.children]
        deadline = time.monotonic() + 15
        while any(group_alive(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.2)
        events = EventFollower(events_path).poll()
        return ChaosResult(exit_code, [e for e in events if e["event"] == "step"], events, self.actions,
                           time.monotonic() - self.started, [g for g in groups if group_alive(g)],
                           self._newcomers_served())

    def _newcomers_served(self) -> list[dict[str, Any]]:
        """What each newcomer (`--stage auto`, started by the chaos) served: from its log's "serving" line."""
        served = []
        for child in self.peers:
            if not child.name.endswith("stage-auto") or not child.log_path.exists():
                continue
            match = SERVING.search(child.log_path.read_text(errors="replace"))
            if match:
                served.append({"peer": child.name, "stage": int(match["stage"]), "source": match["source"],
                               "step": int(match["step"])})
        return served

    # --- the chaos thread ------------------------------------------------------------------------------------

    def _chaos(self, follower: EventFollower, stop: threading.Event) -> None:
        config = self.config
        while not stop.is_set() and not any(e["event"] == "step" for e in follower.events):
            follower.poll()
            stop.wait(0.2)  # start once training does
        next_kill = time.monotonic() + self.rng.uniform(*config.kill_interval)
        next_extra = time.monotonic() + config.extra_join_every if config.extra_join_every else float("inf")
        while not stop.wait(0.1):
            with self._lock:
                if stop.is_set():
                    return
                now = time.monotonic()
                self._start_due_joins(now)
                if now >= next_kill:
                    self._kill_something()
                    next_kill = now + self.rng.uniform(*config.kill_interval)
                if now >= next_extra:
                    if len(self.live_peers()) < config.max_peers and self.can_join():
                        self._join("extra")
                    next_extra = now + config.extra_join_every

    def bootstrap_up(self) -> bool:
        return self.bootstrap is not None and self.bootstrap.process.poll() is None and bool(self.maddr)

    def _kill_something(self) -> None:
        first = not self.actions
        share = self.config.bootstrap_share
        if self.bootstrap_up() and share > 0 and (first or self.rng.random() < share):
            kill_group(self.bootstrap)
            self.bootstrap.process.wait(10)
            downtime = self.rng.uniform(*self.config.bootstrap_downtime)
            self._act("kill_bootstrap", downtime=round(downtime, 2))
            threading.Timer(downtime, self._restart_bootstrap).start()
            return
        candidates = self.live_peers()
        if not candidates:
            return
        victim = self.rng.choice(candidates)
        kill_group(victim)
        victim.process.wait(10)
        if victim in self._joining:  # killed while joining: a kill like any other, not a failure to connect
            self._joining.remove(victim)
        self._act("kill_peer", peer=victim.name)
        self._pending_joins.append(time.monotonic() + self.rng.uniform(*self.config.join_delay))

    def _restart_bootstrap(self) -> None:
        with self._lock:
            if self._stop.is_set() or (self.bootstrap is not None and self.bootstrap.process.poll() is None):
                return
            try:
                self.start_bootstrap()
            except Exception as e:  # the port may be busy for a moment: try again shortly
                self._act("bootstrap_restart_failed", reason=str(e)[:200])
                threading.Timer(1.0, self._restart_bootstrap).start()
                return
            self._act("restart_bootstrap")

    def _start_due_joins(self, now: float) -> None:
        # A newcomer that could not connect (the bootstrap was down) exits; start it again.
        for child in list(self._joining):
            code = child.process.poll()
            if code is not None and code != 0 and "joining stage" not in child.log_path.read_text(errors="replace"):
                self._joining.remove(child)
                self._act("join_failed", peer=child.name, status=code)
                self._pending_joins.append(now + 1.0)
            elif code is None and "joining stage" in child.log_path.read_text(errors="replace"):
                self._joining.remove(child)
        due = [t for t in self._pending_joins if t <= now]
        if not due or not self.can_join():
            return
        for t in due:
            self._pending_joins.remove(t)
            self._join("replacement")

    def _join(self, why: str) -> None:
        child = self.start_peer("auto")
        self._joining.append(child)
        self._act("join", peer=child.name, why=why)


def run_chaos(config: ChaosConfig) -> ChaosResult:
    with busy_loops(config.busy):  # a loaded machine, if asked for: the load runs as long as the swarm does
        return ChaosSwarm(config).run()

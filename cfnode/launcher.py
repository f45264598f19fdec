"""`cfnode swarm`: a whole swarm on this machine, each role its own process, all stopped together.

Every child runs in its own process group, so stopping it also stops the DHT process and the p2p daemon
it started; nothing is left behind on exit, on Ctrl-C or on an error.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from hivemind.utils.logging import get_logger

from cfnode.config import RunSpec
from cfnode.node.events import EventFollower
from cfnode.recovery.failures import failure_schedule

logger = get_logger(__name__)


@dataclass
class SwarmLayout:
    spec: RunSpec
    replicas: int = 1
    steps: int = 150
    data_path: str | None = None
    log_jsonl: str | None = None
    batch_size: int = 16
    microbatches: int = 4
    workdir: Path | None = None
    log_level: str = "info"
    train_args: list[str] = field(default_factory=list)  # extra flags for `cfnode train`
    join_args: list[str] = field(default_factory=list)  # extra flags for every `cfnode join`
    kills: list[tuple[int, int]] = field(default_factory=list)  # (stage, step): SIGKILL the stage's peers then
    churn: float = 0.0  # chance per stage per step that all its peers are SIGKILLed
    churn_seed: int = 0
    threads: int | None = None  # torch threads per process (None: the cores shared out among trainer and peers)
    tokenizer_path: str | None = None  # the run's tokenizer file: the bootstrap pins it, the trainer and export load it
    model_out: Path | None = None  # where the trained model is exported (None: WORKDIR/model); see export_and_sample
    export: bool = True  # after training: export the model and print a sample of it
    prompt: str = "def "  # what the sample continues (the default corpus is Python source)
    sample_tokens: int = 200
    export_args: list[str] = field(default_factory=list)  # extra flags for `cfnode export` (--tokenizer)


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path


def cfnode_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cfnode", *args]


def spawn(name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None,
          stdout: int | IO | None = None) -> Child:
    """Start `cfnode <args>` in a new process group, its output appended to log_path unless stdout is given."""
    output = stdout if stdout is not None else open(log_path, "ab")
    try:
        process = subprocess.Popen(cfnode_command(*args), stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **(env or {})})
    finally:
        if stdout is None:
            output.close()  # the child has its own copy
    return Child(name, process, log_path)


def kill_group(child: Child, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(child.process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of a process group is still there."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_all(children: list[Child], grace: float = 5.0) -> None:
    """SIGTERM every child (it shuts its DHT and daemon down), wait up to `grace` s, then SIGKILL what is left."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for child in children:
        kill_group(child, signal.SIGKILL)  # the group may hold a DHT process or daemon even after the leader exits
        try:
            child.process.wait(5)
        except subprocess.TimeoutExpired:
            logger.warning(f"{child.name} (pid {child.process.pid}) did not exit after SIGKILL")


def wait_for_maddr(path: Path, bootstrap: Child, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if bootstrap.process.poll() is not None:
            raise RuntimeError(f"the bootstrap exited with status {bootstrap.process.returncode}; "
                               f"see {bootstrap.log_path}")
        time.sleep(0.1)
    raise TimeoutError(f"the bootstrap did not become ready within {timeout:.0f} s; see {bootstrap.log_path}")


class LocalSwarm:
    def __init__(self, layout: SwarmLayout):
        self.layout = layout
        self.workdir = layout.workdir or Path(tempfile.mkdtemp(prefix="cfnode-swarm-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.peers: list[Child] = []
        self.maddr = ""
        # Every process computing on all cores at once thrashes them; a share each lets stages work side by side.
        compute_processes = layout.spec.num_stages * layout.replicas + 1
        self.threads = layout.threads or max(1, (os.cpu_count() or 1) // compute_processes)
        churning = bool(layout.kills or layout.churn)
        # Churn follows the trainer's step events, so it needs them in a file even if the user asked for none.
        self.events_path = Path(layout.log_jsonl) if layout.log_jsonl else (
            self.workdir / "events.jsonl" if churning else None)
        # The run's one trainer: the bootstrap creates this identity file and names it in the signed run spec.
        self.trainer_identity = self.workdir / "trainer.key"

    def _record(self, child: Child) -> None:
        """Track a child; processes.json lists every process group this swarm started, for inspection."""
        self.children.append(child)
        listing = [{"name": c.name, "pid": c.process.pid, "log": str(c.log_path)} for c in self.children]
        (self.workdir / "processes.json").write_text(json.dumps(listing, indent=2))

    def start_bootstrap(self) -> str:
        spec_path = self.workdir / "spec.json"
        spec_path.write_text(json.dumps(self.layout.spec.to_dict(), indent=2))
        maddr_path = self.workdir / "bootstrap.maddr"
        maddr_path.unlink(missing_ok=True)
        bootstrap = spawn("bootstrap", ["bootstrap", "--config", str(spec_path), "--maddr-file", str(maddr_path),
                                        "--trainer", str(self.trainer_identity), "--run-id", self.layout.spec.run_id,
                                        "--log-level", self.layout.log_level, *self.tokenizer_args()],
                          self.workdir / "bootstrap.log")
        self._record(bootstrap)
        self.maddr = wait_for_maddr(maddr_path, bootstrap, timeout=60)
        return self.maddr

    def start_peer(self, stage: int | str, *extra: str) -> Child:
        index = len(self.peers)
        name = f"peer-{index}-stage-{stage}"
        # Peers log to files at info at least: stage_of() reads "joining stage N" from there.
        level = "debug" if self.layout.log_level == "debug" else "info"
        # --leave-timeout 0: the local swarm stops as a whole, when a hand-over to another peer is pointless.
        child = spawn(name, ["join", "--initial-peers", self.maddr, "--stage", str(stage),
                             "--run-id", self.layout.spec.run_id, "--log-level", level, "--leave-timeout", "0",
                             "--threads", str(self.threads), *self.layout.join_args, *extra],
                      self.workdir / f"{name}.log")
        self._record(child)
        self.peers.append(child)
        return child

    def stage_of(self, child: Child) -> int | None:
        """The stage a peer serves, from its log (a peer started with --stage auto decides by itself)."""
        try:
            match = re.search(r"joining stage (\d+) of", child.log_path.read_text(errors="replace"))
        except OSError:
            return None
        return int(match.group(1)) if match else None

    def kill_stage(self, stage: int, step: int) -> int:
        """SIGKILL every live peer of a stage, then start a newcomer with --stage auto; returns how many died."""
        victims = [c for c in self.peers if c.process.poll() is None and self.stage_of(c) == stage]
        for child in victims:
            kill_group(child)
            child.process.wait(10)
        if victims:
            print(f"churn: SIGKILLed {len(victims)} peer(s) of stage {stage} at step {step}; "
                  "starting a newcomer with --stage auto", flush=True)
            self.start_peer("auto")
        return len(victims)

    def _churn(self, events_path: Path, stop: threading.Event) -> None:
        """Follow the trainer's step events and kill stages on the --kill schedule and at the --churn rate."""
        layout = self.layout
        schedule = failure_schedule(layout.spec.num_stages, layout.steps, layout.churn, layout.churn_seed,
                                    layout.kills)
        follower = EventFollower(events_path)
        done = 0
        while not stop.wait(0.1):
            for step in [int(e["step"]) for e in follower.poll() if e.get("event") == "step"]:
                # Steps are never skipped on purpose, but a kill due at an earlier step still happens.
                for due in [s for s in schedule if done < s <= step]:
                    for stage in schedule[due]:
                        self.kill_stage(stage, step)
                done = max(done, step)

    def tokenizer_args(self) -> list[str]:
        """--tokenizer FILE for the bootstrap, the trainer and the export, where the run has a tokenizer file."""
        return ["--tokenizer", self.layout.tokenizer_path] if self.layout.tokenizer_path else []

    def train_command(self) -> list[str]:
        layout = self.layout
        args = ["train", "--initial-peers", self.maddr, "--identity", str(self.trainer_identity), "--steps",
                str(layout.steps),
                "--batch-size", str(layout.batch_size), "--microbatches", str(layout.microbatches),
                "--run-id", layout.spec.run_id, "--log-level", layout.log_level, "--threads", str(self.threads)]
        if layout.data_path:
            args += ["--data", layout.data_path]
        args += self.tokenizer_args()
        if self.events_path is not None:
            args += ["--log-jsonl", str(self.events_path)]
        if layout.export and "--state" not in layout.train_args:
            args += ["--state", str(self.trainer_state)]  # the head, for the export at the end
        return args + layout.train_args

    @property
    def trainer_state(self) -> Path:
        return self.workdir / "trainer.state"

    def export_and_sample(self) -> int:
        """Export the trained model from the live stages and the trainer's state file, then print a sample of it:
        the swarm's product is a model directory that transformers loads, not just a loss curve."""
        out = self.layout.model_out or self.workdir / "model"
        print(f"exporting the model to {out}", flush=True)
        export = subprocess.run(cfnode_command("export", "--initial-peers", self.maddr, "--run-id",
                                               self.layout.spec.run_id, "--trainer-state", str(self.trainer_state),
                                               "--out", str(out), "--log-level", self.layout.log_level,
                                               *self.tokenizer_args(), *self.layout.export_args),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        (self.workdir / "export.log").write_bytes(export.stdout)
        if export.returncode != 0:
            print(f"the export failed (see {self.workdir / 'export.log'}):\n{export.stdout.decode()[-2000:]}",
                  flush=True)
            return export.returncode
        print(export.stdout.decode().strip().splitlines()[-1], flush=True)
        sample = subprocess.run(cfnode_command("generate", "--model", str(out), "--prompt", self.layout.prompt,
                                               "--max-new-tokens", str(self.layout.sample_tokens), "--seed", "0"),
                                capture_output=True)
        if sample.returncode != 0:
            print(f"sampling failed:\n{sample.stderr.decode()[-2000:]}", flush=True)
            return sample.returncode
        print(f"a sample of the trained model (prompt {self.layout.prompt!r}, seed 0):\n{sample.stdout.decode()}",
              flush=True)
        return 0

    def run(self) -> int:
        """Start everything, show the trainer's progress, stop everything; returns the trainer's exit status."""
        spec = self.layout.spec
        in_main_thread = threading.current_thread() is threading.main_thread()
        # SIGTERM and SIGINT both stop the swarm, SIGINT even where it was inherited as ignored (a background job
        # of a non-interactive shell), so `kill -INT` always works.
        previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)} \
            if in_main_thread else {}
        stop_churn = threading.Event()
        try:
            replicas = f"{self.layout.replicas} replica{'s' if self.layout.replicas > 1 else ''}"
            print(f"local swarm: {spec.num_stages} stages x {replicas} each; logs in {self.workdir}",
                  flush=True)
            self.start_bootstrap()
            for stage in range(1, spec.num_stages + 1):
                for _ in range(self.layout.replicas):
                    self.start_peer(stage)
            trainer = spawn("trainer", self.train_command(), self.workdir / "trainer.log", stdout=subprocess.PIPE)
            self._record(trainer)
            if self.layout.kills or self.layout.churn:
                threading.Thread(target=self._churn, args=(self.events_path, stop_churn), daemon=True).start()
            _tee(trainer.process.stdout, trainer.log_path)
            status = trainer.process.wait()
            if status == 0 and self.layout.export:
                stop_churn.set()  # the model is taken from the stages as they are now: no more kills
                status = self.export_and_sample()
            return status
        except KeyboardInterrupt:
            print("stopping the local swarm", flush=True)
            return 130
        finally:
            stop_churn.set()
            stop_all(self.children)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _tee(stream: IO[bytes], log_path: Path) -> None:
    """Copy the trainer's output to our stdout and its log file, line by line."""
    with open(log_path, "ab") as log:
        for line in iter(stream.readline, b""):
            log.write(line)
            log.flush()
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

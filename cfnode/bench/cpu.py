"""Where the CPU goes in a local swarm: per-process CPU time of this process's descendants, sampled from /proc.

On a machine with fewer cores than processes, the swarm's throughput is bounded by the sum of CPU time that
all its processes spend per step: torch compute in the trainer and the stages, (de)serialisation and asyncio in
the same Python processes, the p2p daemons (every byte crosses two of them), and the DHT processes. Sampling
/proc twice per second attributes that sum to process roles without touching the processes themselves.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ProcessInfo:
    pid: int
    ppid: int
    cmdline: str
    cpu_s: float  # user + system, cumulative


def _read_process(pid: int) -> ProcessInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:  # gone between listing and reading
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name in parentheses may hold spaces
    return ProcessInfo(pid, int(fields[1]), cmdline, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)


def descendants(root: int) -> dict[int, ProcessInfo]:
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _read_process(int(entry))) is not None:
            processes[info.pid] = info
    children: dict[int, list[int]] = {}
    for info in processes.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found, stack = {}, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found[pid] = processes[pid]
        stack.extend(children.get(pid, []))
    return found


def role(info: ProcessInfo, processes: dict[int, ProcessInfo]) -> str:
    """A short name for what the process is: `trainer`, `stage`, `bootstrap`, `p2pd`, or `... dht` for the DHT
    process hivemind forks off each node (same command line as its parent)."""
    if "p2pd" in info.cmdline.split(" ", 1)[0]:
        return "p2pd"
    parent = processes.get(info.ppid)
    if parent is not None and parent.cmdline == info.cmdline:
        return f"{role(parent, processes)} dht"
    words = info.cmdline.split()
    for name, label in (("train", "trainer"), ("join", "stage"), ("bootstrap", "bootstrap"), ("serve", "server")):
        if name in words:
            return label
    return "other"


@dataclass
class CpuSampler:
    """Samples the cumulative CPU time of every descendant of `root` in a background thread."""

    root: int = field(default_factory=os.getpid)
    interval: float = 0.5
    samples: list[tuple[float, dict[int, tuple[str, float]]]] = field(default_factory=list)  # (time, pid -> role, s)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> CpuSampler:
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            processes = descendants(self.root)
            sample = {pid: (role(info, processes), info.cpu_s) for pid, info in processes.items()}
            self.samples.append((time.time(), sample))
            self._stop.wait(self.interval)

    def cpu_by_role(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each role used between the samples nearest to `start` and `end` (wall-clock times).
        A process that died in between counts up to its last sample."""
        if len(self.samples) < 2:
            return {}
        first = min(self.samples, key=lambda s: abs(s[0] - start))
        inside = [s for s in self.samples if first[0] <= s[0] <= end + self.interval]
        totals: dict[str, float] = {}
        last_seen: dict[int, tuple[str, float]] = {}
        for _, sample in inside:
            last_seen.update(sample)
        for pid, (name, cpu) in last_seen.items():
            before = first[1].get(pid, (name, 0.0))[1]
            totals[name] = totals.get(name, 0.0) + max(0.0, cpu - before)
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

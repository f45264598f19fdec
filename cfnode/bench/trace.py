"""Pipeline timelines from the stage peers' compute traces (`cfnode join --trace-dir`, cfnode/node/trace.py).

On a machine with fewer cores than stages, the time in which fewer stages compute than there are cores is left to
the processes that move the tensors, or idle: the synchronous pipeline fills and drains every step (stage 1 alone
with a step's first forward and last backward), and at the step boundary nothing computes but the step itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ComputeCall:
    stage: int
    kind: str  # forward, backward, step or evaluate
    step: int
    microbatch: int | None
    start: float  # wall clock, seconds
    end: float


def read_traces(directory: str | Path) -> list[ComputeCall]:
    """Every call in the directory's traces, by start time. A line cut short by a killed peer is skipped."""
    calls = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                calls.append(ComputeCall(record["stage"], record["kind"], record["step"], record["microbatch"],
                                         record["start"], record["end"]))
            except (ValueError, KeyError, TypeError):
                continue
    return sorted(calls, key=lambda call: call.start)


def concurrency(calls: list[ComputeCall], start: float, end: float) -> dict[int, float]:
    """The share of [start, end] in which k calls ran at once, for k from 0 to the most seen."""
    edges = []
    for call in calls:
        begin, finish = max(call.start, start), min(call.end, end)
        if begin < finish:
            edges += [(begin, 1), (finish, -1)]
    edges.sort()
    shares: dict[int, float] = {0: 0.0}
    running, last = 0, start
    for moment, change in edges:
        shares[running] = shares.get(running, 0.0) + moment - last
        running, last = running + change, moment
    shares[running] = shares.get(running, 0.0) + end - last
    total = end - start
    return {k: shares.get(k, 0.0) / total for k in range(max(shares) + 1)} if total > 0 else {}


def step_boundaries(calls: list[ComputeCall], stage: int = 1) -> list[float]:
    """For each step n, seconds from the stage's last backward of n to its first forward of n + 1: the wait at
    the step boundary, which holds the step itself (one peer per stage assumed)."""
    last_backward: dict[int, float] = {}
    first_forward: dict[int, float] = {}
    for call in calls:
        if call.stage != stage:
            continue
        if call.kind == "backward":
            last_backward[call.step] = max(last_backward.get(call.step, call.end), call.end)
        elif call.kind == "forward":
            first_forward[call.step] = min(first_forward.get(call.step, call.start), call.start)
    return [first_forward[step + 1] - end for step, end in sorted(last_backward.items()) if step + 1 in first_forward]

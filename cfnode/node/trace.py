"""A stage peer's compute trace (`cfnode join --trace-dir`): one JSON line for each call it computes (`forward`,
`backward`, `step`, or `evaluate` for a forward outside training), with its start and end on the wall clock.

Peers on one machine share that clock, so their traces line up: `cfnode.bench.trace` counts how many stages
compute at once, which shows the pipeline's bubbles (`benchmarks/throughput.py` reports it). Across machines the
traces are off by the clocks' skew.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class ComputeTrace:
    def __init__(self, directory: str | Path, stage: int, peer_id: str):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"stage{stage}-{peer_id}.jsonl"
        self.stage = stage
        self._file = self.path.open("a", buffering=1)  # a line per call: a crash loses at most the last one
        self._wall_minus_perf = time.time() - time.perf_counter()

    def record(self, kind: str, step: int, microbatch: int | None, started: float, finished: float) -> None:
        """One call that ran on the compute worker from `started` to `finished` (time.perf_counter())."""
        if self._file.closed:
            return
        line = dict(stage=self.stage, kind=kind, step=step, microbatch=microbatch,
                    start=round(started + self._wall_minus_perf, 6), end=round(finished + self._wall_minus_perf, 6))
        self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._file.close()

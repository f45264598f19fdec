"""The churn benchmark's clock, in iterations: what a run's recorded events cost in the paper's setting.

Our CPU-scale runs measure too little to be the paper's clock (a step of a tiny model costs ~0.04 s, a local
`torch.save` almost nothing), so time is counted in units of one plain training iteration and every other cost is a
stated fraction of one, taken from the paper's own code (gensyn-ai/CheckFree, simulate_training/500M_config.json and
trainer.py) for its 500M model:

- an iteration of plain pipeline training: 91 s; with redundant computation: 151 s (1.66 iterations);
- a recovery (detecting the loss, a newcomer taking the stage): about 30 s, so a failure event costs 0.33 iteration;
- a checkpoint of a stage's state (weights + AdamW's two moments, 12 bytes a parameter in float32, ~6 GB for 500M
  parameters) over ~100 MB/s links: 60 s to write and as long to read back, 0.66 iteration each;
- the per-stage per-iteration failure probability for an hourly rate: the paper's table, or for another rate
  1 - (1 - rate) ** (iteration seconds / 3600).

Pure arithmetic, no torch: `run_sim` records counts of events and `clock` prices them, so a run's time can be
recomputed afterwards for other costs (the sensitivity analysis) with the same function.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

PAPER_ITERATION_SECONDS = 91.0
PAPER_REDUNDANT_ITERATION_SECONDS = 151.0
PAPER_RECOVERY_SECONDS = 30.0
PAPER_CHECKPOINT_EVERY = 20  # the paper's checkpointing baseline rolls back to the last multiple of 20 iterations
PAPER_PARAMETERS = 500e6
BYTES_PER_PARAMETER = 12  # float32 weights + AdamW's first and second moments
PAPER_STATE_BYTES = PAPER_PARAMETERS * BYTES_PER_PARAMETER
PAPER_STORAGE_BYTES_PER_SECOND = 100e6  # the links the paper's code assumes: ~800 Mbit/s
# Hourly failure rate per stage -> failure probability per stage per iteration (500M_config.json).
PAPER_FAILURE_PROBABILITY = {0.05: 0.0009, 0.10: 0.002, 0.16: 0.004, 0.33: 0.01}
# The paper's Table 2, as speed-ups of CheckFree+ over a baseline: (method, baseline, hourly rate) -> factor.
PAPER_SPEEDUPS = {("checkfree+", "checkpoint", 0.05): 1.57, ("checkfree+", "checkpoint", 0.10): 1.69,
                  ("checkfree+", "checkpoint", 0.16): 1.38, ("checkfree+", "redundant", 0.05): 1.15}
PAPER_REDUNDANT_COST = PAPER_REDUNDANT_ITERATION_SECONDS / PAPER_ITERATION_SECONDS


def failure_probability(rate: float, iteration_seconds: float = PAPER_ITERATION_SECONDS) -> tuple[float, str]:
    """(per-stage per-iteration failure probability, the rule that gave it) for an hourly failure rate."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"hourly failure rate must be in [0, 1), got {rate}")
    for known, p in PAPER_FAILURE_PROBABILITY.items():
        if math.isclose(rate, known, abs_tol=1e-9):
            return p, "the paper's table"
    p = 1.0 - (1.0 - rate) ** (iteration_seconds / 3600.0)
    return p, f"1 - (1 - rate) ** ({iteration_seconds:g} / 3600)"


def transfer_cost(state_bytes: float, bytes_per_second: float, iteration_seconds: float) -> float:
    """Moving a stage's state once, in iterations."""
    if bytes_per_second <= 0 or iteration_seconds <= 0:
        raise ValueError("bandwidth and iteration seconds must be positive")
    return state_bytes / bytes_per_second / iteration_seconds


def mean_iterations_between_failures(p: float, stages: int) -> float:
    """MTBF in iterations: a failure event is any of `stages` stages failing in an iteration."""
    event = 1.0 - (1.0 - p) ** stages
    return math.inf if event <= 0 else 1.0 / event


def young_daly_interval(save_cost: float, mtbf: float) -> int:
    """The checkpoint interval that minimises expected lost time, sqrt(2 * save cost * MTBF), as an integer >= 1."""
    if math.isinf(mtbf):
        return 1_000_000_000  # no failures: never worth saving; a huge interval rather than inf keeps it an int
    return max(1, round(math.sqrt(2.0 * save_cost * mtbf)))


@dataclass(frozen=True)
class Events:
    """What a run did up to some point: the counts the clock prices."""

    iterations: int = 0  # executed, redone ones included
    saves: int = 0
    failures: int = 0  # failure events (one or more stages lost in one iteration)
    restores: int = 0  # rollbacks of every stage to the last save


def clock(events: Events, iteration_cost: float, save_cost: float, downtime: float, restore_cost: float) -> float:
    """Time in iterations: iterations x cost + saves x save cost + failures x downtime + restores x restore cost."""
    return (events.iterations * iteration_cost + events.saves * save_cost + events.failures * downtime
            + events.restores * restore_cost)


@dataclass(frozen=True)
class TimeModel:
    """The costs, in plain iterations, and the stated numbers they come from."""

    downtime: float = PAPER_RECOVERY_SECONDS / PAPER_ITERATION_SECONDS
    save_cost: float = transfer_cost(PAPER_STATE_BYTES, PAPER_STORAGE_BYTES_PER_SECOND, PAPER_ITERATION_SECONDS)
    restore_cost: float = transfer_cost(PAPER_STATE_BYTES, PAPER_STORAGE_BYTES_PER_SECOND, PAPER_ITERATION_SECONDS)
    redundant_cost: float | None = None  # imposed iteration cost of `redundant`; None: the run's measured ratio
    state_bytes: float = PAPER_STATE_BYTES
    storage_bytes_per_second: float = PAPER_STORAGE_BYTES_PER_SECOND
    iteration_seconds: float = PAPER_ITERATION_SECONDS  # the paper's iteration: the rate -> p rule and the defaults

    @classmethod
    def from_numbers(cls, state_bytes: float = PAPER_STATE_BYTES,
                     storage_bytes_per_second: float = PAPER_STORAGE_BYTES_PER_SECOND,
                     iteration_seconds: float = PAPER_ITERATION_SECONDS, downtime: float | None = None,
                     save_cost: float | None = None, restore_cost: float | None = None,
                     redundant_cost: float | None = None) -> TimeModel:
        """Costs derived from the stated numbers, unless given directly."""
        transfer = transfer_cost(state_bytes, storage_bytes_per_second, iteration_seconds)
        for name, value in (("downtime", downtime), ("save cost", save_cost), ("restore cost", restore_cost)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if redundant_cost is not None and redundant_cost < 1:
            raise ValueError(f"redundant's iteration cost must be >= 1, got {redundant_cost}")
        return cls(downtime=PAPER_RECOVERY_SECONDS / iteration_seconds if downtime is None else downtime,
                   save_cost=transfer if save_cost is None else save_cost,
                   restore_cost=transfer if restore_cost is None else restore_cost,
                   redundant_cost=redundant_cost, state_bytes=state_bytes,
                   storage_bytes_per_second=storage_bytes_per_second, iteration_seconds=iteration_seconds)

    def iteration_cost(self, method: str, measured_redundant: float | None = None) -> float:
        """One executed iteration of `method`: 1, or for `redundant` the imposed or the measured ratio."""
        if method != "redundant":
            return 1.0
        if self.redundant_cost is not None:
            return self.redundant_cost
        if measured_redundant is None:
            raise ValueError("redundant's iteration cost is measured by its run; none given")
        return measured_redundant

    def time(self, events: Events, iteration_cost: float = 1.0) -> float:
        return clock(events, iteration_cost, self.save_cost, self.downtime, self.restore_cost)

    def describe(self) -> list[str]:
        """The model in words, one line per cost."""
        transfer = transfer_cost(self.state_bytes, self.storage_bytes_per_second, self.iteration_seconds)
        derived = (f"{self.state_bytes / 1e9:g} GB of state at {self.storage_bytes_per_second / 1e6:g} MB/s over a "
                   f"{self.iteration_seconds:g} s iteration = {transfer:.3f}")
        return [
            "time unit: one plain training iteration (the paper's is "
            f"{self.iteration_seconds:g} s); measured wall seconds are kept apart, for information",
            "iteration cost: 1; redundant: " + (f"{self.redundant_cost:.3f} (imposed)" if self.redundant_cost
                                                 is not None else "its run's measured (compute + shadow compute) / "
                                                                  "compute")
            + f"; the paper's {PAPER_REDUNDANT_ITERATION_SECONDS:g}/{PAPER_ITERATION_SECONDS:g} = "
              f"{PAPER_REDUNDANT_COST:.2f}",
            f"downtime per failure event, every method: {self.downtime:.3f}"
            + (" (the paper's ~30 s recovery)" if math.isclose(self.downtime,
                                                               PAPER_RECOVERY_SECONDS / self.iteration_seconds)
               else " (given)"),
            f"checkpoint save: {self.save_cost:.3f}" + (f" ({derived})" if math.isclose(self.save_cost, transfer)
                                                        else " (given)"),
            f"checkpoint restore (every stage rolls back): {self.restore_cost:.3f}"
            + (" (the same transfer)" if math.isclose(self.restore_cost, transfer) else " (given)"),
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

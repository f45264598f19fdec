"""Fault injection for tests: named points in the code where a test can make a failure happen on purpose.

A guarantee (each microbatch counted once, nothing lost on a cut stream) is only as good as the test that tries to
break it, and the failures that break it (a stream cut while a backward runs, a reply that arrives too late) are
races. A fault point turns such a race into a deterministic event. Points are off unless the process was started
with `CFNODE_FAULTS`, a comma-separated list of `point@step:microbatch`, `point@step` (any microbatch of that step)
or `point` (the first call), for example `CFNODE_FAULTS=cut_backward@1:2`; each listed fault fires once. Nothing in
a normal run sets it.

The points:
- `cut_backward`: a stage peer's pipe breaks (the stream ends, the calls on it are cancelled) right after the
  backward's autograd has added its gradient, before the peer answers.
- `slow_backward`: a stage peer holds its backward reply back for `CFNODE_FAULT_DELAY` seconds (default 5) after
  computing it, so the trainer's call times out although the gradient was accumulated.
- `empty_view`: a joining node's read of the live stage map comes back empty, as it does through a bootstrap that
  has just restarted with an empty routing table (list it N times for N reads).
- `hide_progress`: a node's read of the run's progress finds none, as if no trainer or bootstrap had published it
  (with `empty_view`, a newcomer then serves fresh weights outside the trained swarm: an island).
- `slow_rebuild`: a newcomer that rebuilds a lost stage holds on for `CFNODE_FAULT_DELAY` seconds after averaging its
  neighbours, as a long refit on a loaded machine does, while other newcomers wait to copy it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextvars import ContextVar

from hivemind.utils.logging import get_logger

logger = get_logger(__name__)

POINTS = ("cut_backward", "slow_backward", "empty_view", "hide_progress", "slow_rebuild")


class FaultPlan:
    """The faults armed in this process, each firing once at its (step, microbatch) or at the first call."""

    def __init__(self, spec: str = ""):
        self._armed: list[tuple[str, int | None, int | None]] = []  # (point, step, microbatch); None: any
        self._lock = threading.Lock()  # points fire on the event loop and on compute threads
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, where = item.partition("@")
            if name not in POINTS:
                raise ValueError(f"unknown fault point {name!r} in CFNODE_FAULTS; known: {', '.join(POINTS)}")
            step, _, microbatch = where.partition(":")
            self._armed.append((name, int(step) if step else None, int(microbatch) if microbatch else None))
        self.delay = float(os.environ.get("CFNODE_FAULT_DELAY", "5"))

    def fire(self, name: str, step: int, microbatch: int) -> bool:
        """True (once) if the fault `name` is armed for this call; a fired fault is logged, then disarmed."""
        if not self._armed:
            return False
        with self._lock:
            for index, (armed, at_step, at_microbatch) in enumerate(self._armed):
                if armed == name and at_step in (None, step) and at_microbatch in (None, microbatch):
                    del self._armed[index]
                    logger.warning(f"fault injected: {name} at step {step}, microbatch {microbatch}")
                    return True
        return False


FAULTS = FaultPlan(os.environ.get("CFNODE_FAULTS", ""))
# Set by a stage peer's pipe handler for the calls it serves: ends that pipe's stream (for `cut_backward`).
CURRENT_PIPE_CUT: ContextVar[Callable[[], None] | None] = ContextVar("current_pipe_cut", default=None)

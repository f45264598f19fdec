"""Where a call's time goes: seconds by kind, summed into whichever accumulator the current task has set.

A stage sets one per forward or backward call and returns it in the reply's metadata (`decode`, `queue`,
`compute`); the trainer sets one per step, so the step's log line can say how much of the calls' time went to
compute, to (de)serialisation and to the wire. Nothing is recorded where no accumulator is set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")

TIMING: ContextVar[dict[str, float] | None] = ContextVar("cfnode_timing", default=None)


def add_time(kind: str, seconds: float) -> None:
    timing = TIMING.get()
    if timing is not None:
        timing[kind] = timing.get(kind, 0.0) + seconds


@contextmanager
def timed(kind: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        add_time(kind, time.perf_counter() - started)


@contextmanager
def collecting(timing: dict[str, float]) -> Iterator[dict[str, float]]:
    """Record into `timing` for the rest of this task (and the tasks it starts) until the block ends."""
    token = TIMING.set(timing)
    try:
        yield timing
    finally:
        TIMING.reset(token)


def run_timed(fn: Callable[..., T], *args) -> tuple[T, float, float]:
    """fn(*args) with when it started and finished: run on a compute worker, so the caller can tell the wait for
    the worker from the compute itself."""
    started = time.perf_counter()
    result = fn(*args)
    return result, started, time.perf_counter()

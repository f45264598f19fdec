"""A load generator: processes that each keep a core busy, so a swarm can be run (and tested) on a machine that is
doing other work, the normal case for a volunteer's machine."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

BUSY_LOOP = "while True:\n    pass\n"


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[list[subprocess.Popen]]:
    """`count` processes spinning a pure Python loop, at the same priority as everything else, for the duration of
    the block; they are killed when it ends, however it ends."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL, start_new_session=True)
             for _ in range(count)]
    try:
        yield loops
    finally:
        for loop in loops:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(loop.pid, signal.SIGKILL)
        for loop in loops:
            loop.wait(10)


def busy_from_env(name: str = "CFNODE_TEST_BUSY") -> int:
    """The number of busy loops a test starts around its swarm (0 unless the environment asks for some)."""
    value = os.environ.get(name, "0").strip() or "0"
    if not value.isdigit():
        raise ValueError(f"{name} must be a number of busy processes, got {value!r}")
    return int(value)

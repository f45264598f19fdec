"""Where a call's time goes: the accumulators, the trainer's time split and the per-process CPU sampler."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cfnode.bench.cpu import CpuSampler, descendants, role
from cfnode.node.trainer import time_split
from cfnode.protocol.timing import add_time, collecting, timed


def test_time_is_recorded_only_inside_a_collecting_block():
    add_time("compute", 1.0)  # nothing set: ignored
    with collecting({}) as outer:
        add_time("compute", 0.5)
        with collecting({}) as inner:
            add_time("compute", 2.0)
        with timed("encode"):
            time.sleep(0.01)
    assert inner == {"compute": 2.0}
    assert outer["compute"] == 0.5 and outer["encode"] >= 0.01


def test_time_split_subtracts_both_sides_from_the_round_trip():
    split = time_split({"call": 1.0, "encode": 0.1, "decode": 0.05, "stage_decode": 0.05, "stage_queue": 0.2,
                        "stage_compute": 0.4, "head_compute": 0.3, "apply_step": 0.25})
    assert split == {"stage_compute": 0.4, "head_compute": 0.3, "stage_queue": 0.2, "serialization": 0.2,
                     "transfer": pytest.approx(0.2), "calls": 1.0, "apply_step": 0.25}
    assert time_split({})["transfer"] == 0.0  # no calls: nothing, never negative


def test_sampler_finds_child_processes_and_their_roles():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "join"])
    try:
        sampler = CpuSampler(interval=0.05).start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(child.pid in s for _, s in sampler.samples) < 2:
            time.sleep(0.05)
        sampler.stop()
        processes = descendants(os.getpid())
        assert child.pid in processes
        assert role(processes[child.pid], processes) == "stage"  # "join" among its arguments
        cpu = sampler.cpu_by_role(sampler.samples[0][0], sampler.samples[-1][0])
        assert cpu["stage"] >= 0
    finally:
        child.kill()
        child.wait()

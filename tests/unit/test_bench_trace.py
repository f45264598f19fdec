"""Compute traces: what a stage peer writes, and the pipeline timeline read back from them."""

from __future__ import annotations

import json
import time

import pytest

from cfnode.bench.trace import ComputeCall, concurrency, read_traces, step_boundaries
from cfnode.node.trace import ComputeTrace


def call(stage: int, kind: str, step: int, start: float, end: float, microbatch: int | None = 0) -> ComputeCall:
    return ComputeCall(stage, kind, step, microbatch, start, end)


def test_trace_lines_read_back_on_the_wall_clock(tmp_path):
    trace = ComputeTrace(tmp_path / "traces", 2, "QmPeer")
    before = time.time()
    started = time.perf_counter()
    trace.record("forward", 7, 3, started, started + 0.25)
    trace.record("step", 7, None, started + 0.5, started + 0.75)
    trace.close()
    trace.record("backward", 7, 3, started, started + 0.1)  # after close: dropped, not raised
    assert trace.path.name == "stage2-QmPeer.jsonl"
    (tmp_path / "traces" / "stage1-QmOther.jsonl").write_text(
        json.dumps(dict(stage=1, kind="forward", step=7, microbatch=0, start=before - 1, end=before - 0.5))
        + "\n{\"stage\": 1, \"kind\": \"back")  # a line cut short by a killed peer
    calls = read_traces(tmp_path / "traces")
    assert [(c.stage, c.kind, c.microbatch) for c in calls] == [(1, "forward", 0), (2, "forward", 3), (2, "step", None)]
    forward = calls[1]
    assert forward.end - forward.start == pytest.approx(0.25, abs=1e-5)
    assert before - 0.01 <= forward.start <= time.time()


def test_concurrency_shares_the_window_by_calls_running():
    calls = [call(1, "forward", 0, 0.0, 4.0), call(2, "forward", 0, 2.0, 6.0), call(3, "forward", 0, 3.0, 5.0),
             call(1, "backward", 0, 9.0, 12.0)]  # the last one runs past the window's end
    shares = concurrency(calls, 0.0, 10.0)
    # 0-2: one, 2-3: two, 3-4: three, 4-5: two, 5-6: one, 6-9: none, 9-10: one
    assert shares == pytest.approx({0: 0.3, 1: 0.4, 2: 0.2, 3: 0.1})
    assert sum(shares.values()) == pytest.approx(1.0)
    assert concurrency([], 0.0, 1.0) == {0: 1.0}


def test_step_boundary_runs_from_the_last_backward_to_the_next_steps_first_forward():
    calls = [call(1, "forward", 0, 0.0, 1.0), call(1, "forward", 0, 1.0, 2.0, 1),
             call(1, "backward", 0, 5.0, 6.0), call(1, "backward", 0, 6.5, 7.0, 1), call(1, "step", 0, 7.2, 7.4, None),
             call(2, "forward", 1, 7.5, 8.0),  # another stage: not stage 1's boundary
             call(1, "forward", 1, 7.9, 8.5), call(1, "forward", 1, 8.5, 9.0, 1),
             call(1, "backward", 1, 12.0, 13.0)]  # the run ends before step 2: no boundary after step 1
    assert step_boundaries(calls) == [pytest.approx(0.9)]
    assert step_boundaries(calls, stage=2) == []

"""The chaos run's summary: what it counts from the chaos actions and the trainer's events."""

from cfnode.bench.chaos import ChaosResult


def _result(events: list[dict], actions: list[dict] | None = None) -> ChaosResult:
    steps = [e for e in events if e["event"] == "step"]
    return ChaosResult(0, steps, events, actions or [], 12.0, [])


def test_summary_counts_kills_newcomers_and_trainer_events():
    events = [
        {"event": "train_started", "step": 0},
        {"event": "step", "step": 1, "loss": 5.0},
        {"event": "stage_lost", "stage": 2, "step": 2},
        {"event": "microbatch_replayed", "stage": 2, "step": 2, "microbatch": 1, "lost_peer": "a", "peer": "b"},
        {"event": "microbatch_replayed", "stage": 2, "step": 2, "microbatch": 3, "lost_peer": "a", "peer": "b"},
        {"event": "ledger_refused", "stage": 1, "step": 2, "peers": ["c"], "reason": "off"},
        {"event": "replica_left_out", "stage": 1, "step": 2, "peer": "c", "reason": "its record of the step was wrong"},
        {"event": "stage_step_restarted", "stage": 1, "step": 2, "microbatches": 4},
        {"event": "stage_recovered", "stage": 2, "step": 2, "source": "checkfree", "downtime": 3.0},
        {"event": "stage_lost", "stage": 3, "step": 3},
        {"event": "step", "step": 2, "loss": 4.0, "val_loss": 4.5},
        {"event": "train_finished", "step": 2, "ledger_checks": 6, "step_mismatches": 0},
    ]
    actions = [{"action": "kill_bootstrap"}, {"action": "kill_peer"}, {"action": "kill_peer"}, {"action": "join"},
               {"action": "join_failed"}]
    summary = _result(events, actions).summary()
    assert summary["steps"] == 2 and summary["final_loss"] == 4.0 and summary["final_val_loss"] == 4.5
    assert summary["peers_killed"] == 2 and summary["bootstrap_kills"] == 1
    assert summary["newcomers"] == 1 and summary["failed_joins"] == 1
    assert summary["stage_lost"] == 2 and summary["stage_recovered"] == 1
    assert summary["losses_matched"] == 1 and summary["unmatched_losses"] == 1  # stage 3 never came back
    assert summary["microbatches_replayed"] == 2 and summary["replicas_left_out"] == 1
    assert summary["ledger_refused"] == 1 and summary["stage_steps_restarted"] == 1
    assert summary["step_mismatches"] == 0 and summary["ledger_checks"] == 6
    assert summary["recovery_sources"] == {"checkfree": 1} and summary["mean_downtime"] == 3.0


def test_step_mismatches_count_events_and_the_trainers_own_count():
    mismatch = {"event": "step_mismatch", "stage": 1, "step": 1, "peer": "a", "count": 5, "expected": 4,
                "missing": [], "doubled": [2]}
    assert _result([mismatch]).summary()["step_mismatches"] == 1
    # A trainer that finished reports its own count; the summary never reports fewer than that.
    finished = {"event": "train_finished", "step": 1, "ledger_checks": 2, "step_mismatches": 2}
    assert _result([mismatch, finished]).summary()["step_mismatches"] == 2


def test_ledger_checks_add_up_over_trainer_runs_and_are_zero_without_a_finish():
    assert _result([{"event": "step", "step": 1, "loss": 1.0}]).summary()["ledger_checks"] == 0
    runs = [{"event": "train_finished", "step": 5, "ledger_checks": 10, "step_mismatches": 0},
            {"event": "train_finished", "step": 9, "ledger_checks": 8, "step_mismatches": 0}]
    assert _result(runs).summary()["ledger_checks"] == 18


def test_transient_losses_islands_and_stalls():
    events = [
        {"event": "step", "step": 1, "time": 100.0, "loss": 3.0},
        {"event": "peer_failed", "stage": 1, "peer": "old", "time": 101.0},
        {"event": "stage_lost", "stage": 1, "time": 101.0},
        {"event": "stage_recovered", "stage": 1, "peer": "old", "source": "fresh", "downtime": 1.0},  # it was live
        {"event": "step", "step": 2, "time": 103.5, "loss": 3.0},
        {"event": "stage_lost", "stage": 2, "time": 104.0},
        {"event": "stage_recovered", "stage": 2, "peer": "newcomer", "source": "checkfree", "downtime": 9.0},
        {"event": "step", "step": 3, "time": 113.0, "loss": 3.0},
    ]
    result = ChaosResult(0, [e for e in events if e["event"] == "step"], events, [], 12.0, [],
                         [{"peer": "p-1", "stage": 2, "source": "checkfree", "step": 2},
                          {"peer": "p-2", "stage": 3, "source": "fresh", "step": 0},
                          {"peer": "p-3", "stage": 3, "source": "replica", "step": 0}])
    assert result.transient_losses() == [events[2]]
    assert [n["peer"] for n in result.islands] == ["p-2", "p-3"]
    assert [n["peer"] for n in result.fresh_restarts] == ["p-2"]
    assert result.longest_stall == 9.5
    summary = result.summary()
    assert (summary["transient_stage_lost"], summary["islands"], summary["fresh_restarts"]) == (1, 2, 1)


def test_newcomers_serving_line_is_parsed():
    from cfnode.bench.chaos import SERVING

    line = "serving stage 2 (source: checkfree+, from 1:QmA, 3:QmB) at step 25"
    match = SERVING.search(line)
    assert (match["stage"], match["source"], match["step"]) == ("2", "checkfree+", "25")
    assert SERVING.search("serving stage 1 (source: fresh) at step 0")["source"] == "fresh"

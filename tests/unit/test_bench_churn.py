import copy
import json
import math
import sys

import pytest
import torch
from click.testing import CliRunner

from cfnode.bench.churn import (
    ChurnConfig,
    checkpoint_interval,
    churn_schedule,
    run_churn,
    run_sim,
    stage_failure_probability,
)
from cfnode.bench.churn_report import PLOTS_HINT, point_events, sensitivity, time_to_target
from cfnode.bench.sim import METHODS, SimPipeline
from cfnode.bench.time_model import (
    PAPER_FAILURE_PROBABILITY,
    Events,
    TimeModel,
    clock,
    failure_probability,
    mean_iterations_between_failures,
    young_daly_interval,
)
from cfnode.cli import main
from cfnode.config import RunSpec
from cfnode.data import TextDataset, batch_generator

TINY = RunSpec(num_stages=4, layers_per_stage=1, hidden_size=16, num_heads=2, seq_len=16)
TEXT = ("Once upon a time there was a small robot who liked to count the stars. " * 60).encode()
# An hour-long iteration: for a rate outside the paper's table, p = the hourly rate, so tiny runs see failures.
MODEL = TimeModel(downtime=0.5, save_cost=0.5, restore_cost=0.75, iteration_seconds=3600.0)
RATE = 0.3


@pytest.fixture(autouse=True)
def one_thread():
    # Several torch threads on a loaded shared machine can make these tiny steps a hundred times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**changes) -> ChurnConfig:
    values = dict(spec=TINY, steps=5, batch_size=4, microbatches=2, eval_every=2, eval_batches=2, time=MODEL,
                  checkpoint_every=2, max_iterations_factor=2.0, seed=3)
    values.update(changes)
    return ChurnConfig(**values)


def _quiet(_: str) -> None:
    pass


def _batch(generator: torch.Generator, dataset: TextDataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.sample_batch(4, generator)


def _state(pipeline: SimPipeline) -> dict:
    return copy.deepcopy({"head": pipeline.head.state_dict(), "head_opt": pipeline.head_optimizer.state_dict(),
                          **{f"s{s}": m.state_dict() for s, m in pipeline.stages.items()},
                          **{f"o{s}": o.state_dict() for s, o in pipeline.optimizers.items()}})


def _assert_bitwise(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_bitwise(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_bitwise(x, y)
    else:
        assert a == b


def test_clock_prices_events_hand_computed():
    events = Events(iterations=10, saves=2, failures=1, restores=1)
    # 10 x 1 + 2 x 0.25 + 1 x 0.5 + 1 x 0.75
    assert clock(events, iteration_cost=1.0, save_cost=0.25, downtime=0.5, restore_cost=0.75) == 11.75
    # redundant's iterations at 1.5 each: 15 + 0.5 + 0.5 + 0.75
    assert clock(events, iteration_cost=1.5, save_cost=0.25, downtime=0.5, restore_cost=0.75) == 16.75
    model = TimeModel(downtime=0.5, save_cost=0.25, restore_cost=0.75)
    assert model.time(events) == 11.75 and model.iteration_cost("checkfree+") == 1.0
    assert model.iteration_cost("redundant", 1.4) == 1.4
    assert TimeModel(redundant_cost=1.66).iteration_cost("redundant", 1.4) == 1.66
    # The defaults: 6 GB at 100 MB/s over a 91 s iteration, and the paper's 30 s recovery.
    paper = TimeModel()
    assert paper.save_cost == pytest.approx(60 / 91) and paper.restore_cost == pytest.approx(60 / 91)
    assert paper.downtime == pytest.approx(30 / 91)
    derived = TimeModel.from_numbers(state_bytes=2e9, storage_bytes_per_second=50e6, iteration_seconds=20.0,
                                     restore_cost=0.1)
    assert (derived.save_cost, derived.restore_cost, derived.downtime) == (2.0, 0.1, 1.5)


def test_young_daly_interval_hand_computed():
    assert mean_iterations_between_failures(0.5, 2) == pytest.approx(4 / 3)  # 1 / (1 - 0.5 ** 2)
    assert mean_iterations_between_failures(0.0, 4) == math.inf
    assert young_daly_interval(0.5, 100.0) == 10  # sqrt(2 x 0.5 x 100)
    assert young_daly_interval(0.66, 25.0) == 6  # sqrt(33) = 5.74
    assert young_daly_interval(0.0, 100.0) == 1
    # The defaults at 5%: p 0.0009, 4 stages, MTBF 1 / (1 - 0.9991 ** 4) = 278.2, sqrt(2 x 60/91 x 278.2) = 19.2
    config = ChurnConfig()
    assert checkpoint_interval("checkpoint-yd", 0.05, config) == 19
    assert checkpoint_interval("checkpoint", 0.05, config) == 20
    assert checkpoint_interval("checkfree", 0.05, config) is None


def test_paper_failure_table_and_fallback():
    assert PAPER_FAILURE_PROBABILITY == {0.05: 0.0009, 0.10: 0.002, 0.16: 0.004, 0.33: 0.01}
    for rate, p in PAPER_FAILURE_PROBABILITY.items():
        assert failure_probability(rate) == (p, "the paper's table")
    p, rule = failure_probability(0.2)
    assert p == pytest.approx(1 - 0.8 ** (91 / 3600)) and "3600" in rule
    assert failure_probability(0.2, 3600.0)[0] == pytest.approx(0.2)
    assert failure_probability(0.0)[0] == 0.0
    assert stage_failure_probability(RATE, _config())[0] == pytest.approx(RATE)
    with pytest.raises(ValueError):
        failure_probability(1.0)


def test_failure_pattern_is_shared_by_every_method(tmp_path):
    config = _config(steps=12, max_iterations_factor=1.0)
    schedule = churn_schedule(config, RATE)
    assert schedule == churn_schedule(config, RATE) and schedule
    dataset = TextDataset(TEXT, TINY.seq_len)
    seen = {}
    for method in ("checkfree", "checkfree+", "redundant", "random", "checkpoint", "checkpoint-yd"):
        result = run_sim(method, RATE, dataset, config, tmp_path, log=_quiet)
        seen[method] = [(f["iteration"], f["stages"]) for f in result.failures]
    expected = [(it, stages) for it, stages in schedule.items() if it <= config.max_iterations]
    for method, failures in seen.items():
        assert failures == expected[: len(failures)], method
        assert len(failures) == len(expected), method


def test_checkpoint_writes_files_and_restores_bitwise(tmp_path):
    dataset = TextDataset(TEXT, TINY.seq_len)
    pipeline = SimPipeline(TINY, "checkpoint")
    routes = [[1, 2, 3, 4]] * 2

    def next_batch():
        return dataset.sample_batch(4, batch_generator(0, pipeline.step + 1))

    for _ in range(3):
        pipeline.train_step(*next_batch(), routes)
    pipeline.save_checkpoint(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == [f"stage-{s}.pt" for s in range(5)]
    assert all((tmp_path / "ckpt" / f).stat().st_size > 0 for f in files)
    saved, batch_after_save = _state(pipeline), next_batch()
    for _ in range(2):
        pipeline.train_step(*next_batch(), routes)
    with torch.no_grad():
        pipeline.stages[2].blocks[0].attn.o.weight.fill_(7.0)  # the lost stage's weights are gone
    assert pipeline.load_checkpoint(tmp_path / "ckpt") == 3
    _assert_bitwise(_state(pipeline), saved)
    _assert_bitwise(next_batch(), batch_after_save)  # the redone steps see the same batches


def test_redundant_shadow_stays_equal_and_replaces_exactly():
    dataset = TextDataset(TEXT, TINY.seq_len)
    pipeline = SimPipeline(TINY, "redundant")
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        _, shadow_seconds = pipeline.train_step(*_batch(generator, dataset), [[1, 2, 3, 4]] * 2)
        assert shadow_seconds > 0
    for stage, model in pipeline.stages.items():
        _assert_bitwise(pipeline.shadows[stage].model.state_dict(), model.state_dict())
        _assert_bitwise(pipeline.shadows[stage].optimizer.state_dict()["state"],
                        pipeline.optimizers[stage].state_dict()["state"])
    before = copy.deepcopy(pipeline.stages[3].state_dict())
    with torch.no_grad():
        for p in pipeline.stages[3].parameters():
            p.fill_(0.5)  # stage 3 is lost
    assert pipeline.replace_from_shadows([3]) == ["3<-shadow on 2"]
    _assert_bitwise(pipeline.stages[3].state_dict(), before)
    pipeline.train_step(*_batch(generator, dataset), [[1, 2, 3, 4]] * 2)
    _assert_bitwise(pipeline.shadows[3].model.state_dict(), pipeline.stages[3].state_dict())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_with_failures(method, tmp_path):
    dataset = TextDataset(TEXT, TINY.seq_len)
    config = _config(spec=TINY.replace(refit_cache=4, refit_steps=10), time=MODEL)
    result = run_sim(method, RATE, dataset, config, tmp_path, log=_quiet)
    assert result.losses and all(math.isfinite(x) for x in result.losses)
    if method.endswith("+refit"):
        assert all(" refit " in f["recovery"][0] for f in result.failures), result.failures
    assert all(math.isfinite(v["val_loss"]) for v in result.val)
    assert result.times == sorted(result.times)
    for point in result.val:  # the recorded time is the clock of the recorded events
        assert point["time"] == clock(point_events(point), result.iteration_cost, 0.5, 0.5, 0.75)
    if method != "none":
        assert result.failures and result.costs["failures"] == len(result.failures)
    if method == "redundant":
        assert result.iteration_cost == result.measured["redundant_cost"] > 1.0
    else:
        assert result.iteration_cost == 1.0
    if method.startswith("checkpoint"):
        assert result.costs["restores"] == len(result.failures) and result.costs["saves"] > 0
        assert result.measured["local_save_cost"] > 0
        assert (tmp_path / "checkpoints" / f"{method}-rate{RATE:g}-seed3" / "stage-1.pt").is_file()
    else:
        assert result.costs["saves"] == result.costs["restores"] == 0


def test_sensitivity_recomputation_equals_the_runs_own_time(tmp_path):
    dataset = TextDataset(TEXT, TINY.seq_len)
    config = _config(steps=12, eval_every=1, time=TimeModel(downtime=0.5, save_cost=0.5, restore_cost=0.5,
                                                            iteration_seconds=3600.0))
    runs = {m: run_sim(m, RATE, dataset, config, tmp_path, log=_quiet) for m in ("checkpoint", "checkfree+")}
    # A target both reach after some failures, saves and restores.
    target = max(min(v["val_loss"] for v in r.val[6:]) for r in runs.values())
    for run in runs.values():
        hit = run.to_target(target)
        assert hit is not None and hit["iteration"] > 0
        assert time_to_target(run, target, 0.5, 0.5, 0.5) == hit["time"]
    ck, cf = (runs[m].to_target(target) for m in ("checkpoint", "checkfree+"))
    assert ck["saves"] > 0 and ck["restores"] > 0 and cf["failures"] > 0
    result = sensitivity(list(runs.values()), target, config.time)
    speedups = result["grid"][f"{RATE:g}"]["checkfree+"]["checkpoint"]["speedup"]
    assert speedups[result["downtimes"].index(0.5)][result["costs"].index(0.5)] == pytest.approx(
        ck["time"] / cf["time"])
    crossover = next(c for c in result["crossovers"] if c["method"] == "checkfree+")["crossover_save_cost"]
    at = time_to_target(runs["checkpoint"], target, crossover, 0.5, crossover)
    assert at == pytest.approx(time_to_target(runs["checkfree+"], target, 0.0, 0.5, 0.0))


def test_jobs_do_not_change_the_results(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_bytes(TEXT)
    config = _config(steps=20, eval_every=5, max_iterations_factor=1.25)
    rows = []
    for jobs in (1, 2):
        run_churn(["checkpoint", "checkfree"], [RATE], config, str(data), tmp_path / f"jobs{jobs}", log=_quiet,
                  seeds=[0], jobs=jobs)
        saved = json.loads((tmp_path / f"jobs{jobs}" / "results.json").read_text())
        rows.append(saved["rows"])
    assert [r["method"] for r in rows[0]] == ["none", "checkpoint", "checkfree"]
    assert rows[0] == rows[1]
    assert any(r["failures"] for r in rows[0])


def test_a_sweep_run_again_reuses_its_finished_runs_unless_its_settings_changed(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_bytes(TEXT)
    out = tmp_path / "out"
    first_lines: list[str] = []
    first = run_churn(["checkfree"], [RATE], _config(), str(data), out, log=first_lines.append, seeds=[0], jobs=1)
    saved = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert saved == ["checkfree-rate0.3-seed0.json", "none-rate0-seed0.json"]
    assert not any("reused" in line for line in first_lines)
    # The same command again (a sweep that was stopped and restarted): every run is reused, the report is the same.
    again_lines: list[str] = []
    again = run_churn(["checkfree"], [RATE], _config(), str(data), out, log=again_lines.append, seeds=[0], jobs=1)
    assert sum("reused from" in line for line in again_lines) == 2
    assert again["rows"] == first["rows"] and again["runs"] == first["runs"]
    # --fresh runs them again; other settings (more steps) or another corpus never reuse a saved run.
    fresh_lines: list[str] = []
    run_churn(["checkfree"], [RATE], _config(), str(data), out, log=fresh_lines.append, seeds=[0], jobs=1,
              reuse=False)
    assert not any("reused" in line for line in fresh_lines)
    changed_lines: list[str] = []
    run_churn(["checkfree"], [RATE], _config(steps=6), str(data), out, log=changed_lines.append, seeds=[0], jobs=1)
    assert not any("reused" in line for line in changed_lines)
    data.write_bytes(TEXT + b" The end.")
    other_lines: list[str] = []
    run_churn(["checkfree"], [RATE], _config(steps=6), str(data), out, log=other_lines.append, seeds=[0], jobs=1)
    assert not any("reused" in line for line in other_lines)
    # A damaged file is not trusted: the run is made again.
    (out / "runs" / "none-rate0-seed0.json").write_text("{not json")
    damaged_lines: list[str] = []
    run_churn(["checkfree"], [RATE], _config(steps=6), str(data), out, log=damaged_lines.append, seeds=[0], jobs=1)
    assert sum("reused from" in line for line in damaged_lines) == 1


def test_without_matplotlib_table_and_json_are_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    lines = []
    run_churn(["none", "checkfree"], [RATE], _config(), None, tmp_path, log=lines.append, seeds=[0], jobs=1,
              target=100.0)
    assert (tmp_path / "table.md").stat().st_size > 0 and (tmp_path / "results.json").stat().st_size > 0
    assert not list(tmp_path.glob("*.png"))
    assert PLOTS_HINT in lines and "pip install cfnode[bench]" in PLOTS_HINT
    assert json.loads((tmp_path / "results.json").read_text())["plots"] == []


def test_run_churn_and_cli_write_table_plots_and_json(tmp_path):
    pytest.importorskip("matplotlib")
    data = tmp_path / "tiny.txt"
    data.write_bytes(TEXT)
    document = run_churn(["none", "checkfree+"], [RATE], _config(), str(data), tmp_path / "a", log=_quiet,
                         seeds=[0, 1])
    assert {(row["method"], row["seed"]) for row in document["rows"]} == {
        ("none", 0), ("none", 1), ("checkfree+", 0), ("checkfree+", 1)}
    assert [(row["method"], row["seeds"]) for row in document["summary"]] == [("none", [0, 1]),
                                                                              ("checkfree+", [0, 1])]
    result = CliRunner().invoke(main, ["bench", "churn", "--methods", "none,checkpoint,checkfree", "--failure-rates",
                                       "0.1", "--steps", "3", "--data", str(data), "--out", str(tmp_path / "b"),
                                       "--hidden", "16", "--heads", "2", "--layers-per-stage", "1", "--seq-len", "16",
                                       "--batch-size", "4", "--eval-every", "1", "--target-loss", "100", "--seeds",
                                       "0", "--jobs", "1", "--save-cost", "0.3", "--downtime", "0.2"])
    assert result.exit_code == 0, result.output
    for name in ("table.md", "results.json", "churn-loss-step.png", "churn-loss-time.png", "churn-crossover.png"):
        assert (tmp_path / "b" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["target"] == 100 and all(row["iterations_to_target"] == 0 for row in saved["rows"])
    assert saved["time_model"]["save_cost"] == 0.3 and saved["time_model"]["downtime"] == 0.2
    assert saved["failure_model"]["per_rate"]["0.1"]["p"] == 0.002
    assert "p = 0.00200 per stage per iteration (the paper's table)" in result.output
    bad = CliRunner().invoke(main, ["bench", "churn", "--methods", "bogus"])
    assert bad.exit_code != 0
    gone = CliRunner().invoke(main, ["bench", "churn", "--step-hours", "0.1"])
    assert gone.exit_code != 0 and "No such option" in gone.output


def test_swarm_backend_kills_on_the_same_schedule_and_states_its_tolerance(tmp_path, monkeypatch):
    import cfnode.launcher

    seen = {}

    class FakeSwarm:
        """Stands in for the real processes: logs the steps the trainer would, one stage loss per kill."""

        def __init__(self, layout):
            self.layout = layout

        def run(self) -> int:
            seen["kills"] = self.layout.kills
            kills = {step for _, step in self.layout.kills}
            with open(self.layout.log_jsonl, "w") as f:
                for step in range(1, self.layout.steps + 1):
                    if step in kills:
                        f.write(json.dumps({"event": "stage_lost", "step": step, "stage": 1}) + "\n")
                    f.write(json.dumps({"event": "step", "step": step, "step_time": 0.5, "loss": 4.0,
                                        "val_loss": 4.0}) + "\n")
            return 0

    monkeypatch.setattr(cfnode.launcher, "LocalSwarm", FakeSwarm)
    config = _config(steps=6, eval_every=1)
    lines = []
    document = run_churn(["checkfree"], [RATE], config, None, tmp_path, backend="swarm", log=lines.append,
                         seeds=[0], target=100.0)
    schedule = churn_schedule(config.with_seed(0), RATE)
    assert seen["kills"] == [(s, it) for it, stages in schedule.items() if it < 6 for s in stages]
    assert [(r["backend"], r["method"]) for r in document["rows"]] == [("swarm", "checkfree"), ("sim", "checkfree")]
    [comparison] = document["swarm_vs_sim"]
    assert comparison["tolerance"] == 0.15 and comparison["shared_evaluations"] == 6
    assert any("tolerance 0.15" in line for line in lines)

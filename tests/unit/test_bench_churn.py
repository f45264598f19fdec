import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner

from cfnode.bench.churn import ChurnConfig, churn_schedule, run_churn, run_sim, step_failure_probability
from cfnode.bench.sim import METHODS, SimPipeline
from cfnode.cli import main
from cfnode.config import RunSpec
from cfnode.data import TextDataset, batch_generator

TINY = RunSpec(num_stages=4, layers_per_stage=1, hidden_size=16, num_heads=2, seq_len=16)
TEXT = ("Once upon a time there was a small robot who liked to count the stars. " * 60).encode()


@pytest.fixture(autouse=True)
def one_thread():
    # Several torch threads on a loaded shared machine can make these tiny steps a hundred times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**changes) -> ChurnConfig:
    values = dict(spec=TINY, steps=5, batch_size=4, microbatches=2, eval_every=2, eval_batches=2, step_hours=50.0,
                  rejoin_seconds=1.0, checkpoint_every=2, max_iterations_factor=2.0, seed=3)
    values.update(changes)
    return ChurnConfig(**values)


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


def test_failure_probability_and_pattern_are_shared_by_every_method(tmp_path):
    assert step_failure_probability(0.0, 0.1) == 0.0
    assert step_failure_probability(0.05, 1.0) == pytest.approx(0.05)
    assert step_failure_probability(0.05, 0.1) == pytest.approx(1 - 0.95 ** 0.1)
    config = _config(step_hours=1.0, steps=20, max_iterations_factor=1.0)
    schedule = churn_schedule(config, 0.16)
    assert schedule == churn_schedule(config, 0.16) and schedule
    dataset = TextDataset(TEXT, TINY.seq_len)
    seen = {}
    for method in ("checkfree", "checkfree+", "redundant", "random", "checkpoint"):
        result = run_sim(method, 0.16, dataset, config, tmp_path, log=lambda _: None)
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
    result = run_sim(method, 0.16, dataset, _config(spec=TINY.replace(refit_cache=4, refit_steps=10)), tmp_path,
                     log=lambda _: None)
    assert result.losses and all(math.isfinite(x) for x in result.losses)
    if method.endswith("+refit"):
        assert all(" refit " in f["recovery"][0] for f in result.failures), result.failures
    assert all(math.isfinite(v["val_loss"]) for v in result.val)
    assert result.times == sorted(result.times)
    if method != "none":
        assert result.failures  # p is near 1 at 50 hours per step
        assert result.costs["rejoin"] == pytest.approx(len(result.failures) * 1.0)
    if method == "checkpoint":
        assert (tmp_path / "checkpoints" / "checkpoint-rate0.16" / "stage-1.pt").is_file()


def test_run_churn_and_cli_write_table_plots_and_json(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_bytes(TEXT)
    document = run_churn(["none", "checkfree+"], [0.16], _config(), str(data), tmp_path / "a", log=lambda _: None)
    assert {row["method"] for row in document["rows"]} == {"none", "checkfree+"}
    result = CliRunner().invoke(main, ["bench", "churn", "--methods", "none,checkfree", "--failure-rates", "0.1",
                                       "--steps", "3", "--data", str(data), "--out", str(tmp_path / "b"),
                                       "--hidden", "16", "--seq-len", "16", "--batch-size", "4", "--eval-every", "1",
                                       "--target-loss", "100"])
    assert result.exit_code == 0, result.output
    for name in ("table.md", "results.json", "churn-loss-step.png", "churn-loss-time.png"):
        assert (tmp_path / "b" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["target"] == 100 and all(row["iterations_to_target"] == 0 for row in saved["rows"])
    bad = CliRunner().invoke(main, ["bench", "churn", "--methods", "bogus"])
    assert bad.exit_code != 0

"""`cfnode bench churn`: time to a target validation loss under stage failures, per recovery method and failure rate.

A reproduction, at CPU scale, of Table 2 of "All is Not Lost: LLM Recovery without Checkpoints" (arXiv 2506.15461):
checkpointing (at the paper's interval and at the Young-Daly one), redundant computation, CheckFree and CheckFree+
(and the ablations uniform, copy, random and the +refit variants), under the same failures, over several seeds.

Failures. The per-stage per-iteration failure probability p for an hourly rate is the paper's own
(`cfnode.bench.time_model.failure_probability`), drawn with `failure_schedule(S, horizon, p, seed)`. The pattern is
indexed by executed iteration (a step redone after a checkpoint rollback is a new iteration and can fail again), and
it is the same for every method for one (seed, rate). A failure at iteration k hits after step k is applied.

Time. Counted in plain iterations with the paper's costs (`cfnode.bench.time_model`): each run records its events
(executed iterations, checkpoint saves, failure events, restores) at every evaluation, and `clock` prices them.
Measured wall seconds are recorded beside, for information. Validation is not on either clock.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cfnode.bench.churn_report import (
    PLOTS_HINT,
    TARGET_FRACTION,
    RunResult,
    aggregate,
    default_target,
    describe_crossovers,
    format_spread,
    matplotlib_available,
    plot,
    point_events,
    render_table,
    sensitivity,
    spread_of,
    summarise,
)
from cfnode.bench.sim import METHODS, SimPipeline, recovery_mode
from cfnode.bench.time_model import (
    PAPER_CHECKPOINT_EVERY,
    PAPER_REDUNDANT_COST,
    Events,
    TimeModel,
    failure_probability,
    mean_iterations_between_failures,
    young_daly_interval,
)
from cfnode.config import RECOVERY_MODES, RunSpec
from cfnode.data import TextDataset, batch_generator, load_corpus
from cfnode.recovery.failures import failure_schedule
from cfnode.recovery.schedule import microbatch_routes

DEFAULT_RATES = (0.05, 0.10, 0.16)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_METHODS = ("none", "checkpoint", "checkpoint-yd", "redundant", "checkfree", "checkfree+", "checkfree+refit",
                   "checkfree++refit")
# The paper's shape at CPU scale: 4 stages of 3 blocks (the paper's 500M model: 6 x 4, d_model 1024).
DEFAULT_SPEC = RunSpec(num_stages=4, layers_per_stage=3, hidden_size=32, num_heads=4, seq_len=32)
# swarm vs sim: the largest validation-loss gap the comparison accepts. Without failures both run the same code on
# the same batches (the JSONL rounds to 5 decimals); with them a live kill lands while the trainer is in the next
# step, so a newcomer may copy its neighbours a step later (docs/benchmarks.md measured gaps up to ~0.1).
SWARM_TOLERANCE = {"none": 1e-4, "failures": 0.15}


@dataclass
class ChurnConfig:
    spec: RunSpec = DEFAULT_SPEC
    # 600 steps, not 2000: the default sweep (3 seeds x 3 rates x 7 methods + 3 references) must fit in ~40 min on
    # 2 cores, and a step costs ~0.09 s at any width this small (overhead-bound); evaluations every 25 steps keep the
    # time to target's granularity at ~5% of the 450-step target.
    steps: int = 600
    batch_size: int = 8
    microbatches: int = 2
    eval_every: int = 25
    eval_batches: int = 4
    time: TimeModel = field(default_factory=TimeModel)
    checkpoint_every: int = PAPER_CHECKPOINT_EVERY  # method checkpoint; checkpoint-yd computes its own
    max_iterations_factor: float = 3.0  # checkpointing may redo steps: stop after this many times --steps iterations
    seed: int = 0  # of one run: failures, data order and (through spec.seed) weights
    threads: int = 1  # torch threads per process: one keeps step times steady on a shared machine

    @property
    def max_iterations(self) -> int:
        return max(self.steps, int(math.ceil(self.steps * self.max_iterations_factor)))

    def with_seed(self, seed: int) -> ChurnConfig:
        return replace(self, seed=seed, spec=self.spec.replace(seed=seed))


def stage_failure_probability(rate: float, config: ChurnConfig) -> tuple[float, str]:
    """(p per stage per iteration, the rule that gave it)."""
    return failure_probability(rate, config.time.iteration_seconds)


def churn_schedule(config: ChurnConfig, rate: float) -> dict[int, list[int]]:
    """iteration -> stages lost after it; the same for every method for a (seed, rate)."""
    p, _ = stage_failure_probability(rate, config)
    return failure_schedule(config.spec.num_stages, config.max_iterations, p, config.seed)


def checkpoint_interval(method: str, rate: float, config: ChurnConfig) -> int | None:
    """Iterations between saves: the fixed interval, the Young-Daly one for the rate, or None (no checkpoints)."""
    if method == "checkpoint":
        return config.checkpoint_every
    if method == "checkpoint-yd":
        p, _ = stage_failure_probability(rate, config)
        return young_daly_interval(config.time.save_cost, mean_iterations_between_failures(p, config.spec.num_stages))
    return None


def run_sim(method: str, rate: float, dataset: TextDataset, config: ChurnConfig, workdir: Path,
            log: Callable[[str], None] = print, target: float | None = None) -> RunResult:
    """Train `config.steps` steps with `method`, losing stages on the (seed, rate) schedule; with a target, go on
    until the validation loss reaches it, at most `config.max_iterations` iterations in all."""
    mode, _ = recovery_mode(method)
    spec = config.spec.replace(recovery=mode if mode in RECOVERY_MODES else "none")
    schedule = churn_schedule(config, rate) if method != "none" else {}
    every = checkpoint_interval(method, rate, config)
    torch.manual_seed(config.seed)  # nothing here should draw from the global RNG; if something does, it is seeded
    pipeline = SimPipeline(spec, method)
    routes = microbatch_routes(spec.num_stages, config.microbatches, mode, spec.swap_fraction)
    result = RunResult(method, rate if method != "none" else 0.0, seed=config.seed, checkpoint_every=every)
    costs = dict(compute=0.0, shadow_compute=0.0, checkpoint_save=0.0, checkpoint_load=0.0, rebuild=0.0,
                 redone_steps=0.0)
    counts = dict(saves=0, failures=0, restores=0)
    per_iteration: list[Events] = []
    checkpoint_dir = workdir / "checkpoints" / f"{method}-rate{rate:g}-seed{config.seed}"
    iteration, wall, started = 0, 0.0, time.perf_counter()

    def evaluate() -> None:
        loss = pipeline.evaluate(dataset, config.batch_size, config.eval_batches)
        result.val.append(dict(iteration=iteration, step=pipeline.step, **counts, wall=round(wall, 5), val_loss=loss))

    if every is not None:
        # Not on the clock: step 0's weights derive from the seed, so a rollback to it needs no file (as the paper's
        # simulation rolls back to 0); the file keeps the restore code path the same.
        pipeline.save_checkpoint(checkpoint_dir)
    evaluate()

    def more() -> bool:
        reached = target is not None and any(v["val_loss"] <= target for v in result.val)
        return pipeline.step < config.steps or (target is not None and not reached)

    while more() and iteration < config.max_iterations:
        inputs, targets = dataset.sample_batch(config.batch_size, batch_generator(config.seed, pipeline.step + 1))
        t = time.perf_counter()
        loss, shadow_seconds = pipeline.train_step(inputs, targets, routes)
        seconds = time.perf_counter() - t
        iteration += 1
        wall += seconds
        costs["compute"] += seconds
        costs["shadow_compute"] += shadow_seconds
        if every is not None and pipeline.step % every == 0:
            t = time.perf_counter()
            pipeline.save_checkpoint(checkpoint_dir)
            elapsed = time.perf_counter() - t
            wall += elapsed
            costs["checkpoint_save"] += elapsed
            counts["saves"] += 1
        lost = schedule.get(iteration)
        if lost:
            before = pipeline.step
            counts["failures"] += 1
            t = time.perf_counter()
            if every is not None:
                pipeline.load_checkpoint(checkpoint_dir)
                what = [f"all stages <- checkpoint at step {pipeline.step}"]
                key = "checkpoint_load"
                costs["redone_steps"] += before - pipeline.step
                counts["restores"] += 1
            elif method == "redundant":
                what, key = pipeline.replace_from_shadows(lost), "rebuild"
            else:
                what, key = pipeline.rebuild(lost), "rebuild"
            elapsed = time.perf_counter() - t
            costs[key] += elapsed
            wall += elapsed
            result.failures.append(dict(iteration=iteration, step=before, stages=lost, recovery=what,
                                        seconds=round(elapsed, 5)))
        per_iteration.append(Events(iteration, **counts))
        result.iterations.append(iteration)
        result.steps.append(pipeline.step)
        result.losses.append(loss)
        result.step_seconds.append(seconds)
        if iteration % config.eval_every == 0 or (pipeline.step >= config.steps and not more()) \
                or iteration >= config.max_iterations:
            evaluate()
    if more():
        short = "the target" if target is not None else "its steps"
        log(f"  {method} at rate {rate:g}, seed {config.seed}: stopped after {iteration} iterations at step "
            f"{pipeline.step} (cap {config.max_iterations}), short of {short}")
    # The clock is priced once the run is over: redundant's iteration cost is its measured ratio over the whole run.
    plain = costs["compute"] - costs["shadow_compute"]
    if method == "redundant" and plain > 0:
        result.measured["redundant_cost"] = costs["compute"] / plain
    if iteration and plain > 0:
        per_plain = plain / iteration
        result.measured["plain_iteration_seconds"] = per_plain
        if every is not None:
            result.measured["checkpoint_bytes"] = sum(f.stat().st_size for f in checkpoint_dir.glob("stage-*.pt"))
        if counts["saves"]:
            result.measured["local_save_cost_seconds"] = costs["checkpoint_save"] / counts["saves"]
            result.measured["local_save_cost"] = result.measured["local_save_cost_seconds"] / per_plain
        if counts["restores"]:
            result.measured["local_restore_cost_seconds"] = costs["checkpoint_load"] / counts["restores"]
            result.measured["local_restore_cost"] = result.measured["local_restore_cost_seconds"] / per_plain
        if counts["failures"] and every is None:
            # The rebuild (and refit) work per failure; the model charges the same downtime to every method.
            result.measured["local_recovery_cost"] = costs["rebuild"] / counts["failures"] / per_plain
    result.iteration_cost = config.time.iteration_cost(method, result.measured.get("redundant_cost", 1.0))
    result.times = [round(config.time.time(e, result.iteration_cost), 5) for e in per_iteration]
    for point in result.val:
        point["time"] = config.time.time(point_events(point), result.iteration_cost)
    result.costs = {**{k: round(v, 5) for k, v in costs.items()}, **counts}
    result.wall_seconds = time.perf_counter() - started
    return result


def run_swarm(method: str, rate: float, config: ChurnConfig, data_path: str | None, workdir: Path,
              log: Callable[[str], None] = print) -> RunResult:
    """The same run on real processes on 127.0.0.1: LocalSwarm, its peers SIGKILLed on the same schedule."""
    from cfnode.launcher import LocalSwarm, SwarmLayout

    mode, refits = recovery_mode(method)
    if mode not in RECOVERY_MODES:
        raise ValueError(f"the swarm backend runs the live recovery modes ({', '.join(RECOVERY_MODES)}) and their "
                         f"+refit variants; {method!r} exists only in the sim")
    spec = config.spec.replace(recovery=mode, run_id="bench", refit_cache=config.spec.refit_cache if refits else 0)
    schedule = churn_schedule(config, rate) if method != "none" else {}
    # The trainer never reaches a step past --steps, and a kill after the last step would hit nothing.
    kills = [(stage, it) for it, stages in schedule.items() if it < config.steps for stage in stages]
    run_dir = workdir / f"swarm-{method}-rate{rate:g}-seed{config.seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    events = run_dir / "events.jsonl"
    events.unlink(missing_ok=True)
    layout = SwarmLayout(spec=spec, steps=config.steps, data_path=data_path, log_jsonl=str(events),
                         batch_size=config.batch_size, microbatches=config.microbatches, workdir=run_dir,
                         # info: LocalSwarm finds a peer's stage from its "joining stage N" log line to kill it
                         log_level="info", kills=kills,
                         train_args=["--eval-every", str(config.eval_every), "--seed", str(config.seed)])
    log(f"  swarm: {spec.num_stages} stages, {len(kills)} kill(s) at {kills}; logs in {run_dir}")
    started = time.perf_counter()
    code = LocalSwarm(layout).run()
    if code != 0:
        raise RuntimeError(f"the swarm's trainer exited with status {code}; see {run_dir}")
    result = RunResult(method, rate if method != "none" else 0.0, seed=config.seed, backend="swarm")
    wall = 0.0
    for line in events.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "stage_lost":
            result.failures.append(dict(step=event.get("step"), stages=[event.get("stage")]))
        if event.get("event") != "step":
            continue
        wall += float(event["step_time"])
        step = int(event["step"])
        # The live run has no checkpoints and no rollbacks: its events are steps and the stage losses so far.
        now = config.time.time(Events(iterations=step, failures=len(result.failures)))
        result.iterations.append(step)
        result.steps.append(step)
        result.times.append(round(now, 5))
        result.losses.append(float(event["loss"]))
        result.step_seconds.append(float(event["step_time"]))
        if "val_loss" in event:
            result.val.append(dict(iteration=step, step=step, saves=0, failures=len(result.failures), restores=0,
                                   time=now, wall=round(wall, 5), val_loss=float(event["val_loss"])))
    result.costs = {"compute": round(wall, 5)}
    result.wall_seconds = time.perf_counter() - started
    return result


# --- running many runs, in parallel processes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    method: str
    rate: float
    seed: int
    target: float | None


_WORKER: dict[str, Any] = {}


def _exit_with_parent(parent: int) -> None:
    """A worker's watchdog: a sweep killed outright (SIGTERM, SIGKILL) cannot stop its workers, which would go on
    computing runs nobody collects; each leaves once its parent is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _init_worker(corpus: bytes, config: ChurnConfig, workdir: Path, reuse: bool = True,
                 parent: int | None = None) -> None:
    torch.set_num_threads(config.threads)
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="exit-with-parent").start()
    _WORKER.update(dataset=TextDataset(corpus, config.spec.seq_len), config=config, workdir=workdir, reuse=reuse,
                   corpus_sha256=hashlib.sha256(corpus).hexdigest())


def run_fingerprint(task: Task, config: ChurnConfig, corpus_sha256: str) -> str:
    """What a sim run's result depends on: its task, the whole configuration and the corpus."""
    return json.dumps({"task": asdict(task), "config": asdict(config.with_seed(task.seed)), "corpus": corpus_sha256,
                       "version": 1}, sort_keys=True, default=str)


def saved_run_path(workdir: Path, task: Task) -> Path:
    return workdir / "runs" / f"{task.method}-rate{task.rate:g}-seed{task.seed}.json"


def _load_saved_run(path: Path, fingerprint: str) -> RunResult | None:
    """A finished run saved by an earlier sweep with the same fingerprint, else None (missing, other settings, or a
    file that does not parse: the run is made again)."""
    try:
        saved = json.loads(path.read_text())
        return RunResult(**saved["result"]) if saved.get("fingerprint") == fingerprint else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_task(task: Task) -> tuple[RunResult, list[str]]:
    """One sim run in a worker (or in this process with --jobs 1): the same function, so N cannot change a result.

    Each finished run is saved under OUT/runs/, so a sweep that was stopped (hours of runs at the paper's shape)
    picks up where it was: a saved run with the same fingerprint is reused, unless the sweep runs with --fresh."""
    lines: list[str] = []
    started = time.perf_counter()
    config = _WORKER["config"].with_seed(task.seed)
    path = saved_run_path(_WORKER["workdir"], task)
    fingerprint = run_fingerprint(task, _WORKER["config"], _WORKER["corpus_sha256"])
    result = _load_saved_run(path, fingerprint) if _WORKER["reuse"] else None
    if result is None:
        result = run_sim(task.method, task.rate, _WORKER["dataset"], config, _WORKER["workdir"], log=lines.append,
                         target=task.target)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"fingerprint": fingerprint, "result": asdict(result)}))
        os.replace(temporary, path)
        ran = f"ran {time.perf_counter() - started:.1f} s"
    else:
        ran = f"reused from {path} (ran {result.wall_seconds:.1f} s; --fresh runs it again)"
    lines.append(f"  {task.method:<16} rate {result.rate:<5g} seed {task.seed}: {len(result.failures):>3} failures, "
                 f"final val {result.final_val:.4f}, model time {result.times[-1] if result.times else 0:.1f} it, "
                 f"{ran}")
    return result, lines


# Long runs first, so the last one to finish is a short one (the order results are kept in does not change).
_EXPECTED_COST = {"redundant": 0, "checkfree++refit": 1, "checkfree+refit": 1, "copy+refit": 1, "checkpoint": 2,
                  "checkpoint-yd": 2}


class Runner:
    """Runs tasks in this process (jobs 1) or in `jobs` spawned processes; returns results in the tasks' order."""

    def __init__(self, jobs: int, corpus: bytes, config: ChurnConfig, workdir: Path, log: Callable[[str], None],
                 reuse: bool = True):
        self.jobs, self.log = jobs, log
        self.pool: ProcessPoolExecutor | None = None
        if jobs > 1:
            # spawn: a fork of a process that has run torch can deadlock, and each child sets its own threads
            self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker,
                                            initargs=(corpus, config, workdir, reuse, os.getpid()))
        else:
            _init_worker(corpus, config, workdir, reuse)

    def run(self, tasks: Sequence[Task]) -> list[RunResult]:
        if self.pool is None:
            results = []
            for task in tasks:
                result, lines = _run_task(task)
                for line in lines:
                    self.log(line)
                results.append(result)
            return results
        order = sorted(range(len(tasks)), key=lambda i: _EXPECTED_COST.get(tasks[i].method, 3))
        futures = {i: self.pool.submit(_run_task, tasks[i]) for i in order}
        for i in order:
            for line in futures[i].result()[1]:
                self.log(line)
        return [futures[i].result()[0] for i in range(len(tasks))]

    def close(self, cancel: bool = False) -> None:
        """Stop the workers; with cancel (a run failed), drop the runs not started rather than wait for them."""
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=cancel)
            self.pool = None


def default_jobs() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --- the whole benchmark -----------------------------------------------------------------------------------------


def _compare_swarm(results: Sequence[RunResult], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each swarm run against the sim run of the same method, rate, seed and steps: the largest validation-loss gap
    over their shared evaluations, against the stated tolerance."""
    comparisons = []
    for swarm_run in (r for r in results if r.backend == "swarm"):
        sim_run = next(r for r in results if r.backend == "sim" and (r.method, r.rate, r.seed)
                       == (swarm_run.method, swarm_run.rate, swarm_run.seed))
        sim_val = {v["step"]: v["val_loss"] for v in sim_run.val}
        common = [(v["val_loss"], sim_val[v["step"]]) for v in swarm_run.val if v["step"] in sim_val]
        gap = max((abs(a - b) for a, b in common), default=float("nan"))
        tolerance = SWARM_TOLERANCE["none" if swarm_run.method == "none" else "failures"]
        within = bool(common) and gap <= tolerance
        why = ("no failures: the same code on the same batches" if swarm_run.method == "none"
               else "a live kill lands a step later than in the sim")
        log(f"swarm vs sim ({swarm_run.method}, rate {swarm_run.rate:g}, seed {swarm_run.seed}): final val "
            f"{swarm_run.final_val:.4f} vs {sim_run.final_val:.4f}; largest gap over {len(common)} shared evaluations "
            f"{gap:.4f}, tolerance {tolerance:g} ({'within' if within else 'EXCEEDED'}; {why})")
        comparisons.append(dict(method=swarm_run.method, rate=swarm_run.rate, seed=swarm_run.seed, gap=gap,
                                shared_evaluations=len(common), tolerance=tolerance, within=within))
    return comparisons


def _measured_lines(results: Sequence[RunResult], model: TimeModel) -> tuple[list[str], dict[str, Any]]:
    """What was measured, beside what the model charges."""
    sims = [r for r in results if r.backend == "sim"]
    measured: dict[str, Any] = {}
    lines = []
    ratios = [r.measured["redundant_cost"] for r in sims if "redundant_cost" in r.measured]
    if ratios:
        measured["redundant_cost"] = spread_of(ratios)
        used = (f"imposed {model.redundant_cost:.3f}" if model.redundant_cost is not None
                else "each run's own ratio is its iteration cost")
        lines.append(f"redundant's iteration, measured (compute + shadow compute) / compute: "
                     f"{format_spread(measured['redundant_cost'], 3)} over {len(ratios)} runs ({used}); "
                     f"the paper's 151/91 = {PAPER_REDUNDANT_COST:.2f}")
    for key, modelled, what in (("local_save_cost", model.save_cost, "save"),
                                ("local_restore_cost", model.restore_cost, "load (restore)")):
        values = [r.measured[key] for r in sims if key in r.measured]
        if values:
            measured[key] = spread_of(values)
            with_key = [r for r in sims if key in r.measured]
            seconds = statistics.mean(r.measured[f"{key}_seconds"] for r in with_key)
            size = statistics.mean(r.measured.get("checkpoint_bytes", 0) for r in with_key)
            iteration = statistics.mean(r.measured["plain_iteration_seconds"] for r in with_key)
            lines.append(f"local torch.{what} of every stage, measured: {format_spread(measured[key], 3)} iteration "
                         f"each, {seconds * 1000:.0f} ms for {size / 1e6:.2f} MB on a local disk: nearly free in "
                         f"itself, a visible fraction only of our {iteration * 1000:.0f} ms iteration (the paper's "
                         f"{model.state_bytes / 1e9:g} GB at {model.storage_bytes_per_second / 1e6:g} MB/s: "
                         f"{model.state_bytes / model.storage_bytes_per_second:.0f} s); the model charges "
                         f"{modelled:.3f}")
    recovery = {}
    for method in dict.fromkeys(r.method for r in sims):
        values = [r.measured["local_recovery_cost"] for r in sims if r.method == method
                  and "local_recovery_cost" in r.measured]
        if values:
            recovery[method] = spread_of(values)
    if recovery:
        measured["local_recovery_cost"] = recovery
        lines.append("rebuild (+ refit) work per failure, measured in plain iterations (not on the clock: every "
                     f"method is charged the downtime, {model.downtime:.3f}): "
                     + ", ".join(f"{m} {format_spread(v, 3)}" for m, v in recovery.items()))
    medians = {}
    for method in dict.fromkeys(r.method for r in sims):
        seconds = [s for r in sims if r.method == method for s in r.step_seconds]
        if seconds:
            medians[method] = statistics.median(seconds)
    measured["median_step_seconds"] = medians
    measured["wall_seconds"] = {f"{r.method} rate {r.rate:g} seed {r.seed}": round(r.wall_seconds, 2) for r in sims}
    if medians:
        lines.append("median measured step (s, for information, not on the clock): "
                     + ", ".join(f"{m} {s:.4f}" for m, s in medians.items()))
    return lines, measured


def run_churn(methods: Sequence[str], rates: Sequence[float], config: ChurnConfig, data_path: str | None,
              out: Path, backend: str = "sim", target: float | None = None, log: Callable[[str], None] = print,
              seeds: Sequence[int] | None = None, jobs: int = 1, reuse: bool = True) -> dict[str, Any]:
    """The whole benchmark: runs, table, plots and raw JSON under `out`. Returns the JSON document."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if backend not in ("sim", "swarm"):
        raise ValueError(f"backend must be sim or swarm, got {backend!r}")
    seeds = list(seeds) if seeds is not None else [config.seed]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    corpus = load_corpus(data_path)
    model = config.time
    log(f"churn bench: backend {backend}, {config.spec.num_stages} stages x {config.spec.layers_per_stage} layer(s), "
        f"hidden {config.spec.hidden_size}, {config.spec.num_heads} heads, seq_len {config.spec.seq_len}, batch "
        f"{config.batch_size} in {config.microbatches} microbatches, {config.steps} steps (at most "
        f"{config.max_iterations} iterations), eval every {config.eval_every} on {config.eval_batches} batches, seeds "
        f"{seeds}, {jobs} job(s) x {config.threads} torch thread(s); data {data_path or 'built-in corpus'}")
    for line in model.describe():
        log(f"  {line}")
    failure_model = {}
    for rate in rates:
        p, rule = stage_failure_probability(rate, config)
        mtbf = mean_iterations_between_failures(p, config.spec.num_stages)
        yd = checkpoint_interval("checkpoint-yd", rate, config)
        counts = [sum(1 for i in churn_schedule(config.with_seed(s), rate) if i <= config.steps) for s in seeds]
        failure_model[f"{rate:g}"] = dict(p=p, rule=rule, mtbf_iterations=mtbf, young_daly_interval=yd,
                                          failure_events_in_steps=dict(zip(seeds, counts)))
        log(f"  rate {rate * 100:g}%/h: p = {p:.5f} per stage per iteration ({rule}); MTBF {mtbf:.1f} iterations "
            f"for {config.spec.num_stages} stages; checkpoint every {config.checkpoint_every} (the paper's code) or "
            f"{yd} (Young-Daly, sqrt(2 x {model.save_cost:.3f} x MTBF)); failure events in the first {config.steps} "
            f"iterations per seed: {counts}")

    runner = Runner(jobs if backend == "sim" else 1, corpus, config, out, log, reuse=reuse and backend == "sim")
    results: list[RunResult] = []
    try:
        given_target = target
        failing = [Task(m, r, s, None) for r in rates for m in methods if m != "none" for s in seeds]
        reference = [Task("none", 0.0, s, given_target) for s in seeds] if (
            "none" in methods or given_target is None) else []
        if given_target is None:
            # The target comes from the no-failure runs, so they run first, in the sim, for --steps steps.
            results += runner.run(reference)
            per_seed = {r.seed: default_target(r) for r in results}
            target = statistics.mean(per_seed.values())
            each = ", ".join(f"seed {s}: {v:.4f}" for s, v in per_seed.items())
            log(f"  target validation loss {target:.4f}: the mean over seeds of the no-failure runs' validation loss "
                f"at {TARGET_FRACTION:.0%} of their steps ({each})")
            reference = [t for t in reference if backend == "swarm" and "none" in methods]
        failing = [replace(t, target=target) for t in failing]
        if backend == "swarm":
            # One swarm at a time: each is a bootstrap, a peer per stage and a trainer on this machine.
            dataset = TextDataset(corpus, config.spec.seq_len)
            for task in reference + failing:
                if task.method not in RECOVERY_MODES:
                    results += runner.run([task])
                    continue
                seeded = config.with_seed(task.seed)
                results.append(run_swarm(task.method, task.rate, seeded, data_path, out, log))
                # The same run in the sim (same steps, no running on to the target), to compare with it; the
                # no-failure one may have run already, for the target.
                key = (task.method, task.rate if task.method != "none" else 0.0, task.seed)
                if not any(r.backend == "sim" and (r.method, r.rate, r.seed) == key for r in results):
                    results.append(run_sim(task.method, task.rate, dataset, seeded, out, log))
        else:
            results += runner.run(reference + failing)
    except BaseException:
        runner.close(cancel=True)
        raise
    runner.close()
    assert target is not None
    rows = summarise(results, target)
    summary = aggregate(results, target)
    sens = sensitivity(results, target, model)
    measured_lines, measured = _measured_lines(results, model)
    target_rule = ("given (--target-loss)" if given_target is not None else
                   f"the mean over seeds of the no-failure runs' validation loss at {TARGET_FRACTION:.0%} of their "
                   "steps")
    header = [f"target validation loss: {target:.4f} ({target_rule})", "",
              "Time in iterations of the time model; iterations include redone ones. Cells: mean over seeds "
              "(min..max). vs X: X's time to target / this method's, as the ratio of the means over the seeds where "
              "both reached it (the per-seed ratios' min..max); above 1 = faster than X. paper: CheckFree+'s "
              "speed-ups in the paper's Table 2. failures: failure events in the whole run.", "",
              "time model:", *[f"- {line}" for line in model.describe()],
              *[f"- rate {k}: p = {v['p']:.5f} ({v['rule']}), Young-Daly interval {v['young_daly_interval']}"
                for k, v in failure_model.items()], ""]
    table = render_table(summary)
    crossover_lines = describe_crossovers(sens["crossovers"])
    footer = ["", f"Sensitivity, no rerun ({sens['note']}):", *crossover_lines,
              "", "Measured:", *[f"- {line}" for line in measured_lines]]
    (out / "table.md").write_text("\n".join([*header, table, *footer]) + "\n")
    plots: list[Path] = []
    if matplotlib_available():
        plots = plot(results, target, sens, model, out)
    document = dict(
        config={**asdict(config), "spec": config.spec.to_dict()}, methods=list(methods), rates=list(rates),
        seeds=list(seeds), jobs=jobs, backend=backend, data=data_path, target=target, target_rule=target_rule,
        time_model=dict(model.to_dict(), description=model.describe()),
        failure_model=dict(per_rate=failure_model,
                           note="p per stage per executed iteration: the paper's table for 5/10/16/33%, else "
                                "1 - (1 - rate) ** (iteration_seconds / 3600)"),
        torch_threads=config.threads, rows=rows, summary=summary, sensitivity=sens, measured=measured,
        swarm_vs_sim=_compare_swarm(results, log) if backend == "swarm" else [],
        runs=[asdict(r) for r in results], plots=[str(p) for p in plots])
    (out / "results.json").write_text(json.dumps(document, indent=1))
    log("\n".join([*header, table, *footer]))
    if not plots:
        log(PLOTS_HINT)
    log(f"wrote {out / 'table.md'}, {out / 'results.json'}" + "".join(f", {p}" for p in plots))
    return document

"""`cfnode bench churn`: time to a target validation loss under stage failures, per recovery method and failure rate.

A reproduction, at CPU scale, of the comparison in Table 2 of "All is Not Lost: LLM Recovery without Checkpoints"
(arXiv 2506.15461): checkpointing, redundant computation, CheckFree and CheckFree+ (and the ablations uniform, copy
and random), under the same failures.

Failures. The paper gives failure rates per stage per hour. We compress time: each training step stands for
`step_hours` hours of training, so a stage fails during a step with probability p = 1 - (1 - rate) ** step_hours,
drawn with `cfnode.recovery.failures.failure_schedule(S, horizon, p, seed)`. The pattern is indexed by executed
iteration (a step redone after a checkpoint rollback is a new iteration and can fail again), and it is the same for
every method for one seed and rate. A failure at iteration k hits after step k is applied.

Time. Each method's clock is the sum of its measured step compute (for `redundant`, with the shadows' extra
forward and backward in it), its measured recovery work (checkpoint writes and reads, rebuilds, shadow hand-overs)
and a fixed `rejoin_seconds` per failure event (detecting the loss and starting a newcomer; the same for every
method). Validation is not on the clock.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cfnode.bench.sim import METHODS, SimPipeline, recovery_mode
from cfnode.config import RECOVERY_MODES, RunSpec
from cfnode.data import TextDataset, batch_generator, load_corpus
from cfnode.recovery.failures import failure_schedule
from cfnode.recovery.schedule import microbatch_routes

DEFAULT_RATES = (0.05, 0.10, 0.16)
# The detection -> ONLINE -> trainer resumed time measured on loopback (docs/benchmarks.md, "Recovery time").
DEFAULT_REJOIN_SECONDS = 6.0
DEFAULT_SPEC = RunSpec(num_stages=4, layers_per_stage=1, hidden_size=64, num_heads=4, seq_len=64)


@dataclass
class ChurnConfig:
    spec: RunSpec = DEFAULT_SPEC
    steps: int = 300
    batch_size: int = 8
    microbatches: int = 2
    eval_every: int = 10
    eval_batches: int = 4
    step_hours: float = 0.1
    rejoin_seconds: float = DEFAULT_REJOIN_SECONDS
    checkpoint_every: int = 10
    max_iterations_factor: float = 3.0  # checkpointing may redo steps: stop after this many times --steps iterations
    seed: int = 0
    threads: int = 1  # torch threads: one keeps step times steady on a shared machine

    @property
    def max_iterations(self) -> int:
        return max(self.steps, int(math.ceil(self.steps * self.max_iterations_factor)))


def step_failure_probability(rate: float, step_hours: float) -> float:
    """Per stage per step: 1 - (1 - hourly rate) ** hours per step."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"hourly failure rate must be in [0, 1), got {rate}")
    return 1.0 - (1.0 - rate) ** step_hours


def churn_schedule(config: ChurnConfig, rate: float) -> dict[int, list[int]]:
    """iteration -> stages lost after it; the same for every method for a (seed, rate)."""
    probability = step_failure_probability(rate, config.step_hours)
    return failure_schedule(config.spec.num_stages, config.max_iterations, probability, config.seed)


@dataclass
class RunResult:
    method: str
    rate: float
    backend: str = "sim"
    iterations: list[int] = field(default_factory=list)  # per executed iteration
    steps: list[int] = field(default_factory=list)  # the model's step after it (drops on a rollback)
    times: list[float] = field(default_factory=list)  # the method's clock after it
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)  # {iteration, step, time, work_time, val_loss}
    failures: list[dict[str, Any]] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0

    @property
    def final_val(self) -> float:
        return self.val[-1]["val_loss"] if self.val else float("nan")

    def to_target(self, target: float) -> dict[str, float] | None:
        """The first evaluation at or below target (None if never reached)."""
        return next((v for v in self.val if v["val_loss"] <= target), None)


def run_sim(method: str, rate: float, dataset: TextDataset, config: ChurnConfig, workdir: Path,
            log: Callable[[str], None] = print, target: float | None = None) -> RunResult:
    """Train `config.steps` steps with `method`, losing stages on the (seed, rate) schedule; with a target, go on
    until the validation loss reaches it, at most `config.max_iterations` iterations in all."""
    mode, _ = recovery_mode(method)
    spec = config.spec.replace(recovery=mode if mode in RECOVERY_MODES else "none")
    schedule = churn_schedule(config, rate) if method != "none" else {}
    pipeline = SimPipeline(spec, method)
    routes = microbatch_routes(spec.num_stages, config.microbatches, mode, spec.swap_fraction)
    result = RunResult(method, rate if method != "none" else 0.0)
    costs = dict(compute=0.0, shadow_compute=0.0, checkpoint_save=0.0, checkpoint_load=0.0, rebuild=0.0,
                 rejoin=0.0, redone_steps=0.0, checkpoints=0.0)
    checkpoint_dir = workdir / "checkpoints" / f"{method}-rate{rate:g}"
    clock, iteration, started = 0.0, 0, time.perf_counter()

    def evaluate() -> None:
        loss = pipeline.evaluate(dataset, config.batch_size, config.eval_batches)
        result.val.append(dict(iteration=iteration, step=pipeline.step, time=round(clock, 5),
                               work_time=round(clock - costs["rejoin"], 5), val_loss=loss))

    if method == "checkpoint":
        t = time.perf_counter()
        pipeline.save_checkpoint(checkpoint_dir)
        costs["checkpoint_save"] += time.perf_counter() - t
        clock += time.perf_counter() - t
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
        clock += seconds
        costs["compute"] += seconds
        costs["shadow_compute"] += shadow_seconds
        if method == "checkpoint" and pipeline.step % config.checkpoint_every == 0:
            t = time.perf_counter()
            pipeline.save_checkpoint(checkpoint_dir)
            elapsed = time.perf_counter() - t
            clock += elapsed
            costs["checkpoint_save"] += elapsed
            costs["checkpoints"] += 1
        lost = schedule.get(iteration)
        if lost:
            before = pipeline.step
            t = time.perf_counter()
            if method == "checkpoint":
                pipeline.load_checkpoint(checkpoint_dir)
                what = [f"all stages <- checkpoint at step {pipeline.step}"]
                key = "checkpoint_load"
                costs["redone_steps"] += before - pipeline.step
            elif method == "redundant":
                what, key = pipeline.replace_from_shadows(lost), "rebuild"
            else:
                what, key = pipeline.rebuild(lost), "rebuild"
            elapsed = time.perf_counter() - t
            costs[key] += elapsed
            costs["rejoin"] += config.rejoin_seconds
            clock += elapsed + config.rejoin_seconds
            result.failures.append(dict(iteration=iteration, step=before, stages=lost, recovery=what,
                                        seconds=round(elapsed, 5)))
        result.iterations.append(iteration)
        result.steps.append(pipeline.step)
        result.times.append(round(clock, 5))
        result.losses.append(loss)
        result.step_seconds.append(seconds)
        if iteration % config.eval_every == 0 or (pipeline.step >= config.steps and not more()) \
                or iteration >= config.max_iterations:
            evaluate()
    if more():
        log(f"  {method} at rate {rate:g}: stopped after {iteration} iterations at step {pipeline.step} "
            f"(cap {config.max_iterations}), short of {'the target' if target is not None else 'its steps'}")
    result.costs = {k: round(v, 5) for k, v in costs.items()}
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
    run_dir = workdir / f"swarm-{method}-rate{rate:g}"
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
    result = RunResult(method, rate, backend="swarm")
    clock = 0.0
    for line in events.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "stage_lost":
            result.failures.append(dict(step=event.get("step"), stages=[event.get("stage")]))
        if event.get("event") != "step":
            continue
        clock += float(event["step_time"])
        step = int(event["step"])
        result.iterations.append(step)
        result.steps.append(step)
        result.times.append(round(clock, 5))
        result.losses.append(float(event["loss"]))
        result.step_seconds.append(float(event["step_time"]))
        if "val_loss" in event:
            result.val.append(dict(iteration=step, step=step, time=round(clock, 5), work_time=round(clock, 5),
                                   val_loss=float(event["val_loss"])))
    result.costs = {"compute": round(clock, 5)}
    result.wall_seconds = time.perf_counter() - started
    return result


# --- the sweep and its report ------------------------------------------------------------------------------------


def default_target(reference: RunResult, fraction: float = 0.75) -> float:
    """The no-failure run's validation loss at `fraction` of its steps (the evaluation closest to it)."""
    goal = fraction * reference.steps[-1]
    return min(reference.val, key=lambda v: abs(v["step"] - goal))["val_loss"]


def summarise(results: Sequence[RunResult], target: float) -> list[dict[str, Any]]:
    rows = []
    baselines = {(r.rate, r.method): r.to_target(target) for r in results}
    for r in results:
        hit = r.to_target(target)
        row = dict(method=r.method, rate=r.rate, backend=r.backend,
                   median_step_s=statistics.median(r.step_seconds) if r.step_seconds else float("nan"),
                   failures=len(r.failures), iterations=r.iterations[-1] if r.iterations else 0,
                   final_step=r.steps[-1] if r.steps else 0, final_val=r.final_val,
                   total_time_s=r.times[-1] if r.times else 0.0,
                   iterations_to_target=hit["iteration"] if hit else None,
                   time_to_target_s=hit["time"] if hit else None,
                   work_time_to_target_s=hit["work_time"] if hit else None)
        for other in ("checkpoint", "redundant"):
            base = baselines.get((r.rate, other))
            row[f"speedup_vs_{other}"] = (base["time"] / hit["time"]) if (hit and base and hit["time"] > 0) else None
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "not reached"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_table(rows: Sequence[dict[str, Any]], target: float) -> str:
    lines = [f"target validation loss: {target:.4f}", "",
             "| failure rate | method | median step s | failures | iterations to target | time to target s "
             "| without rejoin s | vs checkpoint | vs redundant | final val loss | iterations run |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        rate = "0 (ceiling)" if row["method"] == "none" else f"{row['rate'] * 100:g}%"
        speedups = [f"{row[k]:.2f}x" if row[k] is not None else "-"
                    for k in ("speedup_vs_checkpoint", "speedup_vs_redundant")]
        lines.append(f"| {rate} | {row['method']}{' (swarm)' if row['backend'] == 'swarm' else ''} "
                     f"| {row['median_step_s']:.4f} | {row['failures']} | {_fmt(row['iterations_to_target'])} "
                     f"| {_fmt(row['time_to_target_s'], 1)} | {_fmt(row['work_time_to_target_s'], 2)} "
                     f"| {speedups[0]} | {speedups[1]} "
                     f"| {row['final_val']:.4f} | {row['iterations']} |")
    return "\n".join(lines)


def plot(results: Sequence[RunResult], target: float, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r.rate for r in results if r.method != "none"}) or [0.0]
    methods = [m for m in ("none", *METHODS[1:]) if any(r.method == m for r in results)]
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    paths = []
    for axis_key, xlabel, name in (("iteration", "training iterations executed", "churn-loss-step.png"),
                                   ("time", "method clock (s): compute + recovery + rejoin", "churn-loss-time.png")):
        fig, axes = plt.subplots(1, len(rates), figsize=(5.2 * len(rates), 4.2), sharey=True, squeeze=False)
        for ax, rate in zip(axes[0], rates):
            for r in results:
                if r.method != "none" and r.rate != rate:
                    continue
                style = "--" if r.backend == "swarm" else (":" if r.method == "none" else "-")
                label = r.method + (" (swarm)" if r.backend == "swarm" else "") + (
                    " (no failures)" if r.method == "none" else "")
                ax.plot([v[axis_key] for v in r.val], [v["val_loss"] for v in r.val], style,
                        color="black" if r.method == "none" else colours[r.method], label=label,
                        linewidth=2.0 if r.method == "none" else 1.3)
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
            ax.set_title(f"hourly failure rate {rate * 100:g}%")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("validation loss")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def run_churn(methods: Sequence[str], rates: Sequence[float], config: ChurnConfig, data_path: str | None,
              out: Path, backend: str = "sim", target: float | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark: runs, table, plots and raw JSON under `out`. Returns the JSON document."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if backend not in ("sim", "swarm"):
        raise ValueError(f"backend must be sim or swarm, got {backend!r}")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    dataset = TextDataset(load_corpus(data_path), config.spec.seq_len)
    log(f"churn bench: backend {backend}, {config.spec.num_stages} stages x {config.spec.layers_per_stage} layer(s), "
        f"hidden {config.spec.hidden_size}, seq_len {config.spec.seq_len}, batch {config.batch_size} in "
        f"{config.microbatches} microbatches, {config.steps} steps; data {data_path or 'built-in corpus'}")
    for rate in rates:
        p = step_failure_probability(rate, config.step_hours)
        log(f"  rate {rate:g}/h, {config.step_hours:g} h per step: p = {p:.5f} per stage per step; "
            f"{sum(len(s) for i, s in churn_schedule(config, rate).items() if i <= config.steps)} stage failures "
            f"in the first {config.steps} iterations")
    ordered = ["none"] if ("none" in methods or target is None) else []
    results: list[RunResult] = []
    runs = [(m, 0.0) for m in ordered] + [(m, r) for r in rates for m in methods if m != "none"]
    given_target = target
    for method, rate in runs:
        started = time.perf_counter()
        if target is None and results:
            target = default_target(results[0])
            log(f"  target validation loss {target:.4f}: the no-failure run's at 75% of its steps")
        if backend == "swarm" and method in RECOVERY_MODES:
            results.append(run_swarm(method, rate, config, data_path, out, log))
            # The same run in the sim (same steps, no running on to the target), to compare with the live system.
            results.append(run_sim(method, rate, dataset, config, out, log))
        else:
            results.append(run_sim(method, rate, dataset, config, out, log,
                                   target=None if method == "none" and given_target is None else target))
        last = results[-1]
        log(f"  {method:<10} rate {rate:<5g} {len(last.failures):>3} failures, final val {last.final_val:.4f}, "
            f"clock {last.times[-1] if last.times else 0:.1f} s, ran {time.perf_counter() - started:.1f} s")
    if target is None:
        target = default_target(next(r for r in results if r.method == "none"))
    rows = summarise(results, target)
    table = render_table(rows, target)
    (out / "table.md").write_text(table + "\n")
    plots = plot(results, target, out)
    document = dict(
        config={**asdict(config), "spec": config.spec.to_dict()}, methods=list(methods), rates=list(rates),
        backend=backend, data=data_path, target=target,
        failure_model=dict(step_hours=config.step_hours,
                           per_step_probability={str(r): step_failure_probability(r, config.step_hours)
                                                 for r in rates},
                           note="p = 1 - (1 - hourly rate) ** step_hours per stage per executed iteration"),
        torch_threads=torch.get_num_threads(), rows=rows, runs=[asdict(r) for r in results],
        plots=[str(p) for p in plots])
    (out / "results.json").write_text(json.dumps(document, indent=1))
    log(table)
    if backend == "swarm":
        for swarm_run in (r for r in results if r.backend == "swarm"):
            sim_run = next(r for r in results if r.backend == "sim" and (r.method, r.rate) == (swarm_run.method,
                                                                                                 swarm_run.rate))
            sim_val = {v["step"]: v["val_loss"] for v in sim_run.val}
            common = [(v["val_loss"], sim_val[v["step"]]) for v in swarm_run.val if v["step"] in sim_val]
            gap = max((abs(a - b) for a, b in common), default=float("nan"))
            log(f"swarm vs sim ({swarm_run.method}, rate {swarm_run.rate:g}): final val {swarm_run.final_val:.4f} vs "
                f"{sim_run.final_val:.4f}; largest gap over {len(common)} shared evaluations {gap:.4f}")
    log(f"wrote {out / 'table.md'}, {out / 'results.json'}, {', '.join(str(p) for p in plots)}")
    return document

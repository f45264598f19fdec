"""The churn benchmark's records and report: what one run recorded (RunResult); time to target per run and per
(rate, method) over seeds; the Table-2-shaped table; the sensitivity of the verdict to the time model's costs (the same
runs priced again, no rerun); and the plots."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cfnode.bench.sim import CHECKPOINT_METHODS, METHODS
from cfnode.bench.time_model import PAPER_SPEEDUPS, Events, TimeModel, clock

TARGET_FRACTION = 0.75
BASELINES = ("checkpoint", "checkpoint-yd", "redundant")
SENSITIVITY_COSTS = tuple(round(0.1 * i, 2) for i in range(21))  # save = restore cost, 0 .. 2 iterations
SENSITIVITY_DOWNTIMES = tuple(round(0.25 * i, 2) for i in range(9))  # 0 .. 2 iterations
PLOTS_HINT = "plots skipped: they need matplotlib (pip install cfnode[bench]); table.md and results.json are written"


@dataclass
class RunResult:
    method: str
    rate: float
    seed: int = 0
    backend: str = "sim"
    checkpoint_every: int | None = None
    iteration_cost: float = 1.0  # the time model's cost of one executed iteration of this run
    iterations: list[int] = field(default_factory=list)  # per executed iteration
    steps: list[int] = field(default_factory=list)  # the model's step after it (drops on a rollback)
    times: list[float] = field(default_factory=list)  # the time model's clock after it, in iterations
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    # {iteration, step, saves, failures, restores, time (model, iterations), wall (measured s), val_loss}
    val: list[dict[str, float]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)  # measured seconds and counts
    measured: dict[str, float] = field(default_factory=dict)  # measured cost ratios (redundant's, local torch.save)
    wall_seconds: float = 0.0

    @property
    def final_val(self) -> float:
        return self.val[-1]["val_loss"] if self.val else float("nan")

    def to_target(self, target: float) -> dict[str, float] | None:
        """The first evaluation at or below target (None if never reached)."""
        return next((v for v in self.val if v["val_loss"] <= target), None)


def point_events(point: dict[str, Any]) -> Events:
    """The events recorded at an evaluation point."""
    return Events(iterations=int(point["iteration"]), saves=int(point.get("saves", 0)),
                  failures=int(point.get("failures", 0)), restores=int(point.get("restores", 0)))


# --- the sweep and its report ------------------------------------------------------------------------------------


def default_target(reference: RunResult, fraction: float = TARGET_FRACTION) -> float:
    """The no-failure run's validation loss at `fraction` of its steps (the evaluation closest to it)."""
    goal = fraction * reference.steps[-1]
    return min(reference.val, key=lambda v: abs(v["step"] - goal))["val_loss"]


def time_to_target(run: RunResult, target: float, save_cost: float, downtime: float, restore_cost: float,
                   iteration_cost: float | None = None) -> float | None:
    """Time to target recomputed from the run's recorded events for other costs (None if never reached).

    The run's own interval, rollbacks and failures stay as they were: only their prices change."""
    hit = run.to_target(target)
    if hit is None:
        return None
    cost = run.iteration_cost if iteration_cost is None else iteration_cost
    return clock(point_events(hit), cost, save_cost, downtime, restore_cost)


def summarise(results: Sequence[RunResult], target: float) -> list[dict[str, Any]]:
    """One row per run; speed-ups against the baselines of the same seed and rate."""
    hits = {(r.rate, r.seed, r.method): r.to_target(target) for r in results if r.backend == "sim"}
    rows = []
    for r in results:
        hit = r.to_target(target)
        row = dict(method=r.method, rate=r.rate, seed=r.seed, backend=r.backend, checkpoint_every=r.checkpoint_every,
                   iteration_cost=r.iteration_cost, failures=len(r.failures), saves=r.costs.get("saves", 0),
                   restores=r.costs.get("restores", 0), iterations=r.iterations[-1] if r.iterations else 0,
                   final_step=r.steps[-1] if r.steps else 0, final_val=r.final_val,
                   total_time=r.times[-1] if r.times else 0.0,
                   iterations_to_target=hit["iteration"] if hit else None,
                   time_to_target=hit["time"] if hit else None,
                   events_to_target=asdict(point_events(hit)) if hit else None)
        for other in BASELINES:
            base = hits.get((r.rate, r.seed, other))
            row[f"speedup_vs_{other}"] = (base["time"] / hit["time"]) if (hit and base and hit["time"] > 0) else None
        rows.append(row)
    return rows


def spread_of(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return dict(mean=statistics.mean(values), min=min(values), max=max(values))


def aggregate(results: Sequence[RunResult], target: float) -> list[dict[str, Any]]:
    """Per (rate, method) over seeds: means with min..max; speed-ups as ratios of means over the seeds where both
    reached the target, with the per-seed ratios' range."""
    keys = list(dict.fromkeys((r.rate, r.method, r.backend) for r in results))
    by_key = {k: [r for r in results if (r.rate, r.method, r.backend) == k] for k in keys}
    summary = []
    for rate, method, backend in keys:
        runs = by_key[(rate, method, backend)]
        hits = {r.seed: r.to_target(target) for r in runs}
        reached = {s: h for s, h in hits.items() if h is not None}
        row: dict[str, Any] = dict(
            rate=rate, method=method, backend=backend, seeds=[r.seed for r in runs], reached=len(reached),
            checkpoint_every=runs[0].checkpoint_every,
            iteration_cost=spread_of([r.iteration_cost for r in runs]),
            iterations_to_target=spread_of([h["iteration"] for h in reached.values()]),
            time_to_target=spread_of([h["time"] for h in reached.values()]),
            final_val=spread_of([r.final_val for r in runs]), failures=spread_of([len(r.failures) for r in runs]))
        for other in BASELINES:
            base_runs = by_key.get((rate, other, "sim"), [])
            base = {r.seed: r.to_target(target) for r in base_runs}
            # A target reached at time 0 (before any training) has no ratio.
            common = [s for s in reached if base.get(s) is not None and reached[s]["time"] > 0]
            if not common or (other, "sim") == (method, backend):
                row[f"speedup_vs_{other}"] = None
                continue
            ratios = [base[s]["time"] / reached[s]["time"] for s in common]
            row[f"speedup_vs_{other}"] = dict(
                ratio_of_means=statistics.mean(base[s]["time"] for s in common)
                / statistics.mean(reached[s]["time"] for s in common),
                min=min(ratios), max=max(ratios), seeds=len(common))
        row["paper"] = {other: PAPER_SPEEDUPS[(method, other, rate)] for other in BASELINES
                        if (method, other, rate) in PAPER_SPEEDUPS and backend == "sim"}
        summary.append(row)
    return summary


def format_spread(value: dict[str, float] | None, digits: int = 1) -> str:
    if value is None:
        return "not reached"
    if value["min"] == value["max"]:
        return f"{value['mean']:.{digits}f}"
    return f"{value['mean']:.{digits}f} ({value['min']:.{digits}f}..{value['max']:.{digits}f})"


def _fmt_speedup(value: dict[str, float] | None) -> str:
    if value is None:
        return "-"
    return f"{value['ratio_of_means']:.2f}x ({value['min']:.2f}..{value['max']:.2f})"


def render_table(summary: Sequence[dict[str, Any]]) -> str:
    lines = ["| failure rate | method | ckpt every | failures | iterations to target | time to target | vs checkpoint "
             "| vs checkpoint-yd | vs redundant | paper | final val loss | reached |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for row in summary:
        rate = "0 (ceiling)" if row["method"] == "none" else f"{row['rate'] * 100:g}%"
        paper = ", ".join(f"{v:.2f}x vs {k}" for k, v in row["paper"].items()) or "-"
        cost = row["iteration_cost"]
        method = row["method"] + (f" (cost {cost['mean']:.2f}/it)" if row["method"] == "redundant" else "") + (
            " (swarm)" if row["backend"] == "swarm" else "")
        lines.append(f"| {rate} | {method} | {row['checkpoint_every'] or '-'} | {format_spread(row['failures'])} "
                     f"| {format_spread(row['iterations_to_target'], 0)} | {format_spread(row['time_to_target'])} "
                     f"| {_fmt_speedup(row['speedup_vs_checkpoint'])} "
                     f"| {_fmt_speedup(row['speedup_vs_checkpoint-yd'])} | {_fmt_speedup(row['speedup_vs_redundant'])} "
                     f"| {paper} | {format_spread(row['final_val'], 4)} | {row['reached']}/{len(row['seeds'])} |")
    return "\n".join(lines)


# --- sensitivity: the same runs priced at other costs ----------------------------------------------------------


SENSITIVITY_METHODS = ("checkfree", "checkfree+", "checkfree+refit", "checkfree++refit")


def _mean_times(runs: Sequence[RunResult], seeds: Sequence[int], target: float, save_cost: float,
                downtime: float) -> float:
    by_seed = {r.seed: r for r in runs}
    return statistics.mean(time_to_target(by_seed[s], target, save_cost, downtime, save_cost) for s in seeds)


def _ratio(theirs: float, mine: float) -> float | None:
    return theirs / mine if mine > 0 else None


def sensitivity(results: Sequence[RunResult], target: float, model: TimeModel,
                costs: Sequence[float] = SENSITIVITY_COSTS,
                downtimes: Sequence[float] = SENSITIVITY_DOWNTIMES) -> dict[str, Any]:
    """Speed-up of each CheckFree method over each checkpoint method, recomputed from the runs' events for a grid of
    save = restore cost and downtime, per rate; and the save cost where it crosses 1.

    The checkpoint runs keep the interval they ran at (Young-Daly's was computed for the model's own save cost)."""
    # The model's own save cost and downtime are grid points too, so the grid holds the runs' own speed-ups.
    costs = sorted({*costs, model.save_cost})
    downtimes = sorted({*downtimes, model.downtime})
    sims = [r for r in results if r.backend == "sim" and r.method != "none"]
    rates = sorted({r.rate for r in sims})
    grid: dict[str, Any] = {}
    crossovers: list[dict[str, Any]] = []
    for rate in rates:
        for method in (m for m in SENSITIVITY_METHODS if any(r.method == m and r.rate == rate for r in sims)):
            mine = [r for r in sims if r.method == method and r.rate == rate]
            for baseline in (b for b in CHECKPOINT_METHODS if any(r.method == b and r.rate == rate for r in sims)):
                theirs = [r for r in sims if r.method == baseline and r.rate == rate]
                seeds = sorted({r.seed for r in mine if r.to_target(target)}
                               & {r.seed for r in theirs if r.to_target(target)})
                if not seeds:
                    continue
                table = [[_ratio(_mean_times(theirs, seeds, target, c, d), _mean_times(mine, seeds, target, c, d))
                          for c in costs] for d in downtimes]
                grid.setdefault(f"{rate:g}", {}).setdefault(method, {})[baseline] = dict(seeds=seeds, speedup=table)
                # Mean time is linear in the save cost c: checkpoint A + B c, CheckFree T; equal at c = (T - A) / B.
                per_downtime = {}
                for d in downtimes:
                    base_at_zero = _mean_times(theirs, seeds, target, 0.0, d)
                    slope = _mean_times(theirs, seeds, target, 1.0, d) - base_at_zero
                    ours = _mean_times(mine, seeds, target, 0.0, d)
                    per_downtime[d] = (ours - base_at_zero) / slope if slope > 0 else None
                crossovers.append(dict(rate=rate, method=method, baseline=baseline, seeds=seeds,
                                       downtime=model.downtime, crossover_save_cost=per_downtime[model.downtime],
                                       by_downtime=per_downtime))
    return dict(costs=list(costs), downtimes=list(downtimes), grid=grid, crossovers=crossovers,
                note="save cost = restore cost; each run's events (iterations to the target, saves, restores, "
                     "failures) are re-priced, so the checkpoint runs keep the interval they ran at (checkpoint-yd's "
                     "Young-Daly interval was computed for the model's own save cost, not for each grid point)")


def describe_crossovers(crossovers: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for c in crossovers:
        x = c["crossover_save_cost"]
        if x is None:
            verdict = "no saves or restores to price: the speed-up does not depend on the save cost"
        elif x <= 0:
            verdict = f"faster at every save cost >= 0 (the lines would cross at {x:.3f})"
        else:
            verdict = f"faster when a save (and a restore) costs more than {x:.3f} iteration"
        others = ", ".join(f"{d:g}: {'-' if x is None else f'{x:.3f}'}" for d, x in c["by_downtime"].items()
                           if d in (0.0, 1.0, 2.0))
        lines.append(f"  {c['rate'] * 100:g}%: {c['method']} vs {c['baseline']}: {verdict} "
                     f"(downtime {c['downtime']:.3f}, seeds {c['seeds']}; the crossover at downtime {others})")
    return lines


# --- plots (matplotlib is optional: pip install cfnode[bench]) ---------------------------------------------------


def plot(results: Sequence[RunResult], target: float, sensitivity_result: dict[str, Any], model: TimeModel,
         out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r.rate for r in results if r.method != "none"}) or [0.0]
    methods = [m for m in METHODS if any(r.method == m for r in results)]
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    paths = []
    for axis_key, xlabel, name in (("iteration", "training iterations executed", "churn-loss-step.png"),
                                   ("time", "time in iterations (the time model)", "churn-loss-time.png")):
        fig, axes = plt.subplots(1, len(rates), figsize=(5.2 * len(rates), 4.2), sharey=True, squeeze=False)
        for ax, rate in zip(axes[0], rates):
            labelled = set()
            for r in results:
                if r.method != "none" and r.rate != rate:
                    continue
                style = "--" if r.backend == "swarm" else (":" if r.method == "none" else "-")
                label = r.method + (" (swarm)" if r.backend == "swarm" else "") + (
                    " (no failures)" if r.method == "none" else "")
                ax.plot([v[axis_key] for v in r.val], [v["val_loss"] for v in r.val], style,
                        color="black" if r.method == "none" else colours[r.method],
                        label=None if label in labelled else label, alpha=0.8,
                        linewidth=1.6 if r.method == "none" else 1.0)
                labelled.add(label)
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
            # The first evaluations sit far above the target and would flatten everything near it.
            losses = [v["val_loss"] for r in results for v in r.val]
            ax.set_ylim(min(losses) - 0.05, min(max(losses), target + 1.0) + 0.05)
            ax.set_title(f"hourly failure rate {rate * 100:g}% (one line per seed)")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("validation loss")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if sensitivity_result["crossovers"]:
        paths.append(plot_crossover(sensitivity_result, model, out / "churn-crossover.png"))
    return paths


def plot_crossover(result: dict[str, Any], model: TimeModel, path: Path) -> Path:
    """Left: speed-up over checkpointing against the save cost, one line per rate; right: the crossover save cost
    against the downtime (above a line, CheckFree wins)."""
    import matplotlib.pyplot as plt

    costs, downtimes = result["costs"], result["downtimes"]
    d_index = downtimes.index(model.downtime)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"checkfree": ":", "checkfree+": "-", "checkfree+refit": "-.", "checkfree++refit": "--"}
    colours = {rate: plt.get_cmap("tab10")(i) for i, rate in enumerate(sorted(result["grid"]))}
    for rate, by_method in result["grid"].items():
        for method, by_baseline in by_method.items():
            if "checkpoint" not in by_baseline:
                continue
            speedups = [math.nan if v is None else v for v in by_baseline["checkpoint"]["speedup"][d_index]]
            left.plot(costs, speedups, styles.get(method, "-"),
                      color=colours[rate], label=f"{float(rate) * 100:g}% {method}")
    left.axhline(1.0, color="grey", linewidth=1)
    left.axvline(model.save_cost, color="grey", linestyle=":", linewidth=1, label=f"model {model.save_cost:.2f}")
    left.set_xlabel("save = restore cost (iterations)")
    left.set_ylabel(f"speed-up vs checkpoint, downtime {model.downtime:.2f}")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    values = [0.0, 2.0]
    for c in result["crossovers"]:
        if c["baseline"] != "checkpoint" or c["method"] not in ("checkfree", "checkfree+"):
            continue
        points = [(d, x) for d, x in c["by_downtime"].items() if x is not None]
        values += [x for _, x in points]
        right.plot([p[0] for p in points], [p[1] for p in points], styles.get(c["method"], "-"),
                   color=colours[f"{c['rate']:g}"], label=f"{c['rate'] * 100:g}% {c['method']}")
    low, high = min(values) - 0.2, max(values) + 0.2
    # Below 0 the crossover is not a cost at all: CheckFree is faster whatever a save costs.
    right.axhspan(low, 0.0, color="grey", alpha=0.15, label="below 0: faster at any save cost")
    right.set_ylim(low, high)
    right.set_xlabel("downtime per failure (iterations)")
    right.set_ylabel("crossover save cost (above: CheckFree faster)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True

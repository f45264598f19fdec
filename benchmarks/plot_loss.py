"""Plot training (and validation) loss from one or more `cfnode train --log-jsonl` event logs.

Each log is a file of JSON lines, one event each. `step` events carry `step`, `loss` and, every `--eval-every`
steps, `val_loss`; `stage_lost` and `stage_recovered` events (if any) are drawn as vertical lines at their `step`.
Other events (`train_started`, `peer_failed`, `train_finished`, ...) are counted and otherwise ignored.

    python benchmarks/plot_loss.py /tmp/demo.jsonl --label "cfnode swarm (3 stages)" --out docs/loss-curve.png
    python benchmarks/plot_loss.py a.jsonl b.jsonl --label checkfree --label none --out compare.png

The training loss is drawn as a thin, faint line with a centred moving average (`--smooth` steps) over it;
validation loss as markers joined by a dashed line. `--relative` plots steps counted from each log's first step
(a trainer that joins a swarm already at step N logs steps N+1, N+2, ...). `--log-jsonl` appends, so a file may
hold several runs: when a `train_started` event starts again from an earlier step, only the last run is plotted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import ScalarFormatter  # noqa: E402

# event -> (colour, line style, line width); a stage is often lost and recovered within one step, so the lost line
# is a wide faint band and the recovered line a dashed one drawn over it: both stay visible.
MARKED_EVENTS = {"stage_lost": ("tab:red", "-", 3.0), "stage_recovered": ("tab:green", "--", 1.2)}


@dataclass
class RunLog:
    label: str
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    marks: list[tuple[str, int, str]] = field(default_factory=list)  # (event, step, short text)
    counts: dict[str, int] = field(default_factory=dict)
    skipped_lines: int = 0
    dropped_runs: int = 0  # earlier runs appended to the same file (--log-jsonl appends), not plotted


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mark_text(event: str, record: dict) -> str:
    stage = record.get("stage")
    text = f"S{stage} " if isinstance(stage, int) else ""
    if event == "stage_lost":
        return text + "lost"
    downtime = record.get("downtime")
    return text + ("back" if not _finite(downtime) else f"back after {downtime:.0f} s")


def read_log(path: Path, label: str) -> RunLog:
    """Parse a JSONL event log; lines that are not JSON objects (e.g. a line cut short by a crash) are skipped."""
    run = RunLog(label)
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                run.skipped_lines += 1
                continue
            if not isinstance(record, dict):
                run.skipped_lines += 1
                continue
            event = record.get("event")
            run.counts[str(event)] = run.counts.get(str(event), 0) + 1
            step = record.get("step")
            if event == "train_started" and _finite(step) and run.steps and step < run.steps[-1]:
                # A new run from an earlier step in the same file: keep only the latest run.
                run.dropped_runs += 1
                run.steps, run.losses, run.val_steps, run.val_losses, run.marks = [], [], [], [], []
            if event == "step" and _finite(step):
                if _finite(record.get("loss")):
                    run.steps.append(int(step))
                    run.losses.append(float(record["loss"]))
                if _finite(record.get("val_loss")):
                    run.val_steps.append(int(step))
                    run.val_losses.append(float(record["val_loss"]))
            elif event in MARKED_EVENTS and _finite(step):
                run.marks.append((event, int(step), _mark_text(event, record)))
    return run


def make_relative(run: RunLog) -> None:
    """Shift every step so that the first logged training step is step 1."""
    if not run.steps:
        return
    offset = min(run.steps) - 1
    run.steps = [s - offset for s in run.steps]
    run.val_steps = [s - offset for s in run.val_steps]
    run.marks = [(event, step - offset, text) for event, step, text in run.marks]


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred mean over `window` values (the window shrinks at both ends), so the curve does not lag the loss."""
    before, after = (window - 1) // 2, window // 2
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - before), min(len(values), i + after + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def plot(runs: list[RunLog], out: Path, smooth: int, title: str | None, logy: bool, dpi: int) -> None:
    fig, ax = plt.subplots(figsize=(9, 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    marked_labels: set[str] = set()
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        if run.steps:
            order = sorted(range(len(run.steps)), key=run.steps.__getitem__)
            steps = [run.steps[j] for j in order]
            losses = [run.losses[j] for j in order]
            ax.plot(steps, losses, color=color, linewidth=0.7, alpha=0.35)
            if smooth > 1:
                ax.plot(steps, moving_average(losses, smooth), color=color, linewidth=2.0,
                        label=f"{run.label}: train ({smooth}-step mean)")
            else:
                ax.lines[-1].set_alpha(1.0)
                ax.lines[-1].set_label(f"{run.label}: train")
        if run.val_steps:
            order = sorted(range(len(run.val_steps)), key=run.val_steps.__getitem__)
            ax.plot([run.val_steps[j] for j in order], [run.val_losses[j] for j in order], color=color,
                    linestyle="--", linewidth=1.0, marker="o", markersize=4.5, label=f"{run.label}: validation")
        for event, step, text in run.marks:
            line_color, style, width = MARKED_EVENTS[event]
            name = event.replace("_", " ")
            legend = name if name not in marked_labels else None
            marked_labels.add(name)
            lost = event == "stage_lost"
            ax.axvline(step, color=line_color, linestyle=style, linewidth=width, alpha=0.35 if lost else 0.9,
                       label=legend, zorder=1 if lost else 2)
            # Text along the line, from the bottom of the axes: lost on the left of the line, recovered on the right.
            ax.annotate(text, xy=(step, 0.0), xycoords=("data", "axes fraction"), xytext=(-3 if lost else 3, 4),
                        textcoords="offset points", rotation=90, fontsize=8, color=line_color,
                        ha="right" if lost else "left", va="bottom")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_title(title or "cfnode training loss")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path, help="JSONL event logs written by `cfnode train --log-jsonl`")
    parser.add_argument("--label", action="append", default=[],
                        help="legend label, once per log in the same order (default: the file name)")
    parser.add_argument("--out", type=Path, default=Path("loss-curve.png"), help="PNG to write (default: %(default)s)")
    parser.add_argument("--smooth", type=int, default=10,
                        help="moving-average window in steps; 1 draws the raw loss only (default: %(default)s)")
    parser.add_argument("--title", help="figure title (default: 'cfnode training loss')")
    parser.add_argument("--relative", action="store_true", help="count steps from each log's first step")
    parser.add_argument("--logy", action="store_true", help="logarithmic loss axis")
    parser.add_argument("--dpi", type=int, default=120, help="resolution of the PNG (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.label and len(args.label) != len(args.logs):
        parser.error(f"got {len(args.label)} --label for {len(args.logs)} log(s); give one per log or none")
    if args.smooth < 1:
        parser.error("--smooth must be at least 1")
    labels = args.label or [path.name for path in args.logs]

    runs = []
    for path, label in zip(args.logs, labels):
        try:
            run = read_log(path, label)
        except OSError as e:
            parser.error(f"cannot read {path}: {e.strerror}")
        if run.skipped_lines:
            print(f"{path}: skipped {run.skipped_lines} line(s) that are not JSON objects", file=sys.stderr)
        if run.dropped_runs:
            print(f"{path}: holds {run.dropped_runs + 1} runs (the log is appended to); plotting only the last",
                  file=sys.stderr)
        if not run.steps:
            print(f"{path}: no `step` events with a loss", file=sys.stderr)
        if args.relative:
            make_relative(run)
        events = ", ".join(f"{name} {count}" for name, count in sorted(run.counts.items()))
        last = f"; last loss {run.losses[-1]:.4f} at step {run.steps[-1]}" if run.steps else ""
        print(f"{label}: {len(run.steps)} steps, {len(run.val_steps)} validation points{last} ({events})")
        runs.append(run)
    if not any(run.steps or run.val_steps for run in runs):
        print("nothing to plot", file=sys.stderr)
        return 1
    plot(runs, args.out, args.smooth, args.title, args.logy, args.dpi)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

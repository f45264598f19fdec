"""Training throughput: (a) the model in one process, (b) a hivemind.moe pipeline, (c) the cfnode swarm.

All three train the same RunSpec (same weights: every part derives from spec.seed), on the same data
(load_corpus() default, TextDataset) with the same batch size cut into the same microbatches, on this machine:

  (a) in-process: head + body stages built with build_head / build_body_stage in this one process, one AdamW and
      one gradient clip per part (as the swarm does), gradient accumulation over the microbatches, torch's own
      thread count unless --threads; W warm-up steps, then N timed steps; tokens/s = batch_size * seq_len * N /
      time. Run once first and once last; the ratios use the mean.
  (b) hivemind.moe (benchmarks/moe_pipeline.py): SWARM's mechanism, one ModuleBackend server process per stage,
      RemoteExperts chained with autograd from this process, all microbatches of a step in flight at once.
  (c) cfnode swarm, once per --variants entry: LocalSwarm (bootstrap + one `cfnode join` per stage + `cfnode
      train`, each its own process); the trainer's JSONL `step` events, the first W dropped; tokens/s =
      sum(tokens) / sum(step_time). The variants switch the levers one at a time (see VARIANTS); DEFAULT_VARIANT
      is the one that matches cfnode's defaults.

With --rounds N the whole sequence, (a) first to (a) last, runs N times; each round's ratios use its own (a) and
(b), and a summary gives each run's median over the rounds (this machine's load moves single runs by 10% and more).

For each swarm run it also reports where the time goes: the CPU seconds per step of each kind of process (sampled
from /proc: trainer, stages, p2p daemons, DHT processes) against the cores' capacity, and the trainer's
`time_split` (compute at the stages and the head, (de)serialisation, transfer, waits for a busy stage, and the
wall time of applying the step). From the stage peers' compute traces (`cfnode join --trace-dir`) it reports
the share of the timed steps' wall time in which 0, 1, 2, ... stages computed at once, and how long stage 1 waited
at the step boundary, from its last backward of a step to its first forward of the next.

    python benchmarks/throughput.py                    # demo model: 3 stages x 2 layers, hidden 128
    python benchmarks/throughput.py --rounds 3 --json-out bench.json
    python benchmarks/throughput.py --stages 2 --layers-per-stage 4 --hidden-size 1024 --num-heads 16 \
        --batch-size 4 --microbatches 2 --steps 6 --warmup 2             # stages of about 50M parameters
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from moe_pipeline import (
    add_model_and_schedule_arguments,
    check_model_and_schedule_arguments,
    run_moe_pipeline,
    time_steps,
)

from cfnode.bench.cpu import CpuSampler
from cfnode.bench.trace import concurrency, read_traces, step_boundaries
from cfnode.config import JoinConfig, NetworkConfig, RunSpec, TrainConfig
from cfnode.data import TextDataset, batch_generator, load_corpus
from cfnode.launcher import LocalSwarm, SwarmLayout
from cfnode.model import build_body_stage, build_head, count_parameters


@dataclass(frozen=True)
class Variant:
    """One setting of the swarm's levers."""

    description: str
    keep_activations: int  # `cfnode join --keep-activations`
    wire_dtype: str  # RunSpec.wire_dtype
    threads: int | None  # torch threads per process; None: LocalSwarm shares the cores out
    pipe: bool  # `cfnode train --pipe`: forward and backward calls on one stream per peer


CORES = os.cpu_count() or 1
VARIANTS = {
    "plain": Variant("recompute in backward, float32 wire, every process on all cores, a stream per call",
                     0, "float32", CORES, False),
    "threads": Variant("+ cores shared out among the processes", 0, "float32", None, False),
    "keep": Variant("+ forward activations kept for the backward", 16, "float32", None, False),
    "bfloat16": Variant("+ bfloat16 activations and gradients on the wire", 16, "bfloat16", None, False),
    "pipe": Variant("+ forward and backward calls on one stream per peer", 16, "bfloat16", None, True),
    "int8": Variant("+ blockwise 8-bit activations and gradients on the wire", 16, "int8", None, True),
}
DEFAULT_VARIANT = next(name for name, v in VARIANTS.items()
                       if (v.keep_activations, v.wire_dtype, v.threads, v.pipe)
                       == (JoinConfig(NetworkConfig()).keep_activations, RunSpec().wire_dtype, None,
                           TrainConfig(NetworkConfig()).pipe))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_and_schedule_arguments(parser)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated swarm variants to run, from: {', '.join(VARIANTS)}")
    parser.add_argument("--no-moe", action="store_true", help="skip (b), the hivemind.moe pipeline")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of (a) and of (b)'s trainer (default: torch's own choice, all cores)")
    parser.add_argument("--swarm-log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="log level of the swarm's processes (info shows every step of the trainer)")
    parser.add_argument("--swarm-timeout", type=float, default=600.0,
                        help="seconds after which a swarm run is stopped and counted as failed")
    parser.add_argument("--keep-logs", action="store_true", help="keep the swarm's workdir (kept anyway on failure)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole side-by-side sequence; the summary gives each run's median over rounds "
                             "(this machine's load varies from minute to minute)")
    parser.add_argument("--json-out", type=Path, default=None, help="write all numbers here as JSON")
    args = parser.parse_args(argv)
    check_model_and_schedule_arguments(parser, args)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


# --- (a) the whole pipeline in this process ---------------------------------------------------------------------


def run_in_process(spec: RunSpec, dataset: TextDataset, batch_size: int, microbatches: int, steps: int,
                   warmup: int, seed: int) -> dict[str, Any]:
    """Train warmup + steps steps of fresh weights in this process; time the last `steps` of them."""
    head = build_head(spec)
    stages = [build_body_stage(spec, s) for s in range(1, spec.num_stages + 1)]
    parts: list[torch.nn.Module] = [head, *stages]
    optimizers = [torch.optim.AdamW(p.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95))
                  for p in parts]

    def train_step(step: int) -> float:
        inputs, targets = dataset.sample_batch(batch_size, batch_generator(seed, step))  # (B, T) each
        losses = []
        for x, y in zip(inputs.chunk(microbatches), targets.chunk(microbatches)):
            hidden = head.embed(x)  # (b, T, C)
            for stage in stages:
                hidden = stage(hidden)
            loss = head.loss(hidden, y)
            (loss / microbatches).backward()  # accumulate, as the trainer scales each microbatch's loss
            losses.append(loss.item())
        for part, optimizer in zip(parts, optimizers):  # each part clipped and stepped on its own, as in the swarm
            torch.nn.utils.clip_grad_norm_(part.parameters(), spec.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses)

    return time_steps(train_step, warmup, steps, batch_size * spec.seq_len)


# --- (c) the live swarm -----------------------------------------------------------------------------------------


def run_swarm(spec: RunSpec, args: argparse.Namespace, variant: Variant) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="cfnode-bench-"))
    log_jsonl = workdir / "trainer.jsonl"
    layout = SwarmLayout(spec=spec.replace(wire_dtype=variant.wire_dtype), replicas=1,
                         steps=args.warmup + args.steps, log_jsonl=str(log_jsonl),
                         batch_size=args.batch_size, microbatches=args.microbatches, workdir=workdir,
                         log_level=args.swarm_log_level, threads=variant.threads,
                         join_args=["--keep-activations", str(variant.keep_activations),
                                    "--trace-dir", str(workdir / "traces")],
                         train_args=["--eval-every", "0", "--seed", str(args.seed), "--stage-timeout", "60",
                                     "--pipe" if variant.pipe else "--no-pipe"])
    # A hung swarm must not hang the benchmark: SIGTERM makes LocalSwarm.run stop everything and return 130.
    watchdog = threading.Timer(args.swarm_timeout, os.kill, (os.getpid(), signal.SIGTERM))
    watchdog.daemon = True
    started = time.perf_counter()
    watchdog.start()
    sampler = CpuSampler().start()
    try:
        code = LocalSwarm(layout).run()  # blocks until the trainer exits, then stops every process it started
    finally:
        watchdog.cancel()
        sampler.stop()
    wall = time.perf_counter() - started

    records = [json.loads(line) for line in log_jsonl.read_text().splitlines() if line.strip()] \
        if log_jsonl.exists() else []
    step_events = [r for r in records if r.get("event") == "step"]
    timed = step_events[args.warmup:]
    counts: dict[str, int] = {}
    for r in records:
        counts[r["event"]] = counts.get(r["event"], 0) + 1
    result: dict[str, Any] = dict(exit_code=code, wall_s=round(wall, 2), steps_logged=len(step_events),
                                  events=counts, workdir=str(workdir))
    if code != 0 or len(timed) < args.steps:
        print(f"swarm run failed (trainer exit {code}, {len(step_events)} step events); logs kept in {workdir}",
              file=sys.stderr)
        result["ok"] = False
        return result
    tokens = sum(r["tokens"] for r in timed)
    elapsed = sum(r["step_time"] for r in timed)
    median_step = statistics.median(r["step_time"] for r in timed)
    result.update(ok=True, tokens=tokens, time_s=round(elapsed, 4), tokens_per_s=round(tokens / elapsed, 1),
                  median_step_s=round(median_step, 4), median_tokens_per_s=round(timed[-1]["tokens"] / median_step, 1),
                  final_loss=timed[-1]["loss"])
    window = (timed[0]["time"] - timed[0]["step_time"], timed[-1]["time"])
    cpu = sampler.cpu_by_role(*window)
    result["cpu_s_per_step"] = {name: round(seconds / len(timed), 4) for name, seconds in cpu.items()}
    result["cpu_s_per_step_total"] = round(sum(cpu.values()) / len(timed), 4)
    splits = [r.get("time_split", {}) for r in timed]
    result["time_split_per_step"] = {kind: round(sum(split.get(kind, 0.0) for split in splits) / len(timed), 4)
                                     for kind in splits[0]}
    calls = read_traces(workdir / "traces")
    result["stages_computing"] = {str(k): round(share, 4) for k, share in concurrency(calls, *window).items()}
    boundaries = step_boundaries([c for c in calls if window[0] <= c.start <= window[1]])
    result["step_boundary_ms"] = round(1000 * statistics.median(boundaries), 2) if boundaries else None
    if args.keep_logs:
        print(f"swarm logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        result["workdir"] = None
    return result


# --- report -----------------------------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    cfg, params = report["config"], report["parameters"]
    print()
    print(f"spec: {cfg['stages']} stages x {cfg['layers_per_stage']} layers, hidden {cfg['hidden_size']}, "
          f"{cfg['num_heads']} heads, seq_len {cfg['seq_len']}; batch {cfg['batch_size']} in "
          f"{cfg['microbatches']} microbatches; {cfg['warmup']} warm-up + {cfg['steps']} timed steps")
    print(f"torch {report['torch_version']}, torch threads of (a) {report['torch_threads']}, "
          f"os.cpu_count() = {report['cpu_count']}")
    print(f"load average (1 min) at start {report['load_avg_start']:.2f}, at end {report['load_avg_end']:.2f} "
          "(other work on this machine skews all numbers)")
    print("parameters: " + ", ".join(f"{name} {n:,}" for name, n in params.items()))
    print()
    rows = [("(a) in-process, first", report["in_process_before"])]
    if report["moe"] is not None:
        rows.append(("(b) hivemind.moe", report["moe"]))
    rows += [(f"(c) {name}", r) for name, r in report["swarm"].items()]
    rows.append(("(a) in-process, last", report["in_process_after"]))
    print(f"{'run':<22} {'tokens/s':>10} {'median step s':>14} {'final loss':>11} {'(c)/(a)':>8} {'(c)/(b)':>8}")
    for name, r in rows:
        if not r.get("tokens_per_s"):
            print(f"{name:<22} {'failed':>10}")
            continue
        ratios = report["ratios"].get(name[4:], {}) if name.startswith("(c)") else {}
        a_ratio = f"{ratios['over_in_process']:.3f}" if ratios.get("over_in_process") else ""
        b_ratio = f"{ratios['over_moe']:.3f}" if ratios.get("over_moe") else ""
        print(f"{name:<22} {r['tokens_per_s']:>10,.0f} {r['median_step_s']:>14.4f} {r['final_loss']:>11.4f} "
              f"{a_ratio:>8} {b_ratio:>8}")
    print(f"(a) mean: {report['in_process_mean_tokens_per_s']:,.0f} tokens/s, "
          f"{report['in_process_before']['cpu_s_per_step']:.3f} CPU s per step")
    print()
    for name, r in report["swarm"].items():
        if not r.get("ok"):
            continue
        capacity = report["cpu_count"] * r["median_step_s"]
        print(f"(c) {name}: {VARIANTS[name].description}")
        cpu = ", ".join(f"{role} {seconds:.3f}" for role, seconds in r["cpu_s_per_step"].items() if seconds >= 0.001)
        print(f"    CPU s per step: {r['cpu_s_per_step_total']:.3f} of {capacity:.3f} "
              f"({report['cpu_count']} cores x median step): {cpu}")
        split = r["time_split_per_step"]
        print("    trainer's calls, s per step summed over concurrent calls: "
              + ", ".join(f"{kind} {seconds:.3f}" for kind, seconds in split.items()))
        if r.get("stages_computing"):
            shares = ", ".join(f"{k}: {share:.1%}" for k, share in r["stages_computing"].items())
            boundary = f"{r['step_boundary_ms']:.1f} ms" if r.get("step_boundary_ms") is not None else "n/a"
            print(f"    stages computing at once, share of the timed steps' wall time: {shares}; stage 1 from its last "
                  f"backward to its next forward: median {boundary}")


def run_round(args: argparse.Namespace, spec: RunSpec, dataset: TextDataset) -> dict[str, Any]:
    """(a) first, (b), each (c) variant, (a) last: one side-by-side measurement and its ratios."""
    load_start = os.getloadavg()[0]
    in_process_args = (spec, dataset, args.batch_size, args.microbatches, args.steps, args.warmup, args.seed)
    print(f"(a) in-process, first (torch threads {torch.get_num_threads()})", flush=True)
    before = run_in_process(*in_process_args)
    print(f"    {before['tokens_per_s']:,.0f} tokens/s", flush=True)
    moe = None
    if not args.no_moe:
        print("(b) hivemind.moe pipeline", flush=True)
        moe = run_moe_pipeline(*in_process_args, threads=max(1, CORES // (spec.num_stages + 1)),
                               timeout=args.swarm_timeout)
        print(f"    {moe['tokens_per_s']:,.0f} tokens/s" if moe.get("ok") else f"    failed: {moe.get('error')}",
              flush=True)
    swarm = {}
    for name in args.variants:
        print(f"(c) cfnode swarm, {name}: {VARIANTS[name].description}", flush=True)
        swarm[name] = run_swarm(spec, args, VARIANTS[name])
        if swarm[name].get("ok"):
            print(f"    {swarm[name]['tokens_per_s']:,.0f} tokens/s", flush=True)
    print("(a) in-process, last", flush=True)
    after = run_in_process(*in_process_args)
    print(f"    {after['tokens_per_s']:,.0f} tokens/s", flush=True)

    mean = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
    moe_rate = moe["tokens_per_s"] if moe and moe.get("ok") else None
    ratios = {name: dict(over_in_process=round(r["tokens_per_s"] / mean, 4),
                         over_moe=round(r["tokens_per_s"] / moe_rate, 4) if moe_rate else None)
              for name, r in swarm.items() if r.get("ok")}
    if moe_rate:
        ratios["moe"] = dict(over_in_process=round(moe_rate / mean, 4))
    return dict(load_avg_start=load_start, load_avg_end=os.getloadavg()[0], in_process_before=before,
                in_process_after=after, in_process_mean_tokens_per_s=round(mean, 1), moe=moe, swarm=swarm,
                ratios=ratios)


def summarize(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per run: the median over rounds of its tokens/s and of its ratios (each round's ratios are side by side)."""
    summary: dict[str, dict[str, float]] = {}
    runs = {"in_process": [r["in_process_mean_tokens_per_s"] for r in rounds],
            "moe": [r["moe"]["tokens_per_s"] for r in rounds if r["moe"] and r["moe"].get("ok")]}
    for name in rounds[0]["swarm"]:
        runs[name] = [r["swarm"][name]["tokens_per_s"] for r in rounds if r["swarm"][name].get("ok")]
    for name, rates in runs.items():
        if not rates:
            continue
        entry = dict(tokens_per_s=round(statistics.median(rates), 1), rounds=len(rates))
        for kind in ("over_in_process", "over_moe"):
            values = [r["ratios"][name][kind] for r in rounds if r["ratios"].get(name, {}).get(kind)]
            if values:
                entry[kind] = round(statistics.median(values), 4)
                entry[f"{kind}_min"], entry[f"{kind}_max"] = min(values), max(values)
        summary[name] = entry
    return summary


def print_summary(summary: dict[str, dict[str, float]], rounds: int) -> None:
    print(f"\nmedian over {rounds} rounds (min..max of the rounds' ratios)")
    print(f"{'run':<22} {'tokens/s':>10} {'(c)/(a)':>20} {'(c)/(b)':>20}")
    for name, entry in summary.items():
        label = {"in_process": "(a) in-process", "moe": "(b) hivemind.moe"}.get(name, f"(c) {name}")
        cells = []
        for kind in ("over_in_process", "over_moe"):
            cells.append(f"{entry[kind]:.3f} ({entry[f'{kind}_min']:.3f}..{entry[f'{kind}_max']:.3f})"
                         if kind in entry else "")
        print(f"{label:<22} {entry['tokens_per_s']:>10,.0f} {cells[0]:>20} {cells[1]:>20}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    spec = RunSpec(run_id="bench", num_stages=args.stages, layers_per_stage=args.layers_per_stage,
                   hidden_size=args.hidden_size, num_heads=args.num_heads, seq_len=args.seq_len)
    dataset = TextDataset(load_corpus(), spec.seq_len)  # what `cfnode train` loads without --data

    params = {"head (trainer)": count_parameters(build_head(spec))}
    for s in range(1, spec.num_stages + 1):
        params[f"stage {s}"] = count_parameters(build_body_stage(spec, s))
    params["total"] = sum(params.values())
    shared = dict(
        config=dict(stages=args.stages, layers_per_stage=args.layers_per_stage, hidden_size=args.hidden_size,
                    num_heads=args.num_heads, seq_len=args.seq_len, batch_size=args.batch_size,
                    microbatches=args.microbatches, steps=args.steps, warmup=args.warmup, seed=args.seed,
                    threads=args.threads, variants=args.variants, rounds=args.rounds),
        variants={name: asdict(VARIANTS[name]) for name in args.variants}, default_variant=DEFAULT_VARIANT,
        torch_version=torch.__version__, python=platform.python_version(), torch_threads=torch.get_num_threads(),
        cpu_count=CORES, parameters=params,
    )
    rounds = []
    for number in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"--- round {number} of {args.rounds}", flush=True)
        rounds.append(run_round(args, spec, dataset))
        print_report({**shared, **rounds[-1]})
    summary = summarize(rounds)
    if args.rounds > 1:
        print_summary(summary, args.rounds)
    ok = all(r.get("ok") for one in rounds for r in one["swarm"].values()) \
        and all(one["moe"] is None or one["moe"].get("ok") for one in rounds)
    default = summary.get(DEFAULT_VARIANT, {})
    if "over_in_process" in default:
        print(f"\ncfnode out of the box ({DEFAULT_VARIANT}): (c)/(a) = {default['over_in_process']:.3f}"
              + (f", (c)/(b) = {default['over_moe']:.3f}" if "over_moe" in default else "")
              + (f" (medians over {args.rounds} rounds)" if args.rounds > 1 else ""))
    if args.json_out:
        report = {**shared, "rounds": rounds, "summary": summary}
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

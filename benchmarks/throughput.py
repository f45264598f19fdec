"""Training throughput: the whole pipeline in this one process vs. the cfnode swarm on 127.0.0.1.

Both sides train the same RunSpec (same weights: every part derives from spec.seed), on the same data
(load_corpus() default, TextDataset) with the same batch size cut into the same microbatches:

  (a) in-process: head + body stages built with build_head / build_body_stage, one AdamW and one gradient clip per
      part (as the swarm does), gradient accumulation over the microbatches; W warm-up steps, then N timed steps;
      tokens/s = batch_size * seq_len * N / time. Run once before and once after (b); the ratio uses the mean.
  (b) swarm: LocalSwarm (bootstrap + one `cfnode join` per stage + `cfnode train`, each its own process);
      the trainer's JSONL `step` events, the first W dropped; tokens/s = sum(tokens) / sum(step_time).

Note: a swarm peer recomputes its forward pass in backward (it keeps no activations between calls), so (b) does
about one extra forward per stage per microbatch that (a) does not, and every process of (b) shares the same cores.

    python benchmarks/throughput.py                    # defaults: 3 stages x 2 layers, hidden 128, 30 + 5 steps
    python benchmarks/throughput.py --json-out bench.json
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
from pathlib import Path
from typing import Any

import torch

from cfnode.config import RunSpec
from cfnode.data import TextDataset, batch_generator, load_corpus
from cfnode.launcher import LocalSwarm, SwarmLayout
from cfnode.model import build_body_stage, build_head, count_parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stages", type=int, default=3, help="body stages (one `cfnode join` each)")
    parser.add_argument("--layers-per-stage", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--microbatches", type=int, default=4, help="microbatches per step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    parser.add_argument("--seed", type=int, default=0, help="data order (the weights come from the spec's seed 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for this process and OMP_NUM_THREADS for the swarm's processes "
                             "(default: leave torch's own choice alone)")
    parser.add_argument("--swarm-log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="log level of the swarm's processes (info shows every step of the trainer)")
    parser.add_argument("--swarm-timeout", type=float, default=600.0,
                        help="seconds after which the swarm run is stopped and counted as failed")
    parser.add_argument("--keep-logs", action="store_true", help="keep the swarm's workdir (kept anyway on failure)")
    parser.add_argument("--json-out", type=Path, default=None, help="write all numbers here as JSON")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.batch_size < 1 or args.microbatches < 1 or args.batch_size % args.microbatches:
        parser.error("--batch-size must be a positive multiple of --microbatches")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
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

    loss = float("nan")
    for step in range(1, warmup + 1):
        loss = train_step(step)
    step_times = []
    for step in range(warmup + 1, warmup + steps + 1):
        started = time.perf_counter()
        loss = train_step(step)
        step_times.append(time.perf_counter() - started)
    elapsed = sum(step_times)
    tokens = batch_size * spec.seq_len * steps
    return dict(tokens=tokens, time_s=round(elapsed, 4), tokens_per_s=round(tokens / elapsed, 1),
                median_step_s=round(statistics.median(step_times), 4),
                median_tokens_per_s=round(batch_size * spec.seq_len / statistics.median(step_times), 1),
                final_loss=round(loss, 5))


# --- (b) the live swarm -----------------------------------------------------------------------------------------


def run_swarm(spec: RunSpec, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="cfnode-bench-"))
    log_jsonl = workdir / "trainer.jsonl"
    layout = SwarmLayout(spec=spec, replicas=1, steps=args.warmup + args.steps, log_jsonl=str(log_jsonl),
                         batch_size=args.batch_size, microbatches=args.microbatches, workdir=workdir,
                         log_level=args.swarm_log_level,
                         train_args=["--eval-every", "0", "--seed", str(args.seed), "--stage-timeout", "60"])
    # A hung swarm must not hang the benchmark: SIGTERM makes LocalSwarm.run stop everything and return 130.
    watchdog = threading.Timer(args.swarm_timeout, os.kill, (os.getpid(), signal.SIGTERM))
    watchdog.daemon = True
    started = time.perf_counter()
    watchdog.start()
    try:
        code = LocalSwarm(layout).run()  # blocks until the trainer exits, then stops every process it started
    finally:
        watchdog.cancel()
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
    print(f"torch {report['torch_version']}, torch.get_num_threads() = {report['torch_threads']}, "
          f"os.cpu_count() = {report['cpu_count']}, OMP_NUM_THREADS = {report['omp_num_threads']}")
    print(f"load average (1 min) at start {report['load_avg_start']:.2f}, at end {report['load_avg_end']:.2f} "
          "(other work on this machine skews all numbers)")
    print("parameters: " + ", ".join(f"{name} {n:,}" for name, n in params.items()))
    print()
    rows = [("(a) in-process, before", report["in_process_before"]),
            ("(a) in-process, after", report["in_process_after"]),
            ("(b) swarm", report["swarm"])]
    print(f"{'run':<24} {'tokens/s':>10} {'timed s':>9} {'median step s':>14} {'tok/s at median':>16} "
          f"{'final loss':>11}")
    for name, r in rows:
        if not r.get("tokens_per_s"):
            print(f"{name:<24} {'failed':>10}")
            continue
        print(f"{name:<24} {r['tokens_per_s']:>10,.0f} {r['time_s']:>9.2f} {r['median_step_s']:>14.4f} "
              f"{r['median_tokens_per_s']:>16,.0f} {r['final_loss']:>11.4f}")
    print(f"{'(a) mean':<24} {report['in_process_mean_tokens_per_s']:>10,.0f}")
    swarm = report["swarm"]
    print(f"swarm wall time (start-up, {swarm['steps_logged']} steps, final eval, shutdown): {swarm['wall_s']:.1f} s; "
          f"events: {swarm['events']}")
    if report["ratio_swarm_over_in_process"] is not None:
        print(f"ratio (b)/(a): {report['ratio_swarm_over_in_process']:.3f} "
              f"(from median step times: {report['ratio_at_median_steps']:.3f})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the swarm's processes
    spec = RunSpec(run_id="bench", num_stages=args.stages, layers_per_stage=args.layers_per_stage,
                   hidden_size=args.hidden_size, num_heads=args.num_heads, seq_len=args.seq_len)
    dataset = TextDataset(load_corpus(), spec.seq_len)  # what `cfnode train` loads without --data

    params = {"head (trainer)": count_parameters(build_head(spec))}
    for s in range(1, spec.num_stages + 1):
        params[f"stage {s}"] = count_parameters(build_body_stage(spec, s))
    params["total"] = sum(params.values())

    load_start = os.getloadavg()[0]
    in_process_args = (spec, dataset, args.batch_size, args.microbatches, args.steps, args.warmup, args.seed)
    print(f"(a) in-process, before the swarm (torch threads {torch.get_num_threads()})", flush=True)
    before = run_in_process(*in_process_args)
    print(f"    {before['tokens_per_s']:,.0f} tokens/s", flush=True)
    print("(b) swarm", flush=True)
    swarm = run_swarm(spec, args)
    print("(a) in-process, after the swarm", flush=True)
    after = run_in_process(*in_process_args)
    print(f"    {after['tokens_per_s']:,.0f} tokens/s", flush=True)

    mean = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
    ratio = swarm["tokens_per_s"] / mean if swarm.get("ok") else None
    median_mean = (before["median_tokens_per_s"] + after["median_tokens_per_s"]) / 2
    median_ratio = swarm["median_tokens_per_s"] / median_mean if swarm.get("ok") else None
    report = dict(
        config=dict(stages=args.stages, layers_per_stage=args.layers_per_stage, hidden_size=args.hidden_size,
                    num_heads=args.num_heads, seq_len=args.seq_len, batch_size=args.batch_size,
                    microbatches=args.microbatches, steps=args.steps, warmup=args.warmup, seed=args.seed,
                    threads=args.threads),
        torch_version=torch.__version__, python=platform.python_version(), torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        load_avg_start=load_start, load_avg_end=os.getloadavg()[0],
        parameters=params, in_process_before=before, in_process_after=after,
        in_process_mean_tokens_per_s=round(mean, 1), swarm=swarm,
        ratio_swarm_over_in_process=round(ratio, 4) if ratio is not None else None,
        ratio_at_median_steps=round(median_ratio, 4) if median_ratio is not None else None,
    )
    print_report(report)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0 if swarm.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

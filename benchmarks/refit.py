"""Refit under churn: each rebuild rule with and without a refit on the lost stage's cached activations, over
several seeds, next to a failure-free run of each seed (the churn benchmark's in-process pipeline).

    python benchmarks/refit.py --data ../shared/data/tinystories-valid-sample.txt
    python benchmarks/refit.py --seeds 0,1,2,3,4 --rate 0.16 --out refit.json

For every seed it runs `none` (no failures), then each method on the same seeded failures, and reports per method:
the gap in validation loss to the failure-free run at the last step (mean, min and max over the seeds), the share
of its base rule's gap that the refit closes, the time to the target loss (the failure-free run's at 75% of its
steps) and the refit's own held-out loss before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from cfnode.bench.churn import DEFAULT_SPEC, ChurnConfig, RunResult, default_target, run_sim
from cfnode.bench.sim import recovery_mode
from cfnode.data import TextDataset, load_corpus

METHODS = ("checkfree", "checkfree+refit", "checkfree+", "checkfree++refit", "copy", "copy+refit")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds (failures, data order, weights)")
    parser.add_argument("--rate", type=float, default=0.10, help="hourly failure rate per stage")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--refit-cache", type=int, default=16, help="(input, output) pairs kept per stage")
    parser.add_argument("--refit-steps", type=int, default=200, help="at most this many refit steps")
    parser.add_argument("--refit-lr", type=float, default=1e-3)
    parser.add_argument("--data", help="text file or folder (default: the embedded corpus)")
    parser.add_argument("--out", type=Path, help="write the per-seed results as JSON")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="cfnode-refit-"))
    dataset_cache: dict[int, TextDataset] = {}

    per_seed: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for seed in seeds:
        spec = DEFAULT_SPEC.replace(seed=seed, refit_cache=args.refit_cache, refit_steps=args.refit_steps,
                                    refit_lr=args.refit_lr)
        config = ChurnConfig(spec=spec, steps=args.steps, seed=seed)
        dataset = dataset_cache.setdefault(spec.seq_len, TextDataset(load_corpus(args.data), spec.seq_len))
        baseline = run_sim("none", 0.0, dataset, config, workdir, log=lambda _: None)
        target = default_target(baseline)
        base_val = val_at(baseline, args.steps)
        print(f"seed {seed}: failure-free validation loss {base_val:.4f} at step {args.steps}; target {target:.4f}",
              flush=True)
        for method in methods:
            result = run_sim(method, args.rate, dataset, config, workdir, log=lambda _: None, target=target)
            hit = result.to_target(target)
            refits = [f["recovery"] for f in result.failures]
            per_seed[method][seed] = dict(
                gap=val_at(result, args.steps) - base_val, failures=len(result.failures),
                time_to_target=hit["time"] if hit else None, recoveries=refits)
            print(f"  {method:<17} {len(result.failures):>2} failures, gap {per_seed[method][seed]['gap']:+.4f}, "
                  f"time to target {fmt(hit['time'] if hit else None)} s", flush=True)

    print(f"\nrate {args.rate:g}/h, seeds {seeds}, {args.steps} steps, refit cache {args.refit_cache} pairs, "
          f"at most {args.refit_steps} steps")
    print(f"{'method':<17} {'mean gap':>9} {'min':>8} {'max':>8} {'gap closed':>11} {'time to target s':>17}")
    summary = {}
    for method in methods:
        gaps = [r["gap"] for r in per_seed[method].values()]
        times = [r["time_to_target"] for r in per_seed[method].values() if r["time_to_target"] is not None]
        base, refits = recovery_mode(method)
        closed = None
        if refits and base in per_seed:
            base_gap = statistics.mean(r["gap"] for r in per_seed[base].values())
            closed = 1 - statistics.mean(gaps) / base_gap if base_gap > 0 else None
        summary[method] = dict(mean_gap=statistics.mean(gaps), min_gap=min(gaps), max_gap=max(gaps), closed=closed,
                               mean_time_to_target=statistics.mean(times) if times else None,
                               reached=f"{len(times)}/{len(gaps)}")
        print(f"{method:<17} {statistics.mean(gaps):>+9.4f} {min(gaps):>+8.4f} {max(gaps):>+8.4f} "
              f"{fmt(closed, '{:.0%}'):>11} {fmt(summary[method]['mean_time_to_target']):>11} "
              f"({summary[method]['reached']})")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "summary": summary, "per_seed": per_seed},
                                       indent=1))
    return 0


def val_at(result: RunResult, step: int) -> float:
    """The validation loss at the first evaluation at or after `step` (the last one if none)."""
    return next((v["val_loss"] for v in result.val if v["step"] >= step), result.final_val)


def fmt(value, pattern: str = "{:.1f}") -> str:
    return "-" if value is None else pattern.format(value)


if __name__ == "__main__":
    sys.exit(main())

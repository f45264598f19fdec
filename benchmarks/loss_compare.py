"""Does the fast path train as well as the plain one? Loss curves of the live swarm, lever settings side by side.

For each data seed it runs the demo swarm (LocalSwarm: bootstrap, one `cfnode join` per stage, `cfnode train`)
once per variant of benchmarks/throughput.py (default: `plain`, which recomputes and sends float32, against
cfnode's defaults, every lever on), with the same spec, weights, batches and steps, and compares the validation loss at
every evaluation. The spread between seeds of the plain variant is the noise the difference is measured against.

    python benchmarks/loss_compare.py --out-dir /tmp/loss-compare     # 2 seeds x 2 variants x 200 steps
    python benchmarks/plot_loss.py /tmp/loss-compare/seed0-plain.jsonl /tmp/loss-compare/seed0-pipe.jsonl \
        --label plain --label pipe --out docs/loss-fast-path.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from throughput import DEFAULT_VARIANT, VARIANTS, Variant

from cfnode.config import RunSpec
from cfnode.launcher import LocalSwarm, SwarmLayout


def run(spec: RunSpec, variant: Variant, seed: int, steps: int, eval_every: int, workdir: Path) -> list[dict]:
    """Train and return the trainer's step events (each with `loss`, and `val_loss` every eval_every steps)."""
    log_jsonl = workdir.with_suffix(".jsonl")
    log_jsonl.unlink(missing_ok=True)
    layout = SwarmLayout(spec=spec.replace(wire_dtype=variant.wire_dtype), steps=steps, log_jsonl=str(log_jsonl),
                         workdir=workdir, log_level="warning", threads=variant.threads,
                         join_args=["--keep-activations", str(variant.keep_activations)],
                         train_args=["--eval-every", str(eval_every), "--seed", str(seed),
                                     "--pipe" if variant.pipe else "--no-pipe"])
    code = LocalSwarm(layout).run()
    events = [json.loads(line) for line in log_jsonl.read_text().splitlines() if line.strip()]
    steps_logged = [e for e in events if e["event"] == "step"]
    if code != 0 or len(steps_logged) != steps:
        raise RuntimeError(f"swarm run failed (exit {code}, {len(steps_logged)} steps); logs in {workdir}")
    return steps_logged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=f"plain,{DEFAULT_VARIANT}", help=f"from: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1", help="data seeds (the weights come from the spec's seed)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--out-dir", type=Path, default=Path("loss-compare"))
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if any(v not in VARIANTS for v in variants) or len(variants) < 2:
        parser.error(f"--variants: two or more of {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    spec = RunSpec(run_id="losscmp")

    val: dict[tuple[int, str], dict[int, float]] = {}
    for seed in seeds:
        for name in variants:
            print(f"seed {seed}, {name}: {VARIANTS[name].description}", flush=True)
            events = run(spec, VARIANTS[name], seed, args.steps, args.eval_every, args.out_dir / f"seed{seed}-{name}")
            val[seed, name] = {e["step"]: e["val_loss"] for e in events if "val_loss" in e}
            print(f"    final validation loss {val[seed, name][args.steps]:.4f}", flush=True)

    base = variants[0]
    evals = sorted(val[seeds[0], base])
    report: dict[str, Any] = dict(steps=args.steps, seeds=seeds, variants=variants,
                                  val_loss={f"seed{s}-{v}": val[s, v] for s, v in val})
    print(f"\nvalidation loss at each evaluation (step: {', '.join(map(str, evals))})")
    for (seed, name), curve in val.items():
        print(f"  seed {seed} {name:<10} " + " ".join(f"{curve[step]:.3f}" for step in evals))
    # The effect of a variant: its loss minus the base variant's, same seed; the noise: the base's seed spread.
    for name in variants[1:]:
        diffs = [val[s, name][step] - val[s, base][step] for s in seeds for step in evals]
        mean_abs = sum(abs(d) for d in diffs) / len(diffs)
        mean = sum(diffs) / len(diffs)
        final = [val[s, name][args.steps] - val[s, base][args.steps] for s in seeds]
        report[f"{name}_minus_{base}"] = dict(mean=round(mean, 4), mean_abs=round(mean_abs, 4),
                                              final=[round(d, 4) for d in final])
        print(f"{name} - {base}, same seed: mean difference {mean:+.4f}, mean |difference| {mean_abs:.4f}; at the end "
              + ", ".join(f"{d:+.4f}" for d in final))
    if len(seeds) > 1:
        noise = [abs(val[seeds[0], base][step] - val[seeds[1], base][step]) for step in evals]
        report["seed_noise_mean_abs"] = round(sum(noise) / len(noise), 4)
        print(f"noise: {base} seed {seeds[0]} vs seed {seeds[1]}: "
              f"mean |difference| {report['seed_noise_mean_abs']:.4f}")
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out_dir / 'report.json'} and one JSONL log per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())

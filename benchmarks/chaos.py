"""Chaos: train through random SIGKILLs of stage peers and of the bootstrap while newcomers keep joining, next to a
failure-free run of the same swarm, seed and data.

    python benchmarks/chaos.py                           # 3 stages, 150 steps, a kill every 4-10 s
    python benchmarks/chaos.py --steps 300 --out docs/chaos.json
    python benchmarks/chaos.py --busy 2                  # beside two busy processes: a loaded machine

It checks what must hold and exits non-zero if anything does not: the run completes every step, every stage_lost
has a matching stage_recovered, no stage step summed a microbatch twice or missed one (no step_mismatch, and the
trainer checked the ledger of its stage steps), and no process or p2p daemon is left behind. It prints both runs
side by side: kills, newcomers, lost and recovered stages, replayed microbatches, refused and restarted stage steps,
step mismatches and ledger checks among them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from cfnode.bench.chaos import ChaosConfig, run_chaos
from cfnode.config import RunSpec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--layers-per-stage", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--replicas", type=int, default=1, help="peers per stage at the start")
    parser.add_argument("--recovery", default="checkfree", choices=["checkfree", "checkfree+"])
    parser.add_argument("--kill-min", type=float, default=4.0, help="seconds between kills: at least")
    parser.add_argument("--kill-max", type=float, default=10.0, help="seconds between kills: at most")
    parser.add_argument("--bootstrap-share", type=float, default=0.2, help="chance a kill takes the bootstrap")
    parser.add_argument("--extra-join-every", type=float, default=15.0, help="seconds between extra newcomers")
    parser.add_argument("--data", help="text file or folder (default: the embedded corpus)")
    parser.add_argument("--busy", type=int, default=0,
                        help="processes that keep a core busy during both runs (a loaded machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="write both summaries and the chaos actions as JSON")
    args = parser.parse_args()

    spec = RunSpec(num_stages=args.stages, layers_per_stage=args.layers_per_stage, hidden_size=args.hidden,
                   num_heads=4, seq_len=128, recovery=args.recovery, head_copy_every=5, seed=args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cfnode-chaos-"))
    common = dict(spec=spec, steps=args.steps, replicas=args.replicas, data_path=args.data, seed=args.seed,
                  kill_interval=(args.kill_min, args.kill_max), bootstrap_share=args.bootstrap_share,
                  extra_join_every=args.extra_join_every, busy=args.busy)
    print(f"logs in {workdir}", flush=True)
    print("failure-free run ...", flush=True)
    baseline = run_chaos(ChaosConfig(workdir=workdir / "baseline", chaos=False, **common))
    print("chaos run ...", flush=True)
    chaos = run_chaos(ChaosConfig(workdir=workdir / "chaos", **common))

    rows = [("", "failure-free", "chaos")]
    base, mess = baseline.summary(), chaos.summary()
    for key in base:
        rows.append((key, _fmt(base[key]), _fmt(mess[key])))
    width = max(len(r[0]) for r in rows)
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>16}  {b:>28}")
    if base["final_val_loss"] and mess["final_val_loss"]:
        print(f"validation loss, chaos / failure-free: {mess['final_val_loss'] / base['final_val_loss']:.3f}")

    problems = []
    for label, result, summary in (("failure-free", baseline, base), ("chaos", chaos, mess)):
        if result.exit_code != 0 or summary["steps"] != args.steps:
            problems.append(f"{label}: the trainer exited {result.exit_code} after {summary['steps']} steps")
        if summary["unmatched_losses"]:
            problems.append(f"{label}: stage_lost without stage_recovered: {result.unmatched_losses()}")
        if summary["step_mismatches"]:
            mismatches = [e for e in result.events if e["event"] == "step_mismatch"]
            problems.append(f"{label}: {summary['step_mismatches']} stage steps summed the wrong microbatches: "
                            f"{mismatches}")
        if summary["steps"] and not summary["ledger_checks"]:
            problems.append(f"{label}: the trainer reported no ledger check")
        if summary["islands"] or summary["fresh_restarts"]:
            problems.append(f"{label}: newcomers outside the trained run: {result.newcomers_served}")
        if result.leftover_groups:
            problems.append(f"{label}: process groups left behind: {result.leftover_groups}")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "failure_free": base, "chaos": mess,
                                        "actions": chaos.actions}, indent=2))
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(main())

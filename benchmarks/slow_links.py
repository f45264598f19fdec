"""Throughput over slow links: the cfnode swarm and a hivemind.moe pipeline with every host behind a limited link.

Each role runs in a network namespace of its own (cfnode.bench.netlab): the bootstrap, one peer per stage and the
trainer, on a private bridge with no route out. Each host's link is limited with `tc tbf` to the same rate each way;
there is no `netem` on this kernel, so the links add no latency of their own (said in the output). Per rate it runs
the cfnode swarm once per `--variants` entry (benchmarks/throughput.py's levers; default cfnode's defaults, and the
same with 8-bit activations) and the hivemind.moe pipeline (benchmarks/moe_pipeline.py, SWARM's mechanism) on the
same hosts, and reports tokens/s, the share of the same setup's unlimited rate, cfnode over hivemind.moe, and the
bytes per token that crossed the trainer's link and each stage's link (the veths' counters, framing included).

Which rates? A link is slow when sending a step's bytes takes long against computing the step. Per token, a stage
computes about 6 x its parameters, 72 x hidden^2 x layers FLOPs, and its link carries a few hidden-sized vectors, so
FLOPs per byte on the wire scale with hidden x layers per stage. To put this machine's swarm where a GPU swarm of a
real model on home links would be, a link here runs at

    local rate = home rate x (this CPU's FLOP/s / the GPU's FLOP/s) x (hidden x layers of the real stage)
                                                                  / (hidden x layers of the stage here)

with this CPU's FLOP/s measured (the in-process run, 6 x parameters x tokens/s) and the GPU's and the real model's
stated (`--gpu-tflops`, default 100, an A100 at about a third of its bfloat16 peak; `--real-hidden` and
`--real-layers-per-stage`, default 4096 and 8: a 7B Llama in 4 stages). `--local-mbit` sets the rates directly.

    python benchmarks/slow_links.py                                 # demo model; home links of 500, 100 and 20 Mbit/s
    python benchmarks/slow_links.py --local-mbit 50,5 --no-moe --json-out slow.json

Needs root (network namespaces, tc); every namespace, link and process is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moe_pipeline import add_model_and_schedule_arguments, check_model_and_schedule_arguments
from throughput import CORES, DEFAULT_VARIANT, VARIANTS, Variant, run_in_process

from cfnode.bench.netlab import Host, Lab, unavailable
from cfnode.config import RunSpec
from cfnode.data import TextDataset, load_corpus
from cfnode.launcher import wait_for_maddr
from cfnode.model import build_body_stage, build_head, count_parameters
from cfnode.node.events import EventFollower

BOOTSTRAP_PORT = 31400
SUBNET = "10.214.0"


class CounterLog:
    """The links' byte counters, read every 20 ms with the time, so that the bytes of a window bounded by events
    (a step's end, stamped by whoever logged it) can be read off afterwards, however late the events are seen."""

    def __init__(self, read: Callable[[], dict[str, tuple[int, int]]], every: float = 0.02):
        self.read, self.every = read, every
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CounterLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self.read()))
            self._stop.wait(self.every)

    def at(self, moment: float) -> dict[str, tuple[int, int]]:
        return min(self.samples, key=lambda sample: abs(sample[0] - moment))[1]

    def bytes_per_token(self, start: float | None, end: float | None, tokens: int) -> dict[str, float] | None:
        """Bytes each link carried, both ways, from `start` to `end` (unix times), per token trained meanwhile."""
        if start is None or end is None or tokens <= 0 or not self.samples:
            return None
        first, last = self.at(start), self.at(end)
        return {name: round((sum(last[name]) - sum(first[name])) / tokens, 1) for name in first}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_and_schedule_arguments(parser)
    parser.set_defaults(steps=6, warmup=2)
    parser.add_argument("--home-mbit", default="500,100,20", help="the GPU swarm's link rates to emulate, Mbit/s")
    parser.add_argument("--local-mbit", default=None, help="link rates here, Mbit/s (instead of --home-mbit)")
    parser.add_argument("--gpu-tflops", type=float, default=100.0, help="the GPU's training FLOP/s, in TFLOP/s")
    parser.add_argument("--real-hidden", type=int, default=4096, help="hidden size of the real model's stages")
    parser.add_argument("--real-layers-per-stage", type=int, default=8, help="layers per stage of the real model")
    parser.add_argument("--variants", default=f"{DEFAULT_VARIANT},int8",
                        help=f"cfnode swarm variants, from: {', '.join(VARIANTS)}")
    parser.add_argument("--no-moe", action="store_true", help="skip the hivemind.moe pipeline")
    parser.add_argument("--run-timeout", type=float, default=900.0, help="seconds before a run counts as failed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the in-process run")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    check_model_and_schedule_arguments(parser, args)
    args.variants = [v for v in args.variants.split(",") if v]
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        parser.error(f"--variants: from {', '.join(VARIANTS)}")
    return args


def flops_per_token(spec: RunSpec) -> float:
    """Training FLOPs per token, 6 x parameters (forward 2, backward 4), of the whole model."""
    params = count_parameters(build_head(spec)) + sum(count_parameters(build_body_stage(spec, s))
                                                      for s in range(1, spec.num_stages + 1))
    return 6.0 * params


class SlowLinks:
    def __init__(self, args: argparse.Namespace, spec: RunSpec, lab: Lab):
        self.args, self.spec, self.lab = args, spec, lab
        self.boot = lab.add_host()
        self.stage_hosts = [lab.add_host() for _ in range(spec.num_stages)]
        self.trainer = lab.add_host()
        self.threads = max(1, CORES // (spec.num_stages + 1))

    @property
    def links(self) -> dict[str, Host]:
        return {"trainer": self.trainer, **{f"stage {s}": h for s, h in enumerate(self.stage_hosts, start=1)},
                "bootstrap": self.boot}

    def counters(self) -> dict[str, tuple[int, int]]:
        return {name: self.lab.link_bytes(host) for name, host in self.links.items()}

    def limit(self, mbit: float | None) -> None:
        for host in self.links.values():
            self.lab.limit(host, mbit)

    def run_cfnode(self, variant: Variant, workdir: Path) -> dict[str, Any]:
        args, lab = self.args, self.lab
        workdir.mkdir(parents=True)
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(self.spec.replace(wire_dtype=variant.wire_dtype).to_dict()))
        maddr_path, key, jsonl = workdir / "bootstrap.maddr", workdir / "trainer.key", workdir / "events.jsonl"
        threads = str(variant.threads or self.threads)
        started = time.monotonic()
        try:
            bootstrap = lab.start(self.boot, "bootstrap", "bootstrap", "--host", self.boot.address, "--port",
                                  str(BOOTSTRAP_PORT), "--config", str(spec_path), "--maddr-file", str(maddr_path),
                                  "--trainer", str(key), "--log-level", "warning")
            maddr = wait_for_maddr(maddr_path, bootstrap, timeout=90)
            for stage, host in enumerate(self.stage_hosts, start=1):
                lab.start(host, f"stage-{stage}", "join", "--initial-peers", maddr, "--stage", str(stage), "--host",
                          host.address, "--threads", threads, "--keep-activations", str(variant.keep_activations),
                          "--request-timeout", "120", "--log-level", "warning")
            trainer = lab.start(self.trainer, "trainer", "train", "--initial-peers", maddr, "--identity", str(key),
                                "--host", self.trainer.address, "--client-mode", "--steps",
                                str(args.warmup + args.steps), "--batch-size", str(args.batch_size),
                                "--microbatches", str(args.microbatches), "--eval-every", "0", "--seed",
                                str(args.seed), "--threads", threads, "--request-timeout", "120",
                                "--pipe" if variant.pipe else "--no-pipe", "--log-jsonl", str(jsonl),
                                "--log-level", "warning")
            follower = EventFollower(jsonl)
            with CounterLog(self.counters) as counters:
                while trainer.process.poll() is None and time.monotonic() - started < args.run_timeout:
                    time.sleep(0.1)
            follower.poll()
            code = trainer.process.poll()
            logged = [e for e in follower.events if e.get("event") == "step"]
            steps = logged[args.warmup:args.warmup + args.steps]
            if code != 0 or len(steps) < args.steps:
                return dict(ok=False, error=f"trainer exit {code}, {len(steps)} timed steps",
                            logs=lab.logs()[-4000:])
            tokens = sum(e["tokens"] for e in steps)
            # From the end of the last warm-up step to the end of the last timed one (the final evaluation after
            # it is left out).
            window = (logged[args.warmup - 1]["time"] if args.warmup else steps[0]["time"] - steps[0]["step_time"],
                      steps[-1]["time"])
            return dict(ok=True, tokens_per_s=round(tokens / sum(e["step_time"] for e in steps), 1),
                        bytes_per_token=counters.bytes_per_token(*window, tokens), final_loss=steps[-1]["loss"],
                        failures=sum(e.get("event") == "peer_failed" for e in follower.events))
        except (RuntimeError, TimeoutError) as e:
            return dict(ok=False, error=str(e), logs=lab.logs()[-4000:])
        finally:
            lab.stop_processes()

    def run_moe(self, workdir: Path) -> dict[str, Any]:
        args = self.args
        workdir.mkdir(parents=True)
        out = workdir / "moe.json"
        argv = [sys.executable, str(Path(__file__).resolve().parent / "moe_pipeline.py"), "run",
                "--stages", str(self.spec.num_stages), "--layers-per-stage", str(self.spec.layers_per_stage),
                "--hidden-size", str(self.spec.hidden_size), "--num-heads", str(self.spec.num_heads),
                "--seq-len", str(self.spec.seq_len), "--batch-size", str(args.batch_size), "--microbatches",
                str(args.microbatches), "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed",
                str(args.seed), "--threads", str(self.threads), "--timeout", str(args.run_timeout),
                "--host", self.trainer.address, "--json-out", str(out)]
        for stage, host in enumerate(self.stage_hosts, start=1):
            argv += ["--stage-host", f"{stage}={host.namespace}@{host.address}"]
        process = subprocess.Popen(self.lab.command(self.trainer, *argv), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines: list[str] = []
        ends: dict[int, float] = {}  # step -> when its line arrived (the pipeline prints it as the step ends)

        def read() -> None:  # per-step lines: "step N: loss ..., S s"
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line.rstrip())
                if line.startswith("step ") and ":" in line:
                    ends[int(line.split()[1].rstrip(":"))] = time.time()

        reader = threading.Thread(target=read, daemon=True)
        with CounterLog(self.counters) as counters:
            reader.start()
            try:
                code = process.wait(args.run_timeout + 60)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                self.lab.stop_processes()
                process.kill()
                reader.join(5)
        if code != 0 or not out.exists():
            return dict(ok=False, error=f"exit {code}", logs="\n".join(lines[-40:]))
        result = json.loads(out.read_text())["result"]
        return dict(ok=True, tokens_per_s=result["tokens_per_s"], final_loss=result["final_loss"],
                    bytes_per_token=counters.bytes_per_token(ends.get(args.warmup), ends.get(args.warmup + args.steps),
                                                             result["tokens"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = unavailable(rate_limits=True)
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    spec = RunSpec(run_id="slowlinks", num_stages=args.stages, layers_per_stage=args.layers_per_stage,
                   hidden_size=args.hidden_size, num_heads=args.num_heads, seq_len=args.seq_len)
    dataset = TextDataset(load_corpus(), spec.seq_len)
    print(f"spec: {spec.num_stages} stages x {spec.layers_per_stage} layers, hidden {spec.hidden_size}, seq_len "
          f"{spec.seq_len}; batch {args.batch_size} in {args.microbatches} microbatches; {args.warmup} warm-up + "
          f"{args.steps} timed steps; links limited with tc tbf, no added latency", flush=True)
    import torch  # after parsing, so --help is quick

    if args.threads:
        torch.set_num_threads(args.threads)
    # Enough steps that torch's first-call costs do not count: this sets the link rates.
    in_process = run_in_process(spec, dataset, args.batch_size, args.microbatches, max(args.steps, 10),
                                max(args.warmup, 3), args.seed)
    cpu_flops = flops_per_token(spec) * in_process["tokens_per_s"]
    scale = (cpu_flops / (args.gpu_tflops * 1e12)) * (args.real_hidden * args.real_layers_per_stage) / (
        spec.hidden_size * spec.layers_per_stage)
    if args.local_mbit:
        local = [float(r) for r in args.local_mbit.split(",")]
        home = [round(r / scale, 1) for r in local]
    else:
        home = [float(r) for r in args.home_mbit.split(",")]
        local = [round(r * scale, 3) for r in home]
    print(f"in-process: {in_process['tokens_per_s']:,.0f} tokens/s = {cpu_flops / 1e9:.1f} GFLOP/s (6 x parameters "
          f"x tokens/s); a link here stands for one {1 / scale:,.0f} times as fast on {args.gpu_tflops:g} TFLOP/s "
          f"GPUs with stages of hidden {args.real_hidden} x {args.real_layers_per_stage} layers", flush=True)
    for h, m in zip(home, local):
        print(f"  {h:g} Mbit/s there = {m:g} Mbit/s here", flush=True)

    results: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="cfnode-slow-links-"))
    (workdir / "lab").mkdir(parents=True)
    with Lab(workdir / "lab", SUBNET) as lab:
        bench = SlowLinks(args, spec, lab)
        for home_rate, rate in [(None, None), *zip(home, local)]:
            bench.limit(rate)
            label = "unlimited" if rate is None else f"{rate:g} Mbit/s ({home_rate:g} there)"
            runs = {}
            for name in args.variants:
                print(f"{label}: cfnode {name} ...", flush=True)
                runs[name] = bench.run_cfnode(VARIANTS[name], workdir / f"{rate}-{name}")
                _say(runs[name])
            if not args.no_moe:
                print(f"{label}: hivemind.moe ...", flush=True)
                runs["hivemind.moe"] = bench.run_moe(workdir / f"{rate}-moe")
                _say(runs["hivemind.moe"])
            results.append(dict(local_mbit=rate, home_mbit=home_rate, runs=runs))
        leftovers = lab.leftovers
    report = dict(config={k: v for k, v in vars(args).items() if k != "json_out"}, in_process=in_process,
                  cpu_gflops=round(cpu_flops / 1e9, 2), link_scale=scale, results=results,
                  variants={name: asdict(VARIANTS[name]) for name in args.variants})
    print_report(report)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    left = leftovers()
    if left:
        print(f"left behind: {left}", file=sys.stderr)
    return 0 if all(r["ok"] for res in results for r in res["runs"].values()) and not left else 1


def _say(result: dict[str, Any]) -> None:
    if result["ok"]:
        print(f"    {result['tokens_per_s']:,.0f} tokens/s", flush=True)
    else:
        print(f"    failed: {result['error']}\n{result.get('logs', '')}", flush=True)


def print_report(report: dict[str, Any]) -> None:
    results = report["results"]
    unlimited = results[0]["runs"]
    print(f"\n{'link':<28} {'run':<14} {'tokens/s':>9} {'of unlimited':>13} {'vs moe':>7}  bytes/token: "
          "trainer, stages")
    for entry in results:
        rate = entry["local_mbit"]
        label = "unlimited" if rate is None else f"{rate:g} Mbit/s ({entry['home_mbit']:g} there)"
        moe = entry["runs"].get("hivemind.moe", {})
        for name, run in entry["runs"].items():
            if not run["ok"]:
                print(f"{label:<28} {name:<14} {'failed':>9}")
                continue
            base = unlimited.get(name, {})
            share = f"{run['tokens_per_s'] / base['tokens_per_s']:.2f}" if base.get("ok") else ""
            versus = f"{run['tokens_per_s'] / moe['tokens_per_s']:.2f}" if moe.get("ok") and name != "hivemind.moe" \
                else ""
            per_token = run.get("bytes_per_token") or {}
            stages = ", ".join(f"{v:,.0f}" for k, v in per_token.items() if k.startswith("stage"))
            trainer = f"{per_token['trainer']:,.0f}" if "trainer" in per_token else "?"
            print(f"{label:<28} {name:<14} {run['tokens_per_s']:>9,.0f} {share:>13} {versus:>7}  {trainer}; {stages}")


if __name__ == "__main__":
    sys.exit(main())

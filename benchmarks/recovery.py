"""CheckFree recovery time in a live swarm on 127.0.0.1, and the raw hivemind stream throughput beside it.

For each stage size (default: about 5M and about 50M parameters per body stage) this starts a real swarm, each role
its own process, exactly as `cfnode swarm` does: a bootstrap, one `cfnode join --stage N` per body stage and
`cfnode train --batch-size 2 --microbatches 1 --eval-every 0 --log-jsonl ...` (cheap steps). After a few steps it
SIGKILLs the process group of the peer of `--kill-stage` (peer, its DHT process and its p2p daemon) and at once starts
a newcomer `cfnode join --stage auto`, the way `cfnode swarm --kill` does. With a single peer per stage the stage has
no replica left, so the newcomer rebuilds it from its neighbours (CheckFree: gradient-norm-weighted average of the
previous and the next stage). This is repeated `--cycles` times per swarm (the next victim is the newcomer).

Every time below is a unix time on this machine (one clock for all processes):

  kill          time.time() here just before os.killpg(SIGKILL)
  spawn         time.time() here just before the newcomer's Popen
  lost          the trainer's `stage_lost` event ("time" field of its JSON line)
  joining       the newcomer's "joining stage N of S" log line (its own log timestamp, millisecond resolution)
  rebuilt       its "rebuilt by <kind> from ... ; download X s, rebuild Y s" line (X and Y are its own perf_counter
                measurements: both weight downloads, concurrent; then averaging and loading)
  online        its "serving stage N (source: ...)" line, logged right after it announces itself ONLINE
  recovered     the trainer's `stage_recovered` event (its `downtime` is measured by the trainer from `lost`)

Reported per kill: detection (lost - kill), newcomer start-up (joining - spawn: interpreter and imports, DHT and
p2p daemon start, reading the run spec, the random 0-1 s delay of --stage auto and the check of which peers answer),
join -> rebuilt, download, rebuild, kill -> ONLINE, detection -> ONLINE (lost -> online), ONLINE -> trainer
recovered, and the effective download rate: 2 x (stage parameters x 4 bytes) / download seconds.

Before the swarms, the same process measures hivemind's raw stream throughput on loopback: two hivemind DHTs in this
process, `await dht.replicate_p2p()` on each, a ServicerBase with a client-streaming and a server-streaming rpc, and
a ~64 MiB float32 tensor cut with hivemind.utils.streaming.split_for_streaming into 64 KiB chunks (cfnode's
CHUNK_BYTES) and into 1 MiB chunks; plus cfnode's own path (to_chunks on the server, from_chunks on the client,
decode included), which is what a state download uses.

    python benchmarks/recovery.py                          # both sizes, 2 kills each, a few minutes on 2 cores
    python benchmarks/recovery.py --sizes 5M --cycles 1 --json-out /tmp/recovery.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

# hivemind recognises streaming RPCs by typing.AsyncIterator annotations, not collections.abc ones.
from typing import Any, AsyncIterator  # noqa: UP035

import hivemind
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from cfnode.config import RunSpec
from cfnode.launcher import Child, LocalSwarm, SwarmLayout, kill_group, spawn, stop_all
from cfnode.model import build_body_stage, count_parameters
from cfnode.node.events import EventFollower
from cfnode.protocol.messages import CHUNK_BYTES, Envelope, from_chunks, to_chunks

MiB = 2**20
SIZES = {  # name -> (hidden_size, num_heads); layers per stage come from --layers-per-stage
    "5M": (320, 5),
    "50M": (1024, 16),
}
GOAL_SECONDS = 5.0  # the goal: a 50M-parameter stage ONLINE within 5 s of its loss being detected

LOG_STAMP = re.compile(r"^([A-Z][a-z]{2} +\d{1,2} \d{2}:\d{2}:\d{2}\.\d{3}) ")
JOINING = re.compile(r"joining stage (\d+) of (\d+)")
REBUILT = re.compile(r"stage (\d+): rebuilt by (\S+) from (.*) at step (\d+); download ([\d.]+) s, rebuild ([\d.]+) s")
COPIED = re.compile(r"stage (\d+): copied step (\d+) from replica (\S+) in ([\d.]+) s")
SERVING = re.compile(r"serving stage (\d+) \(source: ([^,)]+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES),
                        help="stage sizes to measure: 5M is hidden 320 / 5 heads, 50M is hidden 1024 / 16 heads")
    parser.add_argument("--stages", type=int, default=3, help="body stages (one `cfnode join` each)")
    parser.add_argument("--layers-per-stage", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--kill-stage", type=int, default=2, help="the stage whose peer is SIGKILLed")
    parser.add_argument("--standby", action="store_true",
                        help="start the newcomer before the kill, as a warm spare: cfnode join --stage auto --standby")
    parser.add_argument("--cycles", type=int, default=2, help="kill-and-recover cycles per size, in the same swarm")
    parser.add_argument("--steps-before-kill", type=int, default=5, help="trainer steps before the first kill")
    parser.add_argument("--steps-between", type=int, default=5,
                        help="trainer steps after a recovery before the next kill (and before stopping)")
    parser.add_argument("--recovery", default="checkfree", choices=["checkfree", "checkfree+", "uniform", "copy",
                                                                     "random"], help="the run spec's recovery mode")
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds for the swarm to reach the first kill")
    parser.add_argument("--recovery-timeout", type=float, default=240.0,
                        help="seconds after a kill for the newcomer to serve and the trainer to step again")
    parser.add_argument("--stream-mib", type=float, default=64.0, help="payload of the raw stream test, MiB")
    parser.add_argument("--stream-trials", type=int, default=2, help="transfers per stream variant")
    parser.add_argument("--skip-stream", action="store_true", help="skip the raw stream throughput test")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the swarms' logs go (default: a temp dir, removed unless --keep-logs or failure)")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--json-out", type=Path, default=None, help="write all numbers here as JSON")
    args = parser.parse_args(argv)
    if args.stages < 3 or not 1 < args.kill_stage < args.stages:
        parser.error("need --stages >= 3 and a middle --kill-stage, so the lost stage has a neighbour on each side")
    if args.cycles < 1 or args.steps_before_kill < 1 or args.steps_between < 1:
        parser.error("--cycles, --steps-before-kill and --steps-between must be >= 1")
    return args


# --- raw hivemind stream throughput ------------------------------------------------------------------------------


class StreamBench(ServicerBase):
    """A sink for client streams and a source of server streams, both of pre-built chunks."""

    def __init__(self) -> None:
        self.source: list[runtime_pb2.ExpertResponse] = []

    async def rpc_sink(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                       context: P2PContext) -> runtime_pb2.ExpertResponse:
        received = 0
        async for request in requests:
            received += sum(len(t.buffer) for t in request.tensors)
        return runtime_pb2.ExpertResponse(metadata=str(received).encode())

    async def rpc_source(self, request: runtime_pb2.ExpertRequest,
                         context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        for message in self.source:
            yield message


async def measure_streams(payload_mib: float, trials: int) -> dict[str, Any]:
    """MiB/s of ~payload_mib MiB over hivemind's p2p daemon on loopback, several ways; see the module docstring."""
    loop = asyncio.get_running_loop()
    numel = int(payload_mib * MiB) // 4
    tensor = torch.randn(numel)
    serialized = serialize_torch_tensor(tensor)
    payload_bytes = len(serialized.buffer)

    def start_dht(**kwargs: Any) -> hivemind.DHT:
        return hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], **kwargs)

    server_dht = await loop.run_in_executor(None, start_dht)
    client_dht = await loop.run_in_executor(
        None, lambda: start_dht(initial_peers=[str(m) for m in server_dht.get_visible_maddrs()]))
    server_p2p = await server_dht.replicate_p2p()
    client_p2p = await client_dht.replicate_p2p()
    servicer = StreamBench()
    await servicer.add_p2p_handlers(server_p2p)
    stub = StreamBench.get_stub(client_p2p, server_p2p.peer_id)
    results: dict[str, Any] = {"payload_bytes": payload_bytes, "payload_mib": round(payload_bytes / MiB, 3)}
    try:
        for chunk in (CHUNK_BYTES, MiB):
            chunks = list(split_for_streaming(serialized, chunk))
            requests = [runtime_pb2.ExpertRequest(tensors=[c]) for c in chunks]
            servicer.source = [runtime_pb2.ExpertResponse(tensors=[c]) for c in chunks]

            async def upload(requests=requests) -> None:
                async def stream() -> AsyncIterator[runtime_pb2.ExpertRequest]:
                    for request in requests:
                        yield request

                reply = await stub.rpc_sink(stream())
                if int(reply.metadata) != payload_bytes:
                    raise RuntimeError(f"sink received {reply.metadata!r} bytes, sent {payload_bytes}")

            async def download() -> None:
                received = 0
                async for reply in await stub.rpc_source(runtime_pb2.ExpertRequest()):
                    received += sum(len(t.buffer) for t in reply.tensors)
                if received != payload_bytes:
                    raise RuntimeError(f"received {received} bytes of {payload_bytes}")

            for name, fn in ((f"client stream (upload), {chunk // 1024} KiB chunks", upload),
                             (f"server stream (download), {chunk // 1024} KiB chunks", download)):
                results[name] = await _timed_trials(fn, payload_bytes, trials)
                print(f"  {name}: {results[name]['median_mib_s']:.1f} MiB/s (median of {trials})", flush=True)

        # cfnode's own path for a state download: to_chunks on the server, from_chunks (and decode) here.
        servicer.source = list(to_chunks(Envelope({"names": ["x"]}, [tensor]), runtime_pb2.ExpertResponse))

        async def cfnode_download() -> None:
            envelope = await from_chunks(await stub.rpc_source(runtime_pb2.ExpertRequest()), 2**36)
            if envelope.tensors[0].numel() != numel:
                raise RuntimeError("cfnode download decoded the wrong tensor")

        name = f"cfnode to_chunks -> from_chunks (download + decode), {CHUNK_BYTES // 1024} KiB chunks"
        results[name] = await _timed_trials(cfnode_download, payload_bytes, trials)
        print(f"  {name}: {results[name]['median_mib_s']:.1f} MiB/s (median of {trials})", flush=True)

        started = time.perf_counter()
        list(to_chunks(Envelope({"names": ["x"]}, [tensor]), runtime_pb2.ExpertResponse))
        encode = time.perf_counter() - started
        results["cfnode to_chunks encode only (no network)"] = dict(
            seconds=round(encode, 4), mib_s=round(payload_bytes / MiB / encode, 1))
    finally:
        for p2p in (client_p2p, server_p2p):
            await p2p.shutdown()
        for dht in (client_dht, server_dht):
            await loop.run_in_executor(None, dht.shutdown)
    return results


async def _timed_trials(fn, payload_bytes: int, trials: int) -> dict[str, Any]:
    seconds = []
    for _ in range(trials):
        started = time.perf_counter()
        await fn()
        seconds.append(time.perf_counter() - started)
    rates = [payload_bytes / MiB / s for s in seconds]
    return dict(seconds=[round(s, 4) for s in seconds], mib_s=[round(r, 1) for r in rates],
                median_mib_s=round(statistics.median(rates), 1))


def measure_imports(trials: int = 2) -> dict[str, Any]:
    """Wall time of a fresh interpreter importing what `cfnode join` imports: the floor under a newcomer's start-up."""
    seconds = []
    for _ in range(trials):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import cfnode.cli, cfnode.node.join"], check=True)
        seconds.append(round(time.perf_counter() - started, 3))
    return dict(seconds=seconds, median_s=round(statistics.median(seconds), 3))


# --- following the swarm's logs ----------------------------------------------------------------------------------


def log_time(line: str) -> float | None:
    """Unix time of a hivemind log line ("Nov 27 14:59:36.518 [INFO] ..."), local time, this year."""
    match = LOG_STAMP.match(line)
    if not match:
        return None
    now = datetime.now()
    stamp = datetime.strptime(f"{now.year} {match.group(1)}", "%Y %b %d %H:%M:%S.%f")
    if stamp.month == 12 and now.month == 1:
        stamp = stamp.replace(year=now.year - 1)  # a line logged before midnight on Dec 31
    return stamp.timestamp()


class NewcomerLog:
    """Scans a newcomer's log for its milestones; keeps each one's log time and the time this script saw it."""

    def __init__(self, child: Child):
        self.child = child
        self.marks: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []
        self._offset = 0

    def poll(self) -> None:
        try:
            with open(self.child.log_path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        seen_at = time.time()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line may be half written: read it again next time
        self._offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            for name, pattern in (("joining", JOINING), ("rebuilt", REBUILT), ("copied", COPIED),
                                  ("online", SERVING)):
                match = pattern.search(line)
                if match and name not in self.marks:
                    self.marks[name] = dict(log_time=log_time(line), seen_at=seen_at, groups=match.groups(),
                                            line=line.strip())
            if "[WARN" in line or "[ERROR" in line or "Traceback" in line:
                self.problems.append(line.strip()[:400])

    def when(self, name: str) -> float | None:
        mark = self.marks.get(name)
        if mark is None:
            return None
        return mark["log_time"] if mark["log_time"] is not None else mark["seen_at"]


def last_step(follower: EventFollower) -> int:
    return max((e["step"] for e in follower.events if e.get("event") == "step"), default=0)


def _wait(condition, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def _first(events: list[dict[str, Any]], kind: str, after: float, stage: int | None = None) -> dict[str, Any] | None:
    """The first event of `kind` logged at or after unix time `after` (for `stage`, if given)."""
    for event in events:
        if event.get("event") != kind or event.get("time", 0) < after:
            continue
        if stage is None or event.get("stage") == stage:
            return event
    return None


def _diff(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else round(later - earlier, 3)


# --- one swarm, several kills ------------------------------------------------------------------------------------


def run_size(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    hidden, heads = SIZES[name]
    spec = RunSpec(run_id=f"recovery-{name}", num_stages=args.stages, layers_per_stage=args.layers_per_stage,
                   hidden_size=hidden, num_heads=heads, seq_len=args.seq_len, recovery=args.recovery)
    params = count_parameters(build_body_stage(spec, args.kill_stage))
    weights_mib = params * 4 / MiB
    print(f"\n== {name}: {args.stages} stages x {args.layers_per_stage} layers, hidden {hidden}, {heads} heads, "
          f"seq_len {args.seq_len}; {params:,} parameters per stage ({weights_mib:.1f} MiB in float32)", flush=True)
    workdir = root / name
    workdir.mkdir(parents=True, exist_ok=True)
    events_path = workdir / "trainer.jsonl"
    events_path.unlink(missing_ok=True)
    train_args = ["--eval-every", "0"]
    layout = SwarmLayout(spec=spec, steps=100_000, log_jsonl=str(events_path), batch_size=args.batch_size,
                         microbatches=1, workdir=workdir, log_level="info", train_args=train_args)
    swarm = LocalSwarm(layout)
    result: dict[str, Any] = dict(size=name, hidden_size=hidden, num_heads=heads, parameters_per_stage=params,
                                  weights_mib=round(weights_mib, 2), workdir=str(workdir), cycles=[])
    follower = EventFollower(events_path)
    try:
        started = time.time()
        swarm.start_bootstrap()
        for stage in range(1, spec.num_stages + 1):
            swarm.start_peer(stage)
        result["train_command"] = ["cfnode", *swarm.train_command()]
        trainer = spawn("trainer", swarm.train_command(), workdir / "trainer.log")
        swarm.children.append(trainer)

        def trainer_alive() -> None:
            if trainer.process.poll() is not None:
                raise RuntimeError(f"the trainer exited with status {trainer.process.returncode}; "
                                   f"see {trainer.log_path}")

        def reached(step: int):
            trainer_alive()
            follower.poll()
            return last_step(follower) >= step

        _wait(lambda: reached(args.steps_before_kill), args.start_timeout, f"step {args.steps_before_kill}")
        result["start_to_first_kill_s"] = round(time.time() - started, 2)
        step_times = [e["step_time"] for e in follower.events if e.get("event") == "step"][1:]
        result["median_step_s_before_kill"] = round(statistics.median(step_times), 4) if step_times else None
        print(f"  swarm up and stepping after {result['start_to_first_kill_s']:.1f} s "
              f"(median step {result['median_step_s_before_kill']} s)", flush=True)

        for cycle in range(1, args.cycles + 1):
            record = kill_and_recover(swarm, follower, trainer_alive, args, params)
            record["cycle"] = cycle
            result["cycles"].append(record)
            print_cycle(name, record)
            target = last_step(follower) + args.steps_between
            _wait(lambda target=target: reached(target), args.recovery_timeout, f"step {target}")
        result["ok"] = True
    except (TimeoutError, RuntimeError) as e:
        result["ok"] = False
        result["error"] = str(e)
        print(f"  FAILED: {e}; logs in {workdir}", file=sys.stderr, flush=True)
    finally:
        # The trainer first: peers leaving under a live trainer would log one more stage_lost.
        trainers = [c for c in swarm.children if c.name == "trainer"]
        stop_all(trainers)
        stop_all([c for c in swarm.children if c not in trainers])
        follower.poll()
    result["events"] = {}
    for event in follower.events:
        result["events"][event["event"]] = result["events"].get(event["event"], 0) + 1
    result["log_problems"] = scan_logs(workdir)
    return result


def kill_and_recover(swarm: LocalSwarm, follower: EventFollower, trainer_alive, args: argparse.Namespace,
                     params: int) -> dict[str, Any]:
    stage = args.kill_stage
    victims = [c for c in swarm.peers if c.process.poll() is None and swarm.stage_of(c) == stage]
    if not victims:
        raise RuntimeError(f"no live peer of stage {stage} to kill")
    if args.standby:
        # A warm spare, started before the failure: it is connected and waiting when the stage is lost.
        t_spawn = time.time()
        newcomer = swarm.start_peer("auto", "--standby")
        _wait(lambda: "standing by" in newcomer.log_path.read_text(errors="replace") if newcomer.log_path.exists()
              else False, args.recovery_timeout, "the standby peer to be ready")
    step_at_kill = last_step(follower)
    t_kill = time.time()
    for child in victims:
        kill_group(child)
    for child in victims:
        child.process.wait(10)
    t_killed = time.time()
    if not args.standby:
        t_spawn = time.time()
        newcomer = swarm.start_peer("auto")
    log = NewcomerLog(newcomer)

    def done() -> bool:
        trainer_alive()
        if newcomer.process.poll() is not None:
            raise RuntimeError(f"the newcomer exited with status {newcomer.process.returncode}; "
                               f"see {newcomer.log_path}")
        follower.poll()
        log.poll()
        recovered = _first(follower.events, "stage_recovered", t_kill, stage)
        stepped = any(e.get("event") == "step" and e.get("time", 0) > t_kill for e in follower.events)
        return "online" in log.marks and recovered is not None and stepped

    _wait(done, args.recovery_timeout, f"stage {stage} to be served again and the trainer to step")
    events = follower.events
    lost = _first(events, "stage_lost", t_kill, stage)
    failed = _first(events, "peer_failed", t_kill, stage)
    recovered = _first(events, "stage_recovered", t_kill, stage)
    next_step = _first(events, "step", t_kill)
    t_lost = lost["time"] if lost else None
    t_joining, t_rebuilt, t_online = log.when("joining"), log.when("rebuilt"), log.when("online")
    rebuilt = log.marks.get("rebuilt")
    download_s = float(rebuilt["groups"][4]) if rebuilt else None
    rebuild_s = float(rebuilt["groups"][5]) if rebuilt else None
    joined_stage = int(log.marks["joining"]["groups"][0]) if "joining" in log.marks else None
    download_bytes = 2 * params * 4
    return dict(
        victims=[c.process.pid for c in victims], newcomer_pid=newcomer.process.pid,
        newcomer_log=str(newcomer.log_path),
        step_at_kill=step_at_kill, newcomer_stage=joined_stage, wrong_stage=joined_stage != stage,
        source=log.marks["online"]["groups"][1] if "online" in log.marks else None,
        rebuilt_line=rebuilt["line"] if rebuilt else None,
        times=dict(kill=round(t_kill, 3), killed=round(t_killed, 3), spawn=round(t_spawn, 3),
                   peer_failed=failed and failed["time"],
                   lost=t_lost, joining=t_joining, rebuilt=t_rebuilt, online=t_online,
                   recovered=recovered and recovered["time"], next_step=next_step and next_step["time"]),
        kill_wait_s=_diff(t_killed, t_kill),
        detect_s=_diff(t_lost, t_kill),
        first_failure_s=_diff(failed and failed["time"], t_kill),
        startup_s=_diff(t_joining, t_spawn),
        join_to_rebuilt_s=_diff(t_rebuilt, t_joining),
        download_s=download_s,
        rebuild_s=rebuild_s,
        rebuilt_to_online_s=_diff(t_online, t_rebuilt),
        kill_to_online_s=_diff(t_online, t_kill),
        lost_to_online_s=_diff(t_online, t_lost),
        online_to_recovered_s=_diff(recovered and recovered["time"], t_online),
        trainer_downtime_s=recovered.get("downtime") if recovered else None,
        kill_to_next_step_s=_diff(next_step and next_step["time"], t_kill),
        download_mib=round(download_bytes / MiB, 2),
        download_mib_s=round(download_bytes / MiB / download_s, 1) if download_s else None,
        newcomer_problems=log.problems,
    )


def scan_logs(workdir: Path) -> dict[str, list[str]]:
    """WARN / ERROR lines and tracebacks of every process of a swarm, per log file (first 20 each)."""
    found = {}
    for path in sorted(workdir.glob("*.log")):
        lines = [line.strip()[:300] for line in path.read_text(errors="replace").splitlines()
                 if "[WARN" in line or "[ERROR" in line or "Traceback" in line or "Error:" in line]
        if lines:
            found[path.name] = lines[:20] + ([f"... {len(lines) - 20} more"] if len(lines) > 20 else [])
    return found


# --- report ------------------------------------------------------------------------------------------------------

COLUMNS = [("detect", "detect_s"), ("start-up", "startup_s"), ("join->rebuilt", "join_to_rebuilt_s"),
           ("download", "download_s"), ("rebuild", "rebuild_s"), ("kill->ONLINE", "kill_to_online_s"),
           ("lost->ONLINE", "lost_to_online_s"), ("ONLINE->back", "online_to_recovered_s"),
           ("downtime", "trainer_downtime_s"), ("dl MiB/s", "download_mib_s")]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def print_cycle(name: str, record: dict[str, Any]) -> None:
    parts = ", ".join(f"{label} {_fmt(record[key])}" for label, key in COLUMNS)
    print(f"  kill {record.get('cycle', '?')}: {parts} (source {record['source']})", flush=True)


def print_report(report: dict[str, Any]) -> None:
    print()
    print("times in seconds; detect = kill -> trainer's stage_lost; start-up = newcomer spawn -> 'joining stage'; "
          "ONLINE = its 'serving stage' line;")
    print("ONLINE->back = ONLINE -> trainer's stage_recovered; downtime = the trainer's own stage_lost -> "
          "stage_recovered; dl MiB/s = 2 x stage weights (float32) / download")
    header = f"{'size':<5} {'params/stage':>12} {'kill':>4} " + " ".join(f"{label:>13}" for label, _ in COLUMNS)
    print(header)
    for size in report["sizes"]:
        for record in size["cycles"]:
            print(f"{size['size']:<5} {size['parameters_per_stage']:>12,} {record['cycle']:>4} "
                  + " ".join(f"{_fmt(record[key]):>13}" for _, key in COLUMNS))
        if not size.get("ok"):
            print(f"{size['size']:<5} FAILED: {size.get('error')}")
    if report.get("stream"):
        print()
        print(f"raw hivemind stream on loopback ({report['stream']['payload_mib']} MiB payload):")
        for key, value in report["stream"].items():
            if isinstance(value, dict) and "median_mib_s" in value:
                print(f"  {key:<80} {value['median_mib_s']:>8.1f} MiB/s  (trials: {value['mib_s']})")
            elif isinstance(value, dict):
                print(f"  {key:<80} {value['mib_s']:>8.1f} MiB/s")
    print(f"a fresh interpreter importing cfnode's join command takes {report['imports']['median_s']:.2f} s "
          "(median); it is part of every newcomer's start-up")
    goal = report["goal"]
    print()
    print(f"goal: a 50M-parameter stage ONLINE within {GOAL_SECONDS:.0f} s of its loss being detected: "
          f"{goal['verdict']}")


def evaluate_goal(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    large = next((s for s in sizes if s["size"] == "50M"), None)
    if large is None or not large["cycles"]:
        return dict(verdict="not measured", lost_to_online_s=[])
    values = [c["lost_to_online_s"] for c in large["cycles"]]
    measured = [v for v in values if v is not None]
    met = bool(measured) and all(v <= GOAL_SECONDS for v in measured) and len(measured) == len(values)
    verdict = ("met" if met else "NOT met") + f" (detection -> ONLINE: {', '.join(_fmt(v) for v in values)} s)"
    return dict(verdict=verdict, met=met, lost_to_online_s=values, trainer_downtime_s=[
        c["trainer_downtime_s"] for c in large["cycles"]])


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="cfnode-recovery-"))
    root.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # SIGTERM stops every process we started
    report: dict[str, Any] = dict(
        date=datetime.now().astimezone().isoformat(timespec="seconds"), python=platform.python_version(),
        torch_version=torch.__version__, hivemind_version=hivemind.__version__, cpu_count=os.cpu_count(),
        load_avg_start=os.getloadavg(), config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        workdir=str(root),
    )
    try:
        if not args.skip_stream:
            print(f"raw hivemind stream throughput, {args.stream_mib:g} MiB payload, two DHTs in this process",
                  flush=True)
            report["stream"] = asyncio.run(measure_streams(args.stream_mib, args.stream_trials))
        report["imports"] = measure_imports()
        print(f"fresh interpreter importing cfnode's join command: {report['imports']['seconds']} s", flush=True)
        report["sizes"] = [run_size(name, args, root) for name in args.sizes]
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    report["load_avg_end"] = os.getloadavg()
    report["goal"] = evaluate_goal(report["sizes"])
    print_report(report)
    ok = all(s.get("ok") for s in report["sizes"])
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    if ok and not args.keep_logs and args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"logs kept in {root}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

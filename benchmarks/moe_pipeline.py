"""SWARM-style pipeline built from hivemind.moe: a throughput baseline for cfnode's swarm, on 127.0.0.1.

This is the mechanism SWARM parallelism runs on, taken from hivemind 1.1.12 as is:

  * one `hivemind.moe.Server` per body stage, each in its own process (`serve` below), hosting ONE `ModuleBackend`
    whose module is `build_body_stage(spec, N)`, with AdamW (lr, weight decay, betas (0.9, 0.95) as the in-process
    run) inside hivemind's own `ClippingWrapper(spec.grad_clip)`, declared on the DHT as expert `stage.N`;
  * the trainer (the calling process) holds the head (embedding, final norm, LM head), finds the experts on the DHT
    (`hivemind.moe.get_experts`) and chains them: embed -> RemoteExpert(stage.1) -> ... -> RemoteExpert(stage.S) ->
    head.loss; `backward()` runs through the RemoteExperts with autograd (`_RemoteModuleCall`), so each server gets
    (its input, the gradient of its output) and returns the gradient of its input;
  * the microbatches of a step run concurrently (one thread each), so several are in flight along the pipeline;
    each server's `Runtime` batches whatever requests are queued at once (up to `max_batch_size` sequences).
    `concurrent=False` / `--sequential` runs them one at a time.

How it differs from cfnode (and from `run_in_process` in benchmarks/throughput.py, which it otherwise mirrors:
same RunSpec and weights, same data and step numbering, the same microbatches via `.chunk`, loss / microbatches,
AdamW + gradient clipping per part, warm-up steps then timed steps with `time.perf_counter`):

  * a `ModuleBackend` keeps no activations: forward runs under `no_grad`, and backward recomputes the forward pass
    from the input it is sent back (as cfnode's peers also do);
  * hivemind's `ModuleBackend.on_backward` applies the optimizer (clip + AdamW step) after EVERY backward batch its
    Runtime processes: with `expert_step="backward"` (the default, hivemind's stock behaviour) a stage takes one step
    per microbatch -- or per group of microbatches that happened to be batched together, so the number of steps per
    training step depends on timing -- on the gradient of loss / microbatches, and later microbatches of a step may be
    recomputed with weights that moved since their forward pass. `expert_step="batch"` overrides `on_backward` to
    accumulate gradients until a whole step's `batch_size` sequences went back, then clip and step once: the same
    update as the in-process run (and cfnode): its losses match run_in_process's (same final loss to 5 decimals,
    concurrent or not). The head is always clipped and stepped once per step;
  * no replicas, no load balancing, no fault tolerance, no averaging: one server per stage and a fixed chain;
  * activations travel through hivemind's ConnectionHandler processes and TaskPool processes (shared memory) into
    the Runtime thread, and back; tensors of more than 2 MiB are streamed by hivemind itself.

    python benchmarks/moe_pipeline.py run                        # 3 stages x 2 layers, hidden 128, 30 + 5 steps
    python benchmarks/moe_pipeline.py run --steps 10 --warmup 2 --sequential
    python benchmarks/moe_pipeline.py run --expert-step batch --threads 1 --json-out moe.json

    from moe_pipeline import run_moe_pipeline                    # with benchmarks/ on sys.path
    result = run_moe_pipeline(spec, dataset, batch_size=16, microbatches=4, steps=30, warmup=5, seed=0)

`serve` (`python benchmarks/moe_pipeline.py serve --stage N --spec-json ... --initial-peers ...`) is the server
process that `run_moe_pipeline` starts per stage; it stops when its stdin closes (its parent closed it or died).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hivemind import DHT
from hivemind.moe import ModuleBackend, Server, get_experts
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.server.dht_handler import DHTHandlerThread
from hivemind.moe.server.layers.optim import ClippingWrapper
from hivemind.utils.logging import get_logger
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from cfnode.config import RunSpec
from cfnode.data import TextDataset, batch_generator, load_corpus
from cfnode.model import build_body_stage, build_head

logger = get_logger(__name__)

LOCALHOST = "127.0.0.1"
READY_MARKER = "MOE-PIPELINE-READY"  # a server prints it on stdout once its Server accepts requests
EXPERT_STEPS = ("backward", "batch")


def expert_uid(stage: int) -> str:
    return f"stage.{stage}"


# --- the server of one body stage (a subprocess) ----------------------------------------------------------------


class StepPerBatchBackend(ModuleBackend):
    """A ModuleBackend that accumulates gradients over `samples_per_step` sequences, then clips and steps once.

    Stock `ModuleBackend.on_backward` steps after every backward batch; this one steps once per training step of the
    trainer, as the in-process run does (the trainer sends back exactly `batch_size` sequences per step).
    """

    def __init__(self, *args: Any, samples_per_step: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.samples_per_step = samples_per_step
        self._pending_samples = 0

    def on_backward(self, batch_size: int) -> None:
        self._pending_samples += batch_size
        if self._pending_samples >= self.samples_per_step:
            self._pending_samples = 0
            super().on_backward(batch_size)


class DeclareWhenReady(DHTHandlerThread):
    """hivemind's DHTHandlerThread (declares the experts every update_period), held back until the server is ready.

    Server.run starts it just before it forks the ConnectionHandler processes (then the Runtime forks the TaskPools).
    Its first declaration then talks to the DHT from another thread while those forks happen, and on this 2-core
    machine about one server start in six hung: a forked ConnectionHandler stuck in Thread.start() inside
    multiprocessing's resource_sharer, so Server.ready never came. Declaring only once the server is ready (every fork
    done) removes that window.
    """

    def __init__(self, ready: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._server_ready = ready  # Server.ready, a multiprocessing.Event

    def run(self) -> None:
        while not self._server_ready.wait(0.1):
            if self.stop.is_set():
                return
        super().run()


def host_maddrs(host: str) -> list[str]:
    return [f"/ip4/{host}/tcp/0"]


def serve(spec: RunSpec, stage: int, initial_peers: list[str], threads: int | None, max_batch_size: int,
          num_handlers: int, expert_step: str, samples_per_step: int, update_period: float = 30.0,
          ready_timeout: float = 300.0, host: str = LOCALHOST) -> None:
    """Host body stage `stage` as hivemind expert `stage.N` until stdin closes."""
    if threads is not None:
        torch.set_num_threads(threads)
    # No SIGTERM handler on purpose: hivemind forks TaskPools and ConnectionHandlers from this process, they would
    # inherit it, and Runtime.shutdown() stops the pools with SIGTERM. The parent closes our stdin to stop us.
    stop = threading.Event()
    stdin_fd = sys.stdin.fileno()

    def watch_stdin() -> None:
        # os.read on the raw fd, not sys.stdin: a thread blocked inside sys.stdin's buffer holds its lock, and every
        # process multiprocessing forks from here (the DHT first) calls sys.stdin.close() at start-up -> deadlock.
        with contextlib.suppress(OSError):
            while os.read(stdin_fd, 4096):  # b"" at EOF: the parent closed the pipe, or died
                pass
        stop.set()

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()

    uid = expert_uid(stage)
    module = build_body_stage(spec, stage)
    optimizer = ClippingWrapper(
        torch.optim.AdamW(module.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95)),
        spec.grad_clip)
    hidden = BatchTensorDescriptor.from_tensor(torch.zeros(1, spec.seq_len, spec.hidden_size))  # (None, T, C)
    backend_kwargs: dict[str, Any] = dict(name=uid, module=module, optimizer=optimizer, args_schema=(hidden,),
                                          outputs_schema=hidden, min_batch_size=1, max_batch_size=max_batch_size)
    if expert_step == "batch":
        backend: ModuleBackend = StepPerBatchBackend(samples_per_step=samples_per_step, **backend_kwargs)
    else:
        backend = ModuleBackend(**backend_kwargs)

    dht = DHT(initial_peers=initial_peers, host_maddrs=host_maddrs(host), start=True)
    server = Server(dht, {uid: backend}, num_connection_handlers=num_handlers, update_period=update_period)
    server.dht_handler_thread = DeclareWhenReady(server.ready, module_backends=server.module_backends, dht=dht,
                                                 update_period=update_period, daemon=True)
    try:
        server.start()  # Server.run: DHT declarations, ConnectionHandlers, then the Runtime (TaskPools) in this thread
        deadline = time.monotonic() + ready_timeout
        while not server.ready.wait(0.2):
            if stop.is_set():
                return
            if not server.is_alive():
                raise RuntimeError("the hivemind Server thread exited before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the hivemind Server was not ready after {ready_timeout:g} s")
        print(f"{READY_MARKER} {uid} {dht.peer_id} pid {os.getpid()}", flush=True)
        stop.wait()
    finally:
        if server.ready.is_set():
            # Stop the Runtime only: Server.run then calls Server.shutdown() once, in its own thread (handlers,
            # DHT declarations, the DHT and its p2pd, the pools).
            server.runtime.shutdown()
        else:
            server.shutdown()
        server.join(timeout=30)
        if server.is_alive() and os.getpgid(0) == os.getpid():  # hung (e.g. in a ConnectionHandler's start-up)
            print("hivemind Server did not stop; killing this server's process group", flush=True)
            os.killpg(0, signal.SIGKILL)  # we lead our own group (the trainer starts us with start_new_session)


# --- the trainer -------------------------------------------------------------------------------------------------


class _ServerProcess:
    """One `serve` subprocess, in its own session (process group), stdout+stderr drained by a thread."""

    def __init__(self, stage: int, argv: list[str], env: dict[str, str]) -> None:
        self.stage = stage
        self.ready = threading.Event()
        self.peer_id: str | None = None  # of its DHT (the peer its expert is declared with), from the ready line
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True, text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, name=f"stage{stage}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.tail.append(line.rstrip("\n"))
            if line.startswith(READY_MARKER):
                self.peer_id = line.split()[2]
                self.ready.set()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.popen.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def close_stdin(self) -> None:
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()

    def kill_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def finish(self, deadline: float, kill_after: float = 5.0) -> None:
        """After close_stdin: wait for a clean exit until deadline, then SIGTERM, then SIGKILL the whole group."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            # the group may outlive its leader (p2pd, forked pools): test both (alive() first: it reaps the leader)
            if not self.alive() and not self._group_alive():
                break
            self.kill_group(sig)
            _wait_until(lambda: not self.alive() and not self._group_alive(), time.monotonic() + kill_after)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=kill_after)
        self._reader.join(timeout=2)
        if self.popen.stdout is not None:
            with contextlib.suppress(OSError):
                self.popen.stdout.close()


def _wait_until(condition: Callable[[], bool], deadline: float, poll: float = 0.1) -> bool:
    """Poll condition until it holds (True) or the monotonic deadline passes (False)."""
    while True:
        if condition():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(poll, remaining))


def _serve_argv(spec: RunSpec, stage: int, initial_peers: list[str], threads: int | None, max_batch_size: int,
                num_handlers: int, expert_step: str, samples_per_step: int, where: StageHost) -> list[str]:
    argv = [*where.prefix, sys.executable, str(Path(__file__).resolve()), "serve", "--stage", str(stage),
            "--host", where.address,
            "--spec-json", json.dumps(spec.to_dict()), "--max-batch-size", str(max_batch_size),
            "--handlers", str(num_handlers), "--expert-step", expert_step,
            "--samples-per-step", str(samples_per_step), "--initial-peers", *initial_peers]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv


def _server_env(threads: int | None, server_log_level: str) -> dict[str, str]:
    env = dict(os.environ)
    env["HIVEMIND_LOGLEVEL"] = server_log_level.upper()
    repo_root = str(Path(__file__).resolve().parent.parent)  # cfnode importable even without an installed package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


@dataclass(frozen=True)
class StageHost:
    """Where a stage's server runs: a command prefix (such as `ip netns exec NS`) and the address it listens on."""

    prefix: tuple[str, ...] = ()
    address: str = LOCALHOST

    @classmethod
    def parse(cls, text: str) -> StageHost:
        """`NAMESPACE@ADDRESS` (a network namespace of this machine), or just `ADDRESS`."""
        namespace, _, address = text.rpartition("@")
        return cls(("ip", "netns", "exec", namespace) if namespace else (), address)


def run_moe_pipeline(spec: RunSpec, dataset: TextDataset, batch_size: int, microbatches: int, steps: int,
                     warmup: int, seed: int, threads: int | None = None, timeout: float = 600.0,
                     concurrent: bool = True, expert_step: str = "backward", num_handlers: int = 4,
                     server_log_level: str = "warning", verbose: bool = False, host: str = LOCALHOST,
                     stage_hosts: dict[int, StageHost] | None = None) -> dict[str, Any]:
    """Train warmup + steps steps of fresh weights on a hivemind.moe pipeline; time the last `steps` of them.

    One `serve` subprocess per body stage, the head and the training loop in this process; this process's DHT
    listens on `host`, and stage N's server runs where `stage_hosts[N]` says (default: 127.0.0.1 here).
    Returns the keys of throughput.run_in_process (tokens, time_s, tokens_per_s, median_step_s,
    median_tokens_per_s, final_loss) plus ok and wall_s (start of the DHT to the end of the shutdown); on failure or
    after `timeout` seconds (all of it, start-up included), ok=False, error and server_logs (last lines of each
    server) instead of the numbers. Every process it started is stopped before it returns.
    """
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
    if batch_size < 1 or microbatches < 1 or batch_size % microbatches:
        raise ValueError("batch_size must be a positive multiple of microbatches")
    if expert_step not in EXPERT_STEPS:
        raise ValueError(f"expert_step must be one of {EXPERT_STEPS}, got {expert_step!r}")

    def say(message: str) -> None:
        if verbose:
            print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    previous_threads = torch.get_num_threads()
    servers: list[_ServerProcess] = []
    experts: list[RemoteExpert] = []
    dht: DHT | None = None
    result: dict[str, Any] = dict(ok=False)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        dht = DHT(host_maddrs=host_maddrs(host), start=True)
        initial_peers = [str(maddr) for maddr in dht.get_visible_maddrs()]
        env = _server_env(threads, server_log_level)
        for stage in range(1, spec.num_stages + 1):
            argv = _serve_argv(spec, stage, initial_peers, threads, max_batch_size=batch_size,
                               num_handlers=num_handlers, expert_step=expert_step, samples_per_step=batch_size,
                               where=(stage_hosts or {}).get(stage, StageHost()))
            servers.append(_ServerProcess(stage, argv, env))
        say(f"started {len(servers)} stage servers (pids {', '.join(str(s.popen.pid) for s in servers)})")

        def dead_server() -> _ServerProcess | None:
            return next((s for s in servers if not s.alive()), None)

        def check_servers() -> None:
            dead = dead_server()
            if dead is not None:
                raise RuntimeError(f"stage {dead.stage} server exited with code {dead.popen.returncode}")

        def all_ready() -> bool:
            check_servers()
            return all(s.ready.is_set() for s in servers)

        if not _wait_until(all_ready, deadline, poll=0.2):
            raise TimeoutError("stage servers did not become ready in time")
        uids = [expert_uid(stage) for stage in range(1, spec.num_stages + 1)]
        found: list[RemoteExpert | None] = []

        def all_declared() -> bool:
            nonlocal found
            check_servers()
            found = get_experts(dht, uids)
            # each expert must be declared by the server we started for it (not a stale or foreign declaration)
            return all(e is not None and str(e.peer_id) == s.peer_id for e, s in zip(found, servers))

        if not _wait_until(all_declared, deadline, poll=0.2):
            missing = [uid for uid, e, s in zip(uids, found, servers) if e is None or str(e.peer_id) != s.peer_id]
            raise TimeoutError(f"experts {missing} did not appear on the DHT in time")
        experts = [e for e in found if e is not None]
        for expert in experts:
            _ = expert.info  # rpc_info once, here, rather than racing for it from several microbatch threads
        say(f"found experts {', '.join(f'{e.uid}@{str(e.peer_id)[-6:]}' for e in experts)} "
            f"after {time.perf_counter() - started:.1f} s")

        outcome: dict[str, Any] = {}
        training = threading.Thread(
            target=_train, name="moe-trainer", daemon=True,
            args=(spec, dataset, experts, batch_size, microbatches, steps, warmup, seed, concurrent, outcome, say))
        training.start()
        while training.is_alive():  # the training thread blocks in RPCs with no timeout of their own
            training.join(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            if training.is_alive():
                check_servers()
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"training did not finish within the {timeout:g} s timeout "
                                       f"({outcome.get('steps_done', 0)} of {warmup + steps} steps done)")
        if "error" in outcome:
            raise outcome["error"]
        result.update(outcome["result"], ok=True)
    except Exception as e:
        result.update(error=f"{type(e).__name__}: {e}",
                      server_logs={f"stage{s.stage}": list(s.tail)[-20:] for s in servers})
        logger.warning(f"moe pipeline run failed: {type(e).__name__}: {e}")
    finally:
        for server in servers:
            server.close_stdin()  # graceful: each server shuts its Server, DHT and p2pd down
        stop_deadline = time.monotonic() + 30.0
        for server in servers:
            server.finish(stop_deadline)
        if experts:
            with contextlib.suppress(Exception):  # the p2p replica that RemoteExperts use: a client of our p2pd
                RemoteExpertWorker.run_coroutine(experts[0].p2p.shutdown(), return_future=True).result(timeout=10)
        if dht is not None:
            dht.shutdown()
        torch.set_num_threads(previous_threads)
        result["wall_s"] = round(time.perf_counter() - started, 2)
    return result


def _train(spec: RunSpec, dataset: TextDataset, experts: list[RemoteExpert], batch_size: int, microbatches: int,
           steps: int, warmup: int, seed: int, concurrent: bool, outcome: dict[str, Any],
           say: Callable[[str], None]) -> None:
    """The training loop (in its own thread): fills outcome['result'] or outcome['error']."""
    try:
        head = build_head(spec)
        optimizer = torch.optim.AdamW(head.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95))
        head_lock = threading.Lock()  # the head's grads are accumulated by several microbatch threads

        def microbatch(x: torch.Tensor, y: torch.Tensor) -> float:
            # The graph is cut at the head's two ends so that only the head's parts run under the lock:
            # embed | stage 1 .. stage S (RemoteExperts, concurrent) | loss. Same gradients as one backward().
            with head_lock:
                embedded = head.embed(x)  # (b, T, C)
            first = embedded.detach().requires_grad_(True)
            hidden = first
            for expert in experts:
                hidden = expert(hidden)  # (b, T, C), a forward RPC; autograd records a _RemoteModuleCall
            last = hidden.detach().requires_grad_(True)
            with head_lock:
                loss = head.loss(last, y)
                (loss / microbatches).backward()  # accumulate, as run_in_process scales each microbatch's loss
            hidden.backward(last.grad)  # backward RPCs S .. 1: each server recomputes, returns grad, (maybe) steps
            with head_lock:
                embedded.backward(first.grad)
            return loss.item()

        def train_step(step: int) -> float:
            inputs, targets = dataset.sample_batch(batch_size, batch_generator(seed, step))  # (B, T) each
            pairs = list(zip(inputs.chunk(microbatches), targets.chunk(microbatches)))
            losses: list[float] = [float("nan")] * len(pairs)
            if concurrent and len(pairs) > 1:
                errors: list[BaseException] = []

                def work(i: int) -> None:
                    try:
                        losses[i] = microbatch(*pairs[i])
                    except BaseException as e:  # noqa: B036 -- re-raised in the stepping thread
                        errors.append(e)

                workers = [threading.Thread(target=work, args=(i,), name=f"microbatch-{i}", daemon=True)
                           for i in range(len(pairs))]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                if errors:
                    raise errors[0]
            else:
                for i, (x, y) in enumerate(pairs):
                    losses[i] = microbatch(x, y)
            torch.nn.utils.clip_grad_norm_(head.parameters(), spec.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return sum(losses) / len(losses)

        def done(step: int, loss: float, seconds: float | None) -> None:
            outcome["steps_done"] = step
            say(f"step {step}: loss {loss:.4f}" + (f", {seconds:.3f} s" if seconds is not None else " (warm-up)"))

        outcome["result"] = time_steps(train_step, warmup, steps, batch_size * spec.seq_len, done)
    except BaseException as e:  # noqa: B036 -- handed to the calling thread
        outcome["error"] = e


# --- command line --------------------------------------------------------------------------------------------------


def time_steps(train_step: Callable[[int], float], warmup: int, steps: int, tokens_per_step: int,
               on_step: Callable[[int, float, float | None], None] | None = None) -> dict[str, Any]:
    """Run steps 1..warmup untimed, then `steps` timed ones; the figures every throughput run reports.
    Shared with benchmarks/throughput.py, so (a) and (b) are timed the same way."""
    loss = float("nan")
    for step in range(1, warmup + 1):
        loss = train_step(step)
        if on_step:
            on_step(step, loss, None)
    step_times = []
    cpu_started = time.process_time()
    for step in range(warmup + 1, warmup + steps + 1):
        started = time.perf_counter()
        loss = train_step(step)
        step_times.append(time.perf_counter() - started)
        if on_step:
            on_step(step, loss, step_times[-1])
    elapsed, median = sum(step_times), statistics.median(step_times)
    return dict(tokens=tokens_per_step * steps, time_s=round(elapsed, 4),
                tokens_per_s=round(tokens_per_step * steps / elapsed, 1), median_step_s=round(median, 4),
                median_tokens_per_s=round(tokens_per_step / median, 1), final_loss=round(loss, 5),
                cpu_s_per_step=round((time.process_time() - cpu_started) / steps, 4))


def add_model_and_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """The model shape, batch and step flags, shared with benchmarks/throughput.py so both time the same run."""
    parser.add_argument("--stages", type=int, default=3, help="body stages (one process each)")
    parser.add_argument("--layers-per-stage", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--microbatches", type=int, default=4, help="microbatches per step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    parser.add_argument("--seed", type=int, default=0, help="data order (the weights come from the spec's seed 0)")


def check_model_and_schedule_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.batch_size < 1 or args.microbatches < 1 or args.batch_size % args.microbatches:
        parser.error("--batch-size must be a positive multiple of --microbatches")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train on a hivemind.moe pipeline and print tokens/s",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_and_schedule_arguments(run)
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads in the trainer and in every server (default: torch's own choice)")
    run.add_argument("--sequential", action="store_true", help="one microbatch in flight at a time")
    run.add_argument("--expert-step", choices=EXPERT_STEPS, default="backward",
                     help="backward: hivemind's stock optimizer step after every backward batch; "
                          "batch: accumulate a whole step's sequences, then one step (as in-process)")
    run.add_argument("--handlers", type=int, default=4, help="ConnectionHandler processes per server")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run, start-up included")
    run.add_argument("--server-log-level", default="warning", choices=["debug", "info", "warning", "error"])
    run.add_argument("--quiet", action="store_true", help="no per-step lines")
    run.add_argument("--json-out", type=Path, default=None, help="write the result here as JSON")
    run.add_argument("--host", default=LOCALHOST, help="the address this process's DHT listens on")
    run.add_argument("--stage-host", action="append", default=[], metavar="N=[NAMESPACE@]ADDRESS",
                     help="run stage N's server in that network namespace, listening on that address")

    srv = commands.add_parser("serve", help="(internal) host one body stage as a hivemind expert")
    srv.add_argument("--stage", type=int, required=True)
    srv.add_argument("--spec-json", required=True, help="the RunSpec as JSON (RunSpec.to_dict)")
    srv.add_argument("--initial-peers", nargs="+", required=True)
    srv.add_argument("--threads", type=int, default=None)
    srv.add_argument("--max-batch-size", type=int, default=4096, help="sequences per Runtime batch, at most")
    srv.add_argument("--handlers", type=int, default=4)
    srv.add_argument("--expert-step", choices=EXPERT_STEPS, default="backward")
    srv.add_argument("--samples-per-step", type=int, default=16, help="with --expert-step batch")
    srv.add_argument("--host", default=LOCALHOST, help="the address the server's DHT listens on")

    args = parser.parse_args(argv)
    if args.command == "run":
        check_model_and_schedule_arguments(parser, args)
        if args.handlers < 1:
            parser.error("--handlers must be >= 1")
        try:
            args.stage_hosts = {int(n): StageHost.parse(where)
                                for n, where in (item.split("=", 1) for item in args.stage_host)}
        except ValueError:
            parser.error("--stage-host takes N=[NAMESPACE@]ADDRESS")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "serve":
        serve(RunSpec.from_dict(json.loads(args.spec_json)), args.stage, args.initial_peers, args.threads,
              args.max_batch_size, args.handlers, args.expert_step, args.samples_per_step, host=args.host)
        return 0

    logging.getLogger("hivemind").setLevel(logging.WARNING)
    main_pid = os.getpid()

    def on_sigterm(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a process hivemind forked from here (the DHT): the default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt  # so that run_moe_pipeline's cleanup runs (`timeout`, kill)

    signal.signal(signal.SIGTERM, on_sigterm)
    spec = RunSpec(run_id="bench", num_stages=args.stages, layers_per_stage=args.layers_per_stage,
                   hidden_size=args.hidden_size, num_heads=args.num_heads, seq_len=args.seq_len)
    dataset = TextDataset(load_corpus(), spec.seq_len)  # what `cfnode train` loads without --data
    mode = "sequential" if args.sequential else "concurrent"
    print(f"hivemind.moe pipeline: {spec.num_stages} stages x {spec.layers_per_stage} layers, hidden "
          f"{spec.hidden_size}, seq_len {spec.seq_len}; batch {args.batch_size} in {args.microbatches} microbatches "
          f"({mode}); expert step per {args.expert_step}; {args.warmup} warm-up + {args.steps} timed steps",
          flush=True)
    try:
        result = run_moe_pipeline(spec, dataset, args.batch_size, args.microbatches, args.steps, args.warmup,
                                  args.seed, threads=args.threads, timeout=args.timeout,
                                  concurrent=not args.sequential, expert_step=args.expert_step,
                                  num_handlers=args.handlers, server_log_level=args.server_log_level,
                                  verbose=not args.quiet, host=args.host, stage_hosts=args.stage_hosts)
    except KeyboardInterrupt:
        print("interrupted; every server stopped", file=sys.stderr)
        return 130
    if result["ok"]:
        print(f"tokens/s {result['tokens_per_s']:,.0f} ({result['tokens']} tokens in {result['time_s']:.2f} s); "
              f"median step {result['median_step_s']:.4f} s = {result['median_tokens_per_s']:,.0f} tokens/s; "
              f"final loss {result['final_loss']:.4f}; wall {result['wall_s']:.1f} s")
    else:
        print(f"failed after {result['wall_s']:.1f} s: {result['error']}", file=sys.stderr)
        for name, lines in result.get("server_logs", {}).items():
            for line in lines:
                print(f"  [{name}] {line}", file=sys.stderr)
    if args.json_out:
        config = {k: v for k, v in vars(args).items() if k not in ("command", "json_out", "stage_hosts")}
        args.json_out.write_text(json.dumps(dict(config=config, result=result), indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

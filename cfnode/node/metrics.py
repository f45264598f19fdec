"""Prometheus metrics of a trainer or a stage peer, served over HTTP with `--metrics-port`.

Each process keeps its own CollectorRegistry (not prometheus_client's global one), so several trainers or
peers in one Python process, as in tests, never collide. The trainer's metrics follow its event log (one
hook) plus the latency of its RPCs; a stage peer's metrics wrap its backend (the object behind
StageService) and read its step, gradient norm and state when scraped.

`python -m cfnode.node.metrics check --port PORT` is a health probe for containers: it exits 0 when the
endpoint answers and, for a stage peer, the peer is ONLINE.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import socketserver
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from cfnode.protocol.records import PeerState  # light: the health probe must start fast, without torch

T = TypeVar("T")

# Seconds: a tiny CPU stage answers in milliseconds, a big one on a slow link in tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TRAINER_RPC_KINDS = ("forward", "backward", "step")
# Trainer events counted by kind in cfnode_trainer_failures; a step_mismatch (a microbatch summed twice or missed) is
# one of them, so it shows on every dashboard, never silently.
FAILURE_EVENTS = ("peer_failed", "stage_lost", "ledger_refused", "step_mismatch")


class TrainerMetrics:
    """step, loss, tokens/s, validation loss, RPC latency by kind, failures and recoveries."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Gauge("cfnode_trainer_step", "Swarm step the trainer last completed", registry=r)
        self.loss = Gauge("cfnode_trainer_loss", "Training loss of the last step", registry=r)
        self.val_loss = Gauge("cfnode_trainer_val_loss", "Last validation loss", registry=r)
        self.tokens_per_s = Gauge("cfnode_trainer_tokens_per_second", "Tokens per second of the last step",
                                  registry=r)
        self.tokens = Counter("cfnode_trainer_tokens", "Tokens trained on", registry=r)
        self.rpc_seconds = Histogram("cfnode_trainer_rpc_seconds", "Latency of the trainer's calls to stage peers",
                                     ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.failures = Counter("cfnode_trainer_failures", "Failed peers, lost stages, refused and mismatched step "
                                "ledgers", ["kind"], registry=r)
        self.recoveries = Counter("cfnode_trainer_recoveries", "Lost stages that answered again, by weight source",
                                  ["source"], registry=r)
        self.downtime = Gauge("cfnode_trainer_last_stage_downtime_seconds",
                              "How long the last recovered stage was down", registry=r)
        self.loss.set(float("nan"))  # not measured yet
        self.val_loss.set(float("nan"))
        for kind in TRAINER_RPC_KINDS:
            self.rpc_seconds.labels(kind)
        for kind in FAILURE_EVENTS:
            self.failures.labels(kind)

    def on_event(self, event: str, fields: dict[str, Any]) -> None:
        """Hook of the trainer's EventLog: every event it records updates the metrics."""
        if event == "step":
            self.step.set(fields["step"])
            self.loss.set(fields["loss"])
            self.tokens_per_s.set(fields["tokens_per_s"])
            self.tokens.inc(fields["tokens"])
            if fields.get("val_loss") is not None:
                self.val_loss.set(fields["val_loss"])
        elif event in FAILURE_EVENTS:
            self.failures.labels(event).inc()
        elif event == "stage_recovered":
            self.recoveries.labels(str(fields.get("source", "unknown"))).inc()
            self.downtime.set(fields.get("downtime", 0.0))

    async def timed(self, kind: str, call: Awaitable[T]) -> T:
        """Await one call to a stage peer and record its latency, failed or not ("wait" and others are not RPCs)."""
        if kind not in TRAINER_RPC_KINDS:
            return await call
        started = time.perf_counter()
        try:
            return await call
        finally:
            self.rpc_seconds.labels(kind).observe(time.perf_counter() - started)


class PeerMetrics:
    """A stage peer's step, gradient norm and state, and the requests it served: count and latency by kind,
    refusals and failures by error code."""

    def __init__(self, peer: Any) -> None:
        from cfnode.protocol import messages

        self.peer = peer
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("cfnode_peer_stage", "Body stage this peer serves", registry=r).set(peer.stage)
        Gauge("cfnode_peer_step", "Optimiser steps this stage has taken", registry=r).set_function(
            lambda: peer.current_step)
        Gauge("cfnode_peer_grad_norm", "L2 norm of the stage gradient at the last step (before clipping)",
              registry=r).set_function(lambda: peer.grad_norm if peer.grad_norm is not None else float("nan"))
        Gauge("cfnode_peer_throughput_tokens_per_second", "Smoothed tokens per second of compute",
              registry=r).set_function(lambda: peer.throughput.value)
        Gauge("cfnode_peer_load", "Requests in compute now", registry=r).set_function(lambda: peer.load)
        state = Gauge("cfnode_peer_state", "1 for the peer's current state", ["state"], registry=r)
        for s in PeerState:
            state.labels(s.value).set_function(lambda s=s: float(peer.state == s))
        self.requests = Counter("cfnode_peer_requests", "Requests handled, by kind", ["kind"], registry=r)
        self.request_seconds = Histogram("cfnode_peer_request_seconds", "Time to handle a request, by kind",
                                         ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("cfnode_peer_errors", "Requests refused or failed, by error code", ["code"],
                              registry=r)
        for code in (messages.BAD_REQUEST, messages.STALE, messages.NOT_READY, messages.GROUP_FAILED,
                     messages.INTERNAL, messages.TRUNCATED):
            self.errors.labels(code)

    def instrument(self, backend: Any) -> InstrumentedBackend:
        return InstrumentedBackend(backend, self)

    async def handle(self, kind: str, call: Awaitable[T]) -> T:
        from cfnode.protocol.messages import BAD_REQUEST, INTERNAL, ProtocolError
        from cfnode.protocol.service import RequestRefused

        started = time.perf_counter()
        try:
            return await call
        except RequestRefused as e:
            self.errors.labels(e.code).inc()
            raise
        except ProtocolError:
            self.errors.labels(BAD_REQUEST).inc()
            raise
        except Exception:
            self.errors.labels(INTERNAL).inc()
            raise
        finally:
            self.requests.labels(kind).inc()
            self.request_seconds.labels(kind).observe(time.perf_counter() - started)


class InstrumentedBackend:
    """The StageBackend that StageService calls: the peer's own methods, each counted and timed."""

    def __init__(self, backend: Any, metrics: PeerMetrics):
        self._backend = backend
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def forward(self, request):
        return await self._metrics.handle("forward", self._backend.forward(request))

    async def backward(self, request):
        return await self._metrics.handle("backward", self._backend.backward(request))

    async def apply_step(self, request):
        return await self._metrics.handle("step", self._backend.apply_step(request))

    async def describe(self):
        return await self._metrics.handle("info", self._backend.describe())

    async def export_state(self, request):
        return await self._metrics.handle("download_state", self._backend.export_state(request))

    async def export_grads(self, request):
        return await self._metrics.handle("fetch_grads", self._backend.export_grads(request))

    async def keep_copy(self, state, sender):
        return await self._metrics.handle("put_copy", self._backend.keep_copy(state, sender))

    async def export_copy(self, request):
        return await self._metrics.handle("get_copy", self._backend.export_copy(request))


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the process's exit


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass


@contextlib.contextmanager
def serving(registry: CollectorRegistry, host: str, port: int | None) -> Iterator[None]:
    """Serve `registry` at http://host:port/metrics while the block runs; nothing when port is None."""
    if port is None:
        yield
        return
    try:
        server = make_server(host, port, make_wsgi_app(registry), _Server6 if ":" in host else _Server,
                             handler_class=_QuietHandler)
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
    thread = threading.Thread(target=server.serve_forever, name="cfnode-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(2)


def check(host: str, port: int, timeout: float = 5.0) -> tuple[bool, str]:
    """Health of the process serving metrics there: it answers, and a stage peer among them is ONLINE."""
    url = f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            text = reply.read().decode()
    except OSError as e:
        return False, f"no metrics at {url}: {e}"
    if "cfnode_peer_state" in text:
        online = f'cfnode_peer_state{{state="{PeerState.ONLINE.value}"}} 1.0' in text
        return online, "stage peer is ONLINE" if online else "stage peer is not ONLINE"
    if "cfnode_trainer_step" in text:
        return True, "trainer is serving metrics"
    return False, f"{url} serves no cfnode metrics"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfnode.node.metrics",
                                     description="Health probe: exit 0 if a cfnode process's metrics say healthy.")
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("check", help="fetch /metrics; exit 0 if it answers and a stage peer is ONLINE")
    probe.add_argument("--host", default="127.0.0.1")
    probe.add_argument("--port", type=int, required=True)
    probe.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    healthy, reason = check(args.host, args.port, args.timeout)
    print(reason, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())

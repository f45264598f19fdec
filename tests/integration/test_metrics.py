"""Monitoring in a live swarm on 127.0.0.1: Prometheus metrics of a trainer and a peer, and `status --watch`."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from cfnode.launcher import cfnode_command
from tests.integration.harness import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at http://127.0.0.1:port/metrics, keyed by (name, sorted labels); {} if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_trainer_and_peer_serve_prometheus_metrics(swarm):
    trainer_port, peer_port = free_port(), free_port()
    swarm.start_bootstrap()
    swarm.start_peer(1, "--metrics-port", str(peer_port))
    swarm.start_peer(2)
    swarm.start_peer(3)
    trainer, _ = swarm.start_trainer(60, "--eval-every", "2", "--metrics-port", str(trainer_port))

    def trained() -> dict:
        samples = scrape(trainer_port)
        val_loss = value(samples, "cfnode_trainer_val_loss")
        ready = (value(samples, "cfnode_trainer_step") or 0) >= 4 and val_loss is not None and math.isfinite(val_loss)
        return samples if ready else {}

    t = wait_until(trained, 240, "the trainer's metrics to show 4 steps and a validation loss", interval=0.5)
    assert trainer.process.poll() is None, swarm.log(trainer)
    assert 0 < value(t, "cfnode_trainer_loss") < 10
    assert 0 < value(t, "cfnode_trainer_val_loss") < 10
    assert value(t, "cfnode_trainer_tokens_per_second") > 0
    assert value(t, "cfnode_trainer_tokens_total") >= 4 * 8 * swarm.spec.seq_len
    for kind in ("forward", "backward"):
        # Every step sends at least one call of each kind to each of the 3 stages.
        assert value(t, "cfnode_trainer_rpc_seconds_count", kind=kind) >= 3 * 4, kind
        assert value(t, "cfnode_trainer_rpc_seconds_sum", kind=kind) > 0, kind
        assert value(t, "cfnode_trainer_rpc_seconds_bucket", kind=kind, le="+Inf") == \
            value(t, "cfnode_trainer_rpc_seconds_count", kind=kind)
    # Each stage has one peer: its last backward of a step carries the step, so no step call is sent.
    assert not value(t, "cfnode_trainer_rpc_seconds_count", kind="step")
    assert value(t, "cfnode_trainer_failures_total", kind="peer_failed") == 0
    assert value(t, "cfnode_trainer_failures_total", kind="stage_lost") == 0

    p = scrape(peer_port)
    assert value(p, "cfnode_peer_stage") == 1
    assert value(p, "cfnode_peer_step") >= 4
    assert value(p, "cfnode_peer_grad_norm") > 0
    assert value(p, "cfnode_peer_state", state="ONLINE") == 1
    assert value(p, "cfnode_peer_state", state="JOINING") == 0
    for kind in ("forward", "backward", "step"):
        assert value(p, "cfnode_peer_requests_total", kind=kind) >= 4, kind
        assert value(p, "cfnode_peer_request_seconds_count", kind=kind) == \
            value(p, "cfnode_peer_requests_total", kind=kind)
    assert value(p, "cfnode_peer_errors_total", code="bad_request") == 0
    assert value(p, "cfnode_peer_errors_total", code="internal") == 0

    # The container health probe: a peer that is ONLINE is healthy; a port where nothing listens is not.
    probe = [sys.executable, "-m", "cfnode.node.metrics", "check", "--port"]
    ok = subprocess.run([*probe, str(peer_port)], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "ONLINE" in ok.stdout, ok.stderr
    assert subprocess.run([*probe, str(trainer_port)], capture_output=True, timeout=30).returncode == 0
    assert subprocess.run([*probe, str(free_port())], capture_output=True, timeout=30).returncode == 1


def test_metrics_port_in_use_is_a_one_line_error(swarm):
    swarm.start_bootstrap()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(cfnode_command("train", "--initial-peers", swarm.maddr, "--steps", "1",
                                               "--metrics-port", str(port), "--stage-timeout", "30"),
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr.strip().splitlines()[-1]


def test_status_watch_redraws_until_ctrl_c(swarm):
    swarm.start_bootstrap()
    swarm.start_peer(2)
    process = subprocess.Popen(cfnode_command("status", "--initial-peers", swarm.maddr, "--watch", "1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 90
        while sum(line.startswith("run cfnode:") for line in lines) < 3 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
        tables = sum(line.startswith("run cfnode:") for line in lines)
        assert tables >= 3, "".join(lines) + process.stderr.read() if process.poll() is not None else "".join(lines)
        assert any("(no live peer: stage lost)" in line for line in lines)  # stages 1 and 3 have no peer
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        assert process.wait(30) in (0, 130)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        process.stdout.close()
        process.stderr.close()

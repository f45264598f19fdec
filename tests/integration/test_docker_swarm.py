"""The Docker swarm, for real: build the image without a container registry, run docker/compose.yml with six peers
started at once, kill every peer of one stage, start them again, and watch the stage come back by CheckFree.

The test owns its Docker engine: it installs Debian's (docker.io, docker-compose, debootstrap) where it is missing
and this is a root shell with apt, and starts a daemon of its own (its own data root, exec root, pid file, socket and
address pool, no iptables, no default bridge) that it stops at the end, after removing the containers, network and
volumes. Nothing is pulled from a registry: the base image is debootstrapped (docker/base-image.sh) and the image
is built offline from a wheelhouse (docker/offline-build.sh, with no network inside the build).

It skips with one line where no engine can be had (not root, no apt, a daemon that will not start) or with
CFNODE_TEST_DOCKER=0. CFNODE_TEST_DOCKER_ROOT=DIR keeps the engine's data (the base image and build cache) in DIR
across runs instead of a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import wait_until

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker" / "compose.yml"
PROJECT = "cfnodetest"  # not the README's `cfnode`, so a user's own swarm on the same engine is left alone
DEBIAN_PACKAGES = ("docker.io", "docker-compose", "debootstrap")
ADDRESS_POOL = "base=10.231.0.0/16,size=24"
LOST_STAGE = 2

pytestmark = pytest.mark.skipif(os.environ.get("CFNODE_TEST_DOCKER") == "0", reason="CFNODE_TEST_DOCKER=0")


class Phases:
    """Wall time of each phase, reported at the end."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self._started = time.monotonic()

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.times.append((name, now - self._started))
        self._started = now

    def report(self) -> str:
        total = sum(seconds for _, seconds in self.times)
        return "docker swarm phases: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.times) + \
            f"; total {total:.0f} s"


def _run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 120, check: bool = True,
         cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def _install_engine() -> str | None:
    """None once dockerd, docker, a compose and debootstrap are here; else why they cannot be."""
    missing = [p for p, tool in zip(DEBIAN_PACKAGES, ("dockerd", "docker-compose", "debootstrap"))
               if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists()]
    if not missing:
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"no Docker engine here ({', '.join(missing)} missing) and no root apt to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES]):
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            return f"installing Docker failed: {' '.join(argv)}: {result.stderr.strip()[-300:]}"
    return None


def _docker_client() -> str:
    # Debian's client (20.10) first: a newer client elsewhere on PATH may lack the legacy builder this engine has.
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker") or "docker"


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A Docker daemon of the test's own; yields the environment that points docker and compose at it."""
    why = _install_engine()
    if why:
        pytest.skip(why)
    kept = os.environ.get("CFNODE_TEST_DOCKER_ROOT")
    data_root = Path(kept) if kept else Path(tempfile.mkdtemp(prefix="cfnode-docker-", dir="/var/tmp"))
    run_dir = tmp_path_factory.mktemp("dockerd")
    socket = run_dir / "docker.sock"
    log = (run_dir / "dockerd.log").open("w")
    daemon = subprocess.Popen(
        ["dockerd", "--iptables=false", "--ip-masq=false", "--bridge=none", "--data-root", str(data_root),
         "--exec-root", str(run_dir / "exec"), "--pidfile", str(run_dir / "docker.pid"), "--host",
         f"unix://{socket}", "--default-address-pool", ADDRESS_POOL],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {**os.environ, "DOCKER_HOST": f"unix://{socket}", "DOCKER": _docker_client(),
           "COMPOSE_PROJECT_NAME": PROJECT}
    try:
        deadline = time.monotonic() + 60
        while _run([env["DOCKER"], "info"], env, check=False).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.skip("the Docker daemon did not start: "
                            + (run_dir / "dockerd.log").read_text()[-300:].strip().replace("\n", " "))
            time.sleep(0.5)
        yield env
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        if not kept:
            shutil.rmtree(data_root, ignore_errors=True)


def _compose(env: dict[str, str]) -> list[str]:
    """compose v2 where the client has the plugin, else v1 (Debian's docker-compose 1.29)."""
    if _run([env["DOCKER"], "compose", "version"], env, check=False).returncode == 0:
        return [env["DOCKER"], "compose", "-f", str(COMPOSE_FILE), "-p", PROJECT]
    return ["docker-compose", "-f", str(COMPOSE_FILE), "-p", PROJECT]


def _containers(env: dict[str, str], service: str, all_: bool = False) -> list[str]:
    argv = [env["DOCKER"], "ps", "--format", "{{.Names}}", "--filter", f"label=com.docker.compose.project={PROJECT}",
            "--filter", f"label=com.docker.compose.service={service}"]
    return sorted(_run(argv + (["--all"] if all_ else []), env).stdout.split())


def _trainer_events(env: dict[str, str]) -> list[dict[str, Any]]:
    (trainer,) = _containers(env, "trainer", all_=True)
    result = _run([env["DOCKER"], "exec", trainer, "cat", "/data/train.jsonl"], env, check=False)
    events = []
    for line in result.stdout.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return events


def _last_step(env: dict[str, str]) -> int:
    return max((e["step"] for e in _trainer_events(env) if e.get("event") == "step"), default=0)


def _status(env: dict[str, str]) -> dict[str, Any] | None:
    """`cfnode status --json`, run in the bootstrap's container; None while it cannot say."""
    (bootstrap,) = _containers(env, "bootstrap")
    result = _run([env["DOCKER"], "exec", bootstrap, "sh", "-c",
                   'cfnode status --initial-peers "$(cat /shared/bootstrap.maddr)" --json --connect-timeout 30'],
                  env, timeout=180, check=False)
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        return None


def _online(report: dict[str, Any] | None) -> dict[int, list[dict[str, Any]]]:
    if not report:
        return {}
    return {s["stage"]: [p for p in s["peers"] if p["state"] == "ONLINE"] for s in report["stages"]}


def _stage_of(env: dict[str, str], container: str) -> int | None:
    for line in _run([env["DOCKER"], "logs", container], env).stderr.splitlines():
        if "joining stage " in line:
            return int(line.split("joining stage ")[1].split()[0])
    return None


def _logs_since(env: dict[str, str], container: str, since: str) -> str:
    result = _run([env["DOCKER"], "logs", "--since", since, container], env)
    return result.stdout + result.stderr


def _save_logs(env: dict[str, str], folder: Path) -> None:
    """Every container's log, for the failure report (compose down removes the containers)."""
    folder.mkdir(parents=True, exist_ok=True)
    for service in ("bootstrap", "peer", "trainer"):
        for container in _containers(env, service, all_=True):
            result = _run([env["DOCKER"], "logs", "--timestamps", container], env, check=False)
            (folder / f"{container}.log").write_text(result.stdout + result.stderr)


def test_compose_swarm_recovers_a_killed_stage(engine, capsys, tmp_path):
    env, phases = engine, Phases()
    built = _run([str(ROOT / "docker" / "offline-build.sh")], env, timeout=1800)
    build_times = [line for line in built.stdout.splitlines() if line.endswith(" s") or " s; all: " in line]
    phases.done("build (base image, wheelhouse, image)")
    compose = _compose(env)
    try:
        # All six peers at once, as the README says: they must spread over the three stages, two each.
        _run(compose + ["up", "-d", "--scale", "peer=6"], env, timeout=900)
        phases.done("compose up (bootstrap healthy)")
        wait_until(lambda: _last_step(env) >= 5, 600, "the trainer's first 5 steps", interval=5)
        report = wait_until(lambda: (r := _status(env)) and sorted(map(len, _online(r).values())) == [2, 2, 2] and r,
                            300, "cfnode status to show 3 stages x 2 online peers", interval=5)
        peers = _containers(env, "peer")
        stages = {c: _stage_of(env, c) for c in peers}
        assert sorted(stages.values()) == [1, 1, 2, 2, 3, 3], f"six peers started at once chose {stages}"
        phases.done("swarm trains (3 stages x 2 peers)")

        victims = [c for c, s in stages.items() if s == LOST_STAGE]
        lost_at = _last_step(env)
        _run([env["DOCKER"], "kill", *victims], env)
        wait_until(lambda: any(e.get("event") == "stage_lost" and e.get("stage") == LOST_STAGE
                               for e in _trainer_events(env)), 300, f"the trainer to find stage {LOST_STAGE} lost",
                   interval=3)
        phases.done(f"kill both stage-{LOST_STAGE} peers (stage lost)")

        since = _run([env["DOCKER"], "info", "--format", "{{json .SystemTime}}"], env).stdout.strip().strip('"')
        _run([env["DOCKER"], "start", *victims], env)
        recovered = wait_until(lambda: [e for e in _trainer_events(env) if e.get("event") == "stage_recovered"
                                        and e.get("stage") == LOST_STAGE], 600,
                               f"stage {LOST_STAGE} to come back", interval=3)
        resumed_from = recovered[0]["step"]
        wait_until(lambda: _last_step(env) >= resumed_from + 5, 600, "training to go on after the recovery",
                   interval=5)
        phases.done(f"restart them (stage {LOST_STAGE} recovered, training resumed)")

        logs = {c: _logs_since(env, c, since) for c in victims}
        rebuilt = [c for c, text in logs.items() if f"stage {LOST_STAGE}: rebuilt by checkfree" in text]
        copied = [c for c, text in logs.items() if f"stage {LOST_STAGE}: copied step" in text and "from replica" in
                  text]
        assert len(rebuilt) == 1 and len(copied) == 1 and set(rebuilt) != set(copied), \
            f"one newcomer rebuilds the stage, the other copies it; rebuilt {rebuilt}, copied {copied}"
        report = wait_until(lambda: (r := _status(env)) and len(_online(r).get(LOST_STAGE, [])) == 2 and r, 300,
                            f"cfnode status to show stage {LOST_STAGE} with two online peers", interval=5)
        sources = sorted(p["source"] for p in _online(report)[LOST_STAGE])
        assert sources == ["checkfree", "replica"], f"stage {LOST_STAGE}'s peers report sources {sources}"
        assert all(p["step"] > lost_at for p in _online(report)[LOST_STAGE]), report
        phases.done("cfnode status shows it")
    finally:
        _save_logs(env, tmp_path / "logs")
        _run(compose + ["down", "--volumes", "--remove-orphans", "--timeout", "5"], env, timeout=300, check=False)
        leftovers = _run([env["DOCKER"], "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                         env, check=False).stdout.split()
        phases.done("compose down")
        with capsys.disabled():
            print("\n" + phases.report() + ("; " + "; ".join(build_times) if build_times else "")
                  + f"; container logs in {tmp_path / 'logs'}")
    assert not leftovers, f"containers left after compose down: {leftovers}"

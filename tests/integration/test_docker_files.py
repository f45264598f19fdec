"""docker/Dockerfile and docker/compose.yml, checked without a Docker engine.

The compose file is parsed and held to the structure the compose specification requires; every cfnode
command in it (service commands and health checks) is parsed by cfnode's own command line, and each flag
must appear in `cfnode <command> --help`. Where compose v2 (`docker compose`) or v1 (`docker-compose`) is installed,
its `config` validates the file too. tests/integration/test_docker_swarm.py builds the image and runs the swarm.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from cfnode.cli import main as cfnode_cli
from cfnode.launcher import cfnode_command

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
IMAGE_APP_DIR = "/opt/cfnode"  # where the Dockerfile puts the source; maps to ROOT here

# No `name`: compose v1 (1.29, Debian's) refuses it; docker/.env names the project for both.
TOP_LEVEL_KEYS = {"version", "services", "networks", "volumes", "configs", "secrets", "include"}
SERVICE_KEYS = {
    "build", "image", "command", "entrypoint", "environment", "env_file", "networks", "volumes", "ports", "expose",
    "healthcheck", "restart", "depends_on", "hostname", "container_name", "deploy", "user", "working_dir",
    "labels", "logging", "stop_signal", "stop_grace_period", "init", "ulimits", "shm_size", "tmpfs", "profiles",
    "pull_policy", "extra_hosts", "cap_add", "cap_drop", "devices", "gpus", "read_only", "tty", "stdin_open",
}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
RESTART = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
SHELL_OPERATORS = {";", "&&", "||", "|", "&"}


@functools.cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def walk_strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from walk_strings(key)
            yield from walk_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item)


def unescape(text: str) -> str:
    """What the container sees: compose turns `$$` into `$` (this file uses no compose variables)."""
    return text.replace("$$", "$")


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a POSIX sh script, split at ; && || | & (enough for the scripts in compose.yml)."""
    lexer = shlex.shlex(unescape(script), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in SHELL_OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def cfnode_invocations(argv: list[str]) -> list[list[str]]:
    """cfnode argument lists found in one simple command (`cfnode ...` or `exec cfnode ...`)."""
    if argv[:1] == ["exec"]:
        argv = argv[1:]
    return [argv[1:]] if argv[:1] == ["cfnode"] else []


def service_invocations(name: str) -> list[list[str]]:
    """Every cfnode invocation of a service: its command (through its entrypoint) and its health check."""
    service = services()[name]
    entrypoint = service.get("entrypoint")
    command = service.get("command")
    found: list[list[str]] = []
    if entrypoint is None:  # the image's ENTRYPOINT ["cfnode"]
        assert isinstance(command, list), f"{name}: give command as a list for ENTRYPOINT cfnode"
        found.append([unescape(c) for c in command])
    else:
        assert entrypoint in (["/bin/sh", "-c"], ["sh", "-c"]), f"{name}: unexpected entrypoint {entrypoint}"
        script = command[0] if isinstance(command, list) else command
        for argv in shell_commands(script):
            found += cfnode_invocations(argv)
    test = service["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        for argv in shell_commands(test[1]):
            found += cfnode_invocations(argv)
    elif test[0] == "CMD":
        found += cfnode_invocations([unescape(t) for t in test[1:]])
    return found


@functools.cache
def help_text(subcommand: str | None) -> str:
    args = [subcommand, "--help"] if subcommand else ["--help"]
    result = subprocess.run(cfnode_command(*args), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- compose.yml -------------------------------------------------------------------------------------------


def test_compose_top_level_structure():
    data = compose()
    unknown = {k for k in data if k not in TOP_LEVEL_KEYS and not k.startswith("x-")}
    assert not unknown, f"keys the compose spec does not define: {unknown}"
    assert {"bootstrap", "peer", "trainer"} <= set(data["services"])
    assert isinstance(data.get("networks"), dict) and data["networks"], "declare the swarm's network"
    assert isinstance(data.get("volumes"), dict) and data["volumes"], "declare the named volumes"


@pytest.mark.parametrize("name", ["bootstrap", "peer", "trainer"])
def test_compose_service_structure(name):
    service = services()[name]
    unknown = set(service) - SERVICE_KEYS
    assert not unknown, f"{name}: keys the compose spec does not define: {unknown}"
    assert "image" in service or "build" in service
    build = service.get("build")
    if build is not None:
        context = (COMPOSE.parent / (build if isinstance(build, str) else build["context"])).resolve()
        assert context == ROOT, f"{name}: the build context must be the repository root"
        dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        assert dockerfile == DOCKERFILE and dockerfile.exists()
    assert RESTART.match(str(service.get("restart", ""))), f"{name}: restart policy {service.get('restart')!r}"
    assert service["restart"] in ("unless-stopped", "on-failure", "always") or \
        service["restart"].startswith("on-failure:"), f"{name}: a stopped {name} must come back"

    check = service["healthcheck"]
    assert set(check) <= HEALTHCHECK_KEYS
    assert isinstance(check["test"], list) and check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1
    if check["test"][0] == "CMD-SHELL":
        assert len(check["test"]) == 2, "CMD-SHELL takes one shell string"
    for key in ("interval", "timeout", "start_period"):
        if key in check:
            assert DURATION.match(check[key]), f"{name}: healthcheck {key} {check[key]!r} is not a duration"
    assert "interval" in check
    assert isinstance(check.get("retries", 3), int)

    for dependency, condition in (service.get("depends_on") or {}).items():
        assert dependency in services()
        assert condition["condition"] in ("service_started", "service_healthy", "service_completed_successfully")


def test_compose_networks_and_volumes_are_declared_and_used():
    data = compose()
    declared_networks = set(data["networks"])
    used_networks: set[str] = set()
    for name, service in services().items():
        networks = service.get("networks") or []
        names = set(networks) if isinstance(networks, (list, dict)) else set()
        assert names, f"{name}: put it on the swarm's network"
        assert names <= declared_networks, f"{name}: undeclared networks {names - declared_networks}"
        used_networks |= names
    assert used_networks == declared_networks
    assert len(used_networks) == 1, "every role must share one network"

    declared_volumes = set(data["volumes"])
    used_volumes: set[str] = set()
    for name, service in services().items():
        for mount in service.get("volumes") or []:
            source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
            if not source.startswith(("/", ".", "~")):
                assert source in declared_volumes, f"{name}: undeclared volume {source}"
                used_volumes.add(source)
    assert used_volumes == declared_volumes


def test_compose_bootstrap_has_a_fixed_identity_port_and_shares_its_address():
    bootstrap = services()["bootstrap"]
    (argv,) = [a for a in service_invocations("bootstrap") if a[0] == "bootstrap"]
    options = dict(zip(argv, argv[1:]))
    assert options["--host"] == "0.0.0.0"
    assert options["--port"] != "0"
    assert "--announce-host" in options, "containers get dynamic addresses: announce the container's own"
    key_dir = options["--identity"].rsplit("/", 1)[0]
    maddr_dir = options["--maddr-file"].rsplit("/", 1)[0]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in bootstrap["volumes"]}
    assert mounts.get(key_dir) in compose()["volumes"], "the identity key must live on a named volume"
    assert mounts.get(maddr_dir) in compose()["volumes"], "the multiaddr file must be on a shared volume"
    for name in ("peer", "trainer"):
        service = services()[name]
        assert any(m.split(":")[0] == mounts[maddr_dir] for m in service["volumes"]), f"{name} needs the maddr"
        script = " ".join(service["command"])
        assert options["--maddr-file"] in script
        assert service["depends_on"]["bootstrap"]["condition"] == "service_healthy"


def _mounts(name: str) -> dict[str, str]:
    """A service's mounts: container path -> volume (or host path)."""
    return {m.split(":")[1]: m.split(":")[0] for m in services()[name].get("volumes") or []}


def _options(name: str, subcommand: str) -> dict[str, str]:
    (argv,) = [a for a in service_invocations(name) if a[0] == subcommand]
    return dict(zip(argv, argv[1:]))


def test_compose_trainer_runs_with_the_identity_the_bootstrap_authorises():
    """The trust rule: the bootstrap names the trainer (--trainer FILE, created if missing) in the signed run spec,
    and the trainer runs with that same identity file; peers would refuse any other trainer's calls."""
    trainer_file = _options("bootstrap", "bootstrap").get("--trainer")
    assert trainer_file, "the bootstrap refuses to start without --trainer"
    assert _options("trainer", "train").get("--identity") == trainer_file, "the trainer must use --trainer's file"
    key_dir = trainer_file.rsplit("/", 1)[0]
    volume = _mounts("bootstrap").get(key_dir)
    assert volume in compose()["volumes"], "the trainer's identity must live on a named volume"
    assert _mounts("trainer").get(key_dir) == volume, "the trainer must mount the volume the bootstrap writes it to"
    assert f"{volume}:{key_dir}:ro" not in services()["bootstrap"]["volumes"], "the bootstrap creates the file there"
    # Whoever can read the trainer's private key can pose as the trainer: no stage peer may mount it.
    assert volume not in _mounts("peer").values()
    assert _options("bootstrap", "bootstrap")["--identity"] != trainer_file


def test_dockerfile_creates_every_mount_point_for_its_user():
    """A named volume mounted where the image has no directory comes up owned by root, and the unprivileged user
    could not write the trainer's identity (or anything else) there."""
    ins = dockerfile_instructions()
    (setup,) = [a for op, a in ins if op == "RUN" and "useradd" in a]
    made = set(re.search(r"mkdir -p ([^&]+)", setup).group(1).split())
    owned = set(re.search(r"chown \S+ ([^&]+)", setup).group(1).split())
    for name in services():
        for path, source in _mounts(name).items():
            if source in compose()["volumes"]:
                assert path in made and path in owned, f"{name}: the image must create {path} for its user"


def test_compose_peer_scales_and_chooses_its_stage():
    peer = services()["peer"]
    assert "container_name" not in peer and "hostname" not in peer, "--scale needs per-container names"
    assert not any(":" in str(p).rsplit("/", 1)[0] for p in peer.get("ports", [])), "fixed host ports cannot scale"
    (argv,) = [a for a in service_invocations("peer") if a[0] == "join"]
    options = dict(zip(argv, argv[1:]))
    assert options["--stage"] == "auto"
    assert "--identity" not in options, "a restarted peer must come back as a newcomer"


def test_compose_uses_no_compose_variables():
    """Every `$` meant for the container's shell is written `$$`; a single `$` would be compose interpolation."""
    for text in walk_strings(compose()):
        single = re.sub(r"\$\$", "", text)
        assert "$" not in single, f"unescaped $ (compose would substitute it): {text!r}"


@functools.cache
def subcommands() -> set[str]:
    text = help_text(None)
    return set(re.findall(r"^  (\w+)\s", text.split("Commands:")[1], re.M))


def _all_invocations() -> list[tuple[str, list[str]]]:
    return [(name, argv) for name in ("bootstrap", "peer", "trainer") for argv in service_invocations(name)]


def test_every_compose_service_runs_cfnode():
    roles = {name: {argv[0] for argv in service_invocations(name)} for name in ("bootstrap", "peer", "trainer")}
    assert "bootstrap" in roles["bootstrap"]
    assert "join" in roles["peer"]
    assert "train" in roles["trainer"]


@pytest.mark.parametrize("name, argv", _all_invocations(), ids=lambda v: v if isinstance(v, str) else v[0])
def test_compose_cfnode_commands_are_real(name, argv):
    """Each subcommand exists, each flag is in its --help, and cfnode's own parser accepts the arguments."""
    subcommand, args = argv[0], argv[1:]
    assert subcommand in subcommands(), f"{name}: cfnode has no command {subcommand!r}"
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    assert flags
    for flag in flags:
        assert re.search(rf"(^|\s|/){re.escape(flag)}(\s|$|/|,)", help_text(subcommand), re.M), \
            f"{name}: `cfnode {subcommand}` has no {flag}"
    # Parse (without running) with cfnode's click command: types, ranges and paths are checked too.
    local = [a.replace(IMAGE_APP_DIR, str(ROOT)) for a in args]
    command = cfnode_cli.commands[subcommand]
    try:
        command.make_context(subcommand, local)
    except click.ClickException as e:
        pytest.fail(f"{name}: cfnode {subcommand} {' '.join(args)}: {e.format_message()}")


@pytest.mark.parametrize("name", ["peer", "trainer"])
def test_compose_health_probe_is_a_real_command(name):
    test = services()[name]["healthcheck"]["test"]
    if test[:4] == ["CMD", "python", "-m", "cfnode.node.metrics"]:
        result = subprocess.run([sys.executable, "-m", "cfnode.node.metrics", *test[4:5], "--help"],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        for flag in [t for t in test[5:] if t.startswith("--")]:
            assert flag in result.stdout
        # The probe's port is the one the service serves its metrics on.
        (argv,) = [a for a in service_invocations(name) if a[0] in ("join", "train")]
        options = dict(zip(argv, argv[1:]))
        assert options["--metrics-port"] == test[test.index("--port") + 1]
    else:
        assert service_invocations(name), f"{name}: the health check must run cfnode"


def test_compose_bootstrap_health_check_is_its_address_file():
    """The bootstrap writes the multiaddr file after its spec is stored and removes a stale one at start; a file test
    holds on a loaded machine, where a second Python process with a p2p daemon could take longer than the timeout."""
    bootstrap = services()["bootstrap"]
    script = bootstrap["command"][0]
    maddr = _options("bootstrap", "bootstrap")["--maddr-file"]
    assert script.index(f"rm -f {maddr}") < script.index("exec cfnode bootstrap")
    assert bootstrap["healthcheck"]["test"] == ["CMD-SHELL", f"test -s {maddr}"]


def _composes() -> list[list[str]]:
    found = []
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        found.append([docker, "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    return found


def test_compose_config_with_docker_compose_if_present():
    composes = _composes()
    if not composes:
        pytest.skip("neither compose v2 nor v1 is installed here; the structural checks above stand in for them")
    for argv in composes:  # `config` parses and validates without an engine
        result = subprocess.run([*argv, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(argv)} config: {result.stderr}"
        assert {"bootstrap", "peer", "trainer"} <= set(yaml.safe_load(result.stdout)["services"])
        names = subprocess.run([*argv, "-f", str(COMPOSE), "config", "--volumes"], capture_output=True, text=True,
                               timeout=60)
        assert names.returncode == 0, names.stderr


# --- Dockerfile --------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    result = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


def index_of(instructions, predicate) -> int:
    return next(i for i, item in enumerate(instructions) if predicate(*item))


def test_dockerfile_base_user_entrypoint_and_volume():
    ins = dockerfile_instructions()
    # One base for both stages: python:3.x-slim by default, a local image (docker/base-image.sh) when told.
    (base,) = [args.split("=", 1)[1] for op, args in ins if op == "ARG" and args.startswith("BASE_IMAGE=")]
    assert re.match(r"^python:3\.\d+-slim(-\w+)?$", base), base
    froms = [args.split()[0] for op, args in ins if op == "FROM"]
    assert froms == ["${BASE_IMAGE}", "${BASE_IMAGE}"], froms
    users = [(i, args) for i, (op, args) in enumerate(ins) if op == "USER"]
    assert users, "the image must switch to an unprivileged user"
    entrypoint = index_of(ins, lambda op, args: op == "ENTRYPOINT")
    last_user = [args for i, args in users if i < entrypoint][-1]
    assert last_user.split(":")[0] not in ("root", "0")
    assert json.loads(ins[entrypoint][1]) == ["cfnode"]
    volumes = [args for op, args in ins if op == "VOLUME"]
    assert any("/data" in v for v in volumes)


def test_dockerfile_installs_dependencies_before_copying_the_source():
    ins = dockerfile_instructions()
    copy_pyproject = index_of(ins, lambda op, args: op == "COPY" and "pyproject.toml" in args.split())
    copy_source = index_of(ins, lambda op, args: op == "COPY" and args.split()[0] in ("cfnode", ".", "./cfnode"))
    installs = [i for i, (op, args) in enumerate(ins) if op == "RUN" and "pip install" in args]
    assert copy_pyproject < copy_source
    assert any(copy_pyproject < i < copy_source for i in installs), "a dependency layer between the two COPYs"
    assert any(i > copy_source for i in installs), "cfnode itself is installed after its source is copied"
    # Everything the image copies exists, and .dockerignore does not leave it out of the build context.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for op, args in ins:
        if op == "COPY" and not args.startswith("--from="):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source not in ignored, f".dockerignore leaves {source} out"


def test_dockerfile_cpu_torch_by_default_and_a_cuda_variant():
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) if "=" in a else (a, "") for op, a in ins if op == "ARG")
    assert args["OFFLINE"] == "", "a registry build by default"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "TORCH_VARIANT" in args
    makefile_pin = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_pin, "the image and `make install` must pin the same torch"
    (torch_run,) = [a for op, a in ins if op == "RUN" and "torch==" in a]
    assert "$TORCH_INDEX_URL" in torch_run and "cuda" in torch_run and "${TORCH_VERSION}" in torch_run
    # The install step picks PyPI's CUDA wheel for TORCH_VARIANT=cuda or an empty index, the CPU index otherwise.
    # Offline (OFFLINE=1) it takes torch from the wheelhouse and asks no index.
    for variant, index, offline, expect_index in [("cpu", args["TORCH_INDEX_URL"], "", True),
                                                  ("cuda", args["TORCH_INDEX_URL"], "", False), ("cpu", "", "", False),
                                                  ("cpu", args["TORCH_INDEX_URL"], "1", False)]:
        script = torch_run.replace("pip install", "echo pip install")
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10,
                             env={"TORCH_VARIANT": variant, "TORCH_INDEX_URL": index, "OFFLINE": offline,
                                  "TORCH_VERSION": args["TORCH_VERSION"], "PATH": "/usr/bin:/bin"}).stdout
        assert f"torch=={args['TORCH_VERSION']}" in out
        assert ("--index-url https://download.pytorch.org/whl/cpu" in out) == expect_index, (variant, index, out)
        assert ("--no-index --find-links /wheels" in out) == bool(offline), (offline, out)
    # Every later pip install goes offline with OFFLINE=1 too.
    later = [a for op, a in ins if op == "RUN" and "pip install" in a and "torch==" not in a]
    assert later and all("${OFFLINE:+--no-index --find-links /wheels}" in a for a in later), later


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git"} <= ignored
    assert any("__pycache__" in line for line in ignored)

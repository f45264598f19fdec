"""The address flags as a user meets them: --announce-host, --client-mode, --metrics-port and --watch."""

from __future__ import annotations

import subprocess

import pytest

from cfnode.launcher import cfnode_command

PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWPFXSmdQTekW4QK93dXqXvk4biP9MxZKwPYcuGtNG578L"


@pytest.mark.parametrize(
    "args, reason",
    [
        (["join", "--initial-peers", PEER, "--announce-host", "203.0.113.7"], "--announce-host needs a fixed --port"),
        (["train", "--steps", "1", "--initial-peers", PEER, "--announce-host", "0.0.0.0", "--port", "4000"],
         "not 0.0.0.0"),
        (["bootstrap", "--announce-host", "203.0.113.7", "--port", "0"], "--announce-host needs a fixed --port"),
        (["join", "--initial-peers", PEER, "--metrics-port", "0"], "--metrics-port"),
        (["status", "--initial-peers", PEER, "--watch", "0"], "--watch"),
        (["join", "--initial-peers", PEER, "--client-mode"], "no-such-option: --client-mode"),
    ],
)
def test_address_flags_fail_with_one_line(args, reason):
    result = subprocess.run(cfnode_command(*args), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "error" in lines[0], result.stderr
    if reason.startswith("no-such-option: "):  # a stage peer must accept connections: no --client-mode
        assert reason.split(": ", 1)[1] in lines[0]
    else:
        assert reason in lines[0], lines[0]


@pytest.mark.parametrize("command, flags", [
    ("join", ["--announce-host", "--metrics-port"]),
    ("train", ["--announce-host", "--client-mode", "--metrics-port"]),
    ("status", ["--client-mode", "--watch"]),
    ("bootstrap", ["--announce-host", "--announce-maddr", "--maddr-file"]),
])
def test_address_flags_are_documented(command, flags):
    text = subprocess.run(cfnode_command(command, "--help"), capture_output=True, text=True, timeout=60).stdout
    for flag in flags:
        assert flag in text, flag

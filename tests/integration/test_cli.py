"""The command line as a user meets it: help, one-line errors, env fallbacks, status, stage choice, swarm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from cfnode.data import file_sha256, train_bpe
from cfnode.launcher import cfnode_command, group_alive, spawn, wait_for_maddr
from tests.integration.harness import wait_until


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cfnode_command(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", ["", "bootstrap", "join", "train", "status", "swarm", "identity", "tokenizer",
                                     "data"])
def test_every_command_has_help(command):
    result = run(*([command] if command else []), "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout


@pytest.mark.parametrize(
    "args, env, reason",
    [
        (["join", "--stage", "zero", "--initial-peers", "x"], {}, "--stage"),
        (["join", "--initial-peers", "x"], {"CFNODE_STAGE": "-1"}, "--stage"),
        (["join", "--device", "tpu", "--initial-peers", "x"], {}, "--device"),
        (["join", "--stage", "1", "--initial-peers", "x", "--trace-dir", "/proc/cfnode-trace"], {}, "--trace-dir"),
        (["join"], {}, "--initial-peers is required"),
        (["train", "--steps", "0", "--initial-peers", "x"], {}, "--steps"),
        (["train", "--steps", "5", "--batch-size", "6", "--microbatches", "4", "--initial-peers", "x"], {},
         "multiple of the number of microbatches"),
        (["status", "--port", "70000", "--initial-peers", "x"], {}, "--port"),
        (["join", "--initial-peers", "/ip4/127.0.0.1/tcp/9"], {}, "must be a full multiaddr"),
        (["bootstrap", "--no-such-flag"], {}, "no-such-flag"),
    ],
)
def test_bad_flags_exit_non_zero_with_one_line(args, env, reason):
    result = run(*args, env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and reason in lines[0] and "error" in lines[0], result.stderr


@pytest.mark.parametrize(
    "content, reason",
    [
        ("num_stages: 3\nhiden_size: 64\n", "unknown run spec key(s): hiden_size"),
        ("num_stages: 0\n", "num_stages must be a positive integer"),
        ("recovery: magic\n", "recovery must be one of"),
        ("- just\n- a list\n", "must hold a mapping"),
    ],
)
def test_bootstrap_refuses_a_bad_run_spec(tmp_path, content, reason):
    config = tmp_path / "spec.yaml"
    config.write_text(content)
    result = run("bootstrap", "--config", str(config))
    assert result.returncode != 0
    assert reason in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bootstrap_needs_a_trainer_to_authorise(tmp_path):
    result = run("bootstrap")
    assert result.returncode != 0
    assert "--trainer FILE" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    result = run("bootstrap", "--trainer", str(junk))
    assert result.returncode != 0 and "holds no OpenSSH RSA public key" in result.stderr, result.stderr


def test_bootstrap_reads_toml_and_keeps_its_identity(swarm, tmp_path):
    config = tmp_path / "spec.toml"
    config.write_text('num_stages = 2\nhidden_size = 64\nnum_heads = 4\nseq_len = 32\nrecovery = "checkfree+"\n')
    identity = tmp_path / "bootstrap.key"
    peer_ids = []
    for attempt in range(2):
        maddr_file = tmp_path / f"maddr-{attempt}"
        process = subprocess.Popen(cfnode_command("bootstrap", "--config", str(config), "--identity", str(identity),
                                                  "--maddr-file", str(maddr_file),
                                                  "--trainer", str(tmp_path / "trainer.key")),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            line = process.stdout.readline()
            assert line.startswith("bootstrap ready: /ip4/127.0.0.1/tcp/"), line
            maddr = line.split(": ", 1)[1].strip()
            assert maddr_file.read_text().strip() == maddr
            peer_ids.append(maddr.rsplit("/p2p/", 1)[1])
            status = run("status", "--initial-peers", maddr, "--json")
            report = json.loads(status.stdout)
            assert report["num_stages"] == 2 and report["recovery"] == "checkfree+"
            assert status.returncode == 1  # no stage has a peer yet
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
    assert peer_ids[0] == peer_ids[1]


def test_status_table_and_auto_stage_choice(swarm):
    swarm.start_bootstrap()
    swarm.start_peer(1)
    swarm.start_peer(3)
    swarm.wait_online({1: 1, 3: 1})
    table = run("status", "--initial-peers", swarm.maddr)
    assert table.returncode == 1 and "stage lost" in table.stdout
    newcomer = swarm.start_peer("auto")
    swarm.wait_online({2: 1})
    assert "serving stage 2 (source: fresh)" in swarm.log(newcomer)
    result = run("status", "--initial-peers", swarm.maddr, "--json")
    assert result.returncode == 0
    report = json.loads(result.stdout)
    for stage in report["stages"]:
        (peer,) = stage["peers"]
        assert {"peer_id", "state", "step", "grad_norm", "source", "throughput", "age"} <= set(peer)
        assert peer["state"] == "ONLINE" and peer["age"] < swarm.spec.announce_ttl


def _groups(workdir) -> list[int]:
    return [entry["pid"] for entry in json.loads((workdir / "processes.json").read_text())]


def test_swarm_command_trains_and_leaves_nothing_behind(tmp_path):
    workdir = tmp_path / "swarm"
    jsonl = tmp_path / "events.jsonl"
    result = run("swarm", "--stages", "2", "--steps", "4", "--batch-size", "4", "--microbatches", "2",
                 "--workdir", str(workdir), "--log-jsonl", str(jsonl), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trained to step 4" in result.stdout
    assert len([line for line in jsonl.read_text().splitlines() if '"event": "step"' in line]) == 4
    # The demo's product: the trained model exported from the live stages, and a sample of text from it.
    assert "exported step 4" in result.stdout and "a sample of the trained model (prompt 'def '" in result.stdout
    model = workdir / "model"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= \
        {f.name for f in model.iterdir()}
    groups = _groups(workdir)
    assert len(groups) == 4  # bootstrap, two peers, trainer
    wait_until(lambda: not any(group_alive(g) for g in groups), 15, "every swarm process to exit")


def test_swarm_stops_everything_on_ctrl_c(tmp_path):
    workdir = tmp_path / "swarm"
    process = subprocess.Popen(cfnode_command("swarm", "--stages", "2", "--steps", "10000", "--workdir", str(workdir)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until(lambda: (workdir / "trainer.log").exists() and "step 2/" in (workdir / "trainer.log").read_text(),
                   180, "the swarm to train two steps")
        started = time.monotonic()
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(60) == 130
        assert time.monotonic() - started < 30
        groups = _groups(workdir)
        wait_until(lambda: not any(group_alive(g) for g in groups), 15, "every swarm process to exit")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


TOKENIZER_TEXT = "The trainer reads text, the tokenizer cuts it into tokens: naïve café ✓ 🎉\n" * 60


def test_tokenizer_train_and_data_prepare_commands(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TOKENIZER_TEXT)
    tokenizer = tmp_path / "tokenizer.json"
    trained = run("tokenizer", "train", "--data", str(text), "--vocab-size", "280", "--out", str(tokenizer),
                  "--no-progress")
    assert trained.returncode == 0, trained.stderr
    digest = file_sha256(tokenizer)
    assert f"vocab size 280, sha256 {digest}" in trained.stdout
    assert f"cfnode bootstrap --tokenizer {tokenizer}" in trained.stdout
    prepared = run("data", "prepare", "--data", str(text), "--tokenizer", str(tokenizer), "--out",
                   str(tmp_path / "tokens"))
    assert prepared.returncode == 0, prepared.stderr
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["tokenizer"] == f"sha256:{digest}" and meta["vocab_size"] == 280 and meta["num_tokens"] > 0
    assert f"wrote {meta['num_tokens']:,} tokens" in prepared.stdout and "cfnode train --data" in prepared.stdout
    as_bytes = run("data", "prepare", "--data", str(text), "--out", str(tmp_path / "bytes"), "--log-level", "warning")
    assert as_bytes.returncode == 0, as_bytes.stderr
    meta = json.loads((tmp_path / "bytes" / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["num_tokens"] == len(text.read_bytes())
    # Bad input: one line, no traceback.
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"text\n\xff\xfe not utf-8")
    for args, reason in [
        (["tokenizer", "train", "--vocab-size", "100"], "--vocab-size"),
        (["data", "prepare", "--data", str(bad), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "x")],
         "not UTF-8 text"),
        (["data", "prepare", "--tokenizer", str(text), "--out", str(tmp_path / "y")],
         "is not a Hugging Face tokenizers file"),
    ]:
        result = run(*args)
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert result.returncode != 0 and len(errors) == 1 and reason in errors[0], result.stderr
        assert "Traceback" not in result.stderr, result.stderr


def test_trainer_refuses_a_tokenizer_file_the_run_does_not_pin(swarm, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TOKENIZER_TEXT)
    ours, theirs = tmp_path / "ours.json", tmp_path / "theirs.json"
    train_bpe(text, 280, ours, progress=False)
    train_bpe(["quite another text, so quite another tokenizer\n" * 40], 280, theirs, progress=False)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(swarm.spec.to_dict()))  # the byte tokenizer: --tokenizer overrides it
    maddr_path = tmp_path / "bootstrap.maddr"
    bootstrap = spawn("bootstrap", ["bootstrap", "--config", str(spec_path), "--maddr-file", str(maddr_path),
                                    "--trainer", str(swarm.trainer_identity), "--tokenizer", str(ours)],
                      tmp_path / "bootstrap.log")
    swarm.children.append(bootstrap)
    swarm.maddr = wait_for_maddr(maddr_path, bootstrap, timeout=60)
    trainer, _ = swarm.start_trainer(5, "--tokenizer", str(theirs))
    assert trainer.process.wait(120) == 1
    log = swarm.log(trainer)
    errors = [line for line in log.splitlines() if line.startswith("cfnode train: error:")]
    assert len(errors) == 1 and "Traceback" not in log, log
    assert "is not the run's tokenizer" in errors[0]
    assert f"its sha256 is {file_sha256(theirs)}" in errors[0]
    assert f"the run spec pins sha256 {file_sha256(ours)}" in errors[0]
    assert "run tokenizer:" in swarm.log(bootstrap)

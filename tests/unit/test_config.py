import json

import pytest

from cfnode.config import RECOVERY_MODES, ConfigError, NetworkConfig, RunSpec, TrainConfig


def test_defaults_are_valid():
    spec = RunSpec()
    assert spec.head_dim * spec.num_heads == spec.hidden_size
    assert spec.head_dim % 2 == 0
    assert spec.recovery in RECOVERY_MODES
    assert spec.max_message_bytes == int(spec.max_message_mb * 2**20)
    assert RunSpec.from_dict(spec.to_dict()) == spec


def test_replace_validates():
    assert RunSpec().replace(num_stages=5).num_stages == 5
    with pytest.raises(ConfigError, match="num_stages"):
        RunSpec().replace(num_stages=0)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_stages": 0}, "num_stages"),
        ({"num_stages": -1}, "num_stages"),
        ({"num_stages": 2.0}, "num_stages"),
        ({"num_stages": True}, "num_stages"),
        ({"layers_per_stage": 0}, "layers_per_stage"),
        ({"layers_per_stage": False}, "layers_per_stage"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": "128"}, "hidden_size"),
        ({"num_heads": 0}, "num_heads"),
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": True}, "seq_len"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"hidden_size": 130, "num_heads": 4}, "hidden_size"),  # not divisible by heads
        ({"hidden_size": 12, "num_heads": 4}, "hidden_size"),  # odd head dim (3)
        ({"lr": -1}, "lr"),
        ({"lr": 0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": True}, "lr"),
        ({"lr": "0.1"}, "lr"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"lr_scale": -0.5}, "lr_scale"),
        ({"announce_ttl": 0}, "announce_ttl"),
        ({"max_message_mb": 0}, "max_message_mb"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"weight_decay": "0"}, "weight_decay"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"recovery": "bogus"}, "recovery"),
        ({"recovery": 5}, "recovery"),
        ({"wire_dtype": "float16"}, "wire_dtype"),
        ({"wire_dtype": None}, "wire_dtype"),
        ({"run_id": "a/b"}, "run_id"),
        ({"run_id": "a.b"}, "run_id"),
        ({"run_id": "a b"}, "run_id"),
        ({"run_id": ""}, "run_id"),
        ({"run_id": "-"}, "run_id"),
        ({"run_id": 7}, "run_id"),
        ({"num_kv_heads": 3}, "num_kv_heads"),  # 4 heads do not share 3 key/value heads evenly
        ({"num_kv_heads": -1}, "num_kv_heads"),
        ({"intermediate_size": -5}, "intermediate_size"),
        ({"rope_theta": 0}, "rope_theta"),
        ({"norm_eps": -1e-6}, "norm_eps"),
        ({"vocab_size": 200}, "byte tokenizer"),  # a byte needs 256 ids
        ({"tokenizer": "bpe"}, "tokenizer"),
        ({"tokenizer": "sha256:abc"}, "tokenizer"),
        ({"tokenizer": 5}, "tokenizer"),
        ({"init_digests": ("0" * 64,)}, "init_digests"),  # one per part: the head and each of 3 stages
        ({"init_digests": ("x" * 64,) * 4}, "init_digests"),
    ],
)
def test_invalid_values_refused(changes, field):
    with pytest.raises(ConfigError, match=field):
        RunSpec(**changes)


@pytest.mark.parametrize("recovery", RECOVERY_MODES)
def test_every_recovery_mode_accepted(recovery):
    assert RunSpec(recovery=recovery).recovery == recovery


@pytest.mark.parametrize("run_id", ["run", "run-2", "my_run", "A1"])
def test_plain_run_ids_accepted(run_id):
    assert RunSpec(run_id=run_id).run_id == run_id


@pytest.mark.parametrize("weight_decay", [True, float("nan")])
def test_weight_decay_refuses_bool_and_nan(weight_decay):
    with pytest.raises(ConfigError, match="weight_decay"):
        RunSpec(weight_decay=weight_decay)


def test_from_dict_refuses_unknown_keys_and_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        RunSpec.from_dict({"num_stages": 2, "bogus": 1, "another": 2})
    message = str(info.value)
    assert "bogus" in message and "another" in message
    for name in RunSpec().to_dict():
        assert name in message


def test_from_dict_accepts_ints_for_float_fields():
    spec = RunSpec.from_dict({"lr": 1, "weight_decay": 0, "grad_clip": 2, "lr_scale": 1, "announce_ttl": 5,
                              "max_message_mb": 8})
    for name in ("lr", "weight_decay", "grad_clip", "lr_scale", "announce_ttl", "max_message_mb"):
        assert type(getattr(spec, name)) is float
    assert spec.lr == 1.0 and spec.max_message_mb == 8.0
    # bools are not numbers here, even in a float field
    with pytest.raises(ConfigError, match="lr"):
        RunSpec.from_dict({"lr": True})


def test_from_dict_keeps_int_fields_int():
    spec = RunSpec.from_dict({"num_stages": 4, "seed": 3})
    assert type(spec.num_stages) is int and type(spec.seed) is int


def test_from_dict_validates_values():
    with pytest.raises(ConfigError, match="num_stages"):
        RunSpec.from_dict({"num_stages": 0})


EXPECTED = RunSpec(run_id="filetest", num_stages=2, hidden_size=64, lr=1.0, recovery="copy")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("spec.yaml", "run_id: filetest\nnum_stages: 2\nhidden_size: 64\nlr: 1\nrecovery: copy\n"),
        ("spec.yml", "run_id: filetest\nnum_stages: 2\nhidden_size: 64\nlr: 1\nrecovery: copy\n"),
        ("spec.toml", 'run_id = "filetest"\nnum_stages = 2\nhidden_size = 64\nlr = 1\nrecovery = "copy"\n'),
        ("spec.json", json.dumps({"run_id": "filetest", "num_stages": 2, "hidden_size": 64, "lr": 1,
                                  "recovery": "copy"})),
    ],
)
def test_from_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    spec = RunSpec.from_file(path)
    assert spec == EXPECTED
    assert type(spec.lr) is float
    assert RunSpec.from_file(str(path)) == EXPECTED


def test_from_file_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert RunSpec.from_file(path) == RunSpec()


def test_from_file_bad_extension(tmp_path):
    path = tmp_path / "spec.ini"
    path.write_text("num_stages = 2\n")
    with pytest.raises(ConfigError, match="must end in"):
        RunSpec.from_file(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bad.yaml", "num_stages: [1, 2\n"),
        ("bad.toml", "num_stages = = 2\n"),
        ("bad.json", "{num_stages: 2"),
    ],
)
def test_from_file_unparsable(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match="cannot parse"):
        RunSpec.from_file(path)


def test_from_file_missing(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        RunSpec.from_file(tmp_path / "nope.yaml")


def test_from_file_directory(tmp_path):
    path = tmp_path / "dir.yaml"
    path.mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        RunSpec.from_file(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("list.yaml", "- 1\n- 2\n"),
        ("scalar.yaml", "hello\n"),
        ("list.json", "[1, 2]"),
        ("number.json", "3"),
        ("null.json", "null"),
    ],
)
def test_from_file_non_mapping(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping"):
        RunSpec.from_file(path)


def test_from_file_unknown_key(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text("bogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        RunSpec.from_file(path)


def test_from_file_invalid_value(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("recovery: bogus\n")
    with pytest.raises(ConfigError, match="recovery"):
        RunSpec.from_file(path)


@pytest.mark.parametrize("text", ["[]\n", "0\n", "false\n", "''\n"])
def test_from_file_falsy_yaml_is_not_a_mapping(tmp_path, text):
    path = tmp_path / "falsy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping"):
        RunSpec.from_file(path)


def test_from_file_non_string_keys(tmp_path):
    path = tmp_path / "intkey.yaml"
    path.write_text("1: 2\n")
    with pytest.raises(ConfigError):
        RunSpec.from_file(path)


def test_from_file_not_utf8(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError):
        RunSpec.from_file(path)


def test_network_config():
    assert NetworkConfig().port == 0
    with pytest.raises(ConfigError, match="port"):
        NetworkConfig(port=70000)
    with pytest.raises(ConfigError, match="port"):
        NetworkConfig(port=-1)
    with pytest.raises(ConfigError, match="timeout"):
        NetworkConfig(connect_timeout=0)


def test_train_config_defaults_valid():
    config = TrainConfig(network=NetworkConfig())
    assert config.batch_size % config.microbatches == 0


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"batch_size": 10, "microbatches": 4}, "multiple"),
        ({"batch_size": 3, "microbatches": 2}, "multiple"),
        ({"steps": 0}, "steps"),
        ({"steps": -5}, "steps"),
        ({"batch_size": 0}, "batch size"),
        ({"microbatches": 0}, "microbatches"),
        ({"request_timeout": 0}, "timeouts"),
        ({"stage_timeout": -1}, "timeouts"),
        ({"ban_seconds": -1}, "timeouts"),
    ],
)
def test_train_config_refuses(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        TrainConfig(network=NetworkConfig(), **changes)


def test_train_config_accepts_zero_ban():
    assert TrainConfig(network=NetworkConfig(), ban_seconds=0).ban_seconds == 0


def test_shipped_examples_load_and_demo_lists_the_defaults():
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    assert RunSpec.from_file(examples / "demo.toml") == RunSpec()
    assert RunSpec.from_file(examples / "tiny.yaml").num_stages == 3


def test_spec_owners_are_the_initial_peers_ids():
    network = NetworkConfig(initial_peers=("/ip4/127.0.0.1/tcp/1/p2p/QmA", "/ip4/10.0.0.2/tcp/2/p2p/QmB/"))
    assert network.spec_owners == ("QmA", "QmB")
    assert NetworkConfig().spec_owners == ()


def test_the_stage_timeout_takes_seconds_or_forever():
    import math

    import click

    from cfnode.cli import SECONDS_OR_FOREVER

    assert SECONDS_OR_FOREVER.convert("forever", None, None) == math.inf
    assert SECONDS_OR_FOREVER.convert("12.5", None, None) == 12.5
    for bad in ("never", "0", "-3", "nan"):
        with pytest.raises(click.BadParameter):
            SECONDS_OR_FOREVER.convert(bad, None, None)
    assert TrainConfig(NetworkConfig(), stage_timeout=math.inf).stage_timeout == math.inf


def test_model_shape_defaults_and_checkpoint_fields():
    spec = RunSpec()
    assert (spec.kv_heads, spec.mlp_hidden, spec.tokenizer_sha256) == (spec.num_heads, 352, None)
    digest = "ab" * 32
    shaped = RunSpec(num_kv_heads=2, intermediate_size=96, tokenizer=f"sha256:{digest}", vocab_size=300,
                     init_digests=(digest,) * 4)
    assert (shaped.kv_heads, shaped.mlp_hidden, shaped.tokenizer_sha256) == (2, 96, digest)
    # The published spec travels as a dict of plain values (msgpack gives lists back): it round-trips.
    wire = {k: list(v) if isinstance(v, tuple) else v for k, v in shaped.to_dict().items()}
    assert RunSpec.from_dict(wire) == shaped


OWNER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
OTHER_OWNER = "12D3KooWPFXSmdQTekW4QK93dXqXvk4biP9MxZKwPYcuGtNG578L"
STAGE_PEER = "/ip4/127.0.0.1/tcp/4000/p2p/QmSq7pNsCDTmXRXr1ZuqxNd1Y4ko1UqpNpm8PLjRTwdLuv"


def test_spec_owner_ids_take_precedence_over_the_initial_peers():
    network = NetworkConfig(initial_peers=(STAGE_PEER,), spec_owner_ids=(OWNER, OTHER_OWNER))
    assert network.spec_owners == (OWNER, OTHER_OWNER)
    assert network.initial_peer_ids == ("QmSq7pNsCDTmXRXr1ZuqxNd1Y4ko1UqpNpm8PLjRTwdLuv",)
    # without them, the initial peers are trusted, as before
    assert NetworkConfig(initial_peers=(STAGE_PEER,)).spec_owners == network.initial_peer_ids


@pytest.mark.parametrize("bad", ["", "QmA", "not-base58-0OIl", "Qm" + "x" * 44, OWNER + " ", OWNER[:-1],
                                 STAGE_PEER])
def test_spec_owner_must_be_a_peer_id(bad):
    with pytest.raises(ConfigError, match="spec owner .* is not a libp2p peer id"):
        NetworkConfig(spec_owner_ids=(bad,))


def _status_network(args, monkeypatch=None, **env):
    from cfnode.cli import _network, status

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    context = status.make_context("status", ["--initial-peers", STAGE_PEER, *args])
    return _network(dict(context.params), client_mode=True)


def test_cli_spec_owner_is_repeatable_and_space_separated():
    network = _status_network(["--spec-owner", f"{OWNER} {OTHER_OWNER}", "--spec-owner", OWNER])
    assert network.spec_owner_ids == (OWNER, OTHER_OWNER)  # duplicates dropped, order kept
    assert _status_network([]).spec_owner_ids == ()


def test_cli_spec_owner_from_the_environment(monkeypatch):
    network = _status_network([], monkeypatch, CFNODE_SPEC_OWNER=f"{OTHER_OWNER} {OWNER}")
    assert network.spec_owners == (OTHER_OWNER, OWNER)


def test_cli_bad_spec_owner_is_a_usage_error():
    import click

    with pytest.raises(click.UsageError, match="spec owner 'QmA' is not a libp2p peer id"):
        _status_network(["--spec-owner", "QmA"])


def test_a_spec_not_found_without_spec_owner_says_to_name_one():
    from cfnode.cli import _finding_spec
    from cfnode.node.swarm_map import SpecNotFound

    def missing():
        raise SpecNotFound("no run spec for run 'cfnode'")

    with pytest.raises(SpecNotFound, match="no run spec for run 'cfnode' .*--spec-owner PEER_ID"):
        _finding_spec(NetworkConfig(initial_peers=(STAGE_PEER,)), missing)()
    with pytest.raises(SpecNotFound, match="^no run spec for run 'cfnode'$"):  # it named one: nothing to add
        _finding_spec(NetworkConfig(initial_peers=(STAGE_PEER,), spec_owner_ids=(OWNER,)), missing)()

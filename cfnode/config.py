"""Run spec: the model shape and training settings every node of one run must agree on."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

RECOVERY_MODES = ("none", "checkfree", "checkfree+", "uniform", "copy", "random")
MAX_MICROBATCHES = 1024  # per step: a peer keeps one input gradient per microbatch until the step
# How activations and their gradients travel between trainer and stages; int8 is blockwise (protocol/quantize.py).
WIRE_DTYPES = ("float32", "bfloat16", "int8")
MAX_STAGES = 256  # body stages a run may have; DHT validators know every stage key up to it
MAX_TRAINER_KEYS = 16
BYTE_TOKENIZER = "byte"  # one token per byte of UTF-8; any other tokenizer is named "sha256:<digest of its file>"


class ConfigError(ValueError):
    """A run spec or flag value that cannot be used; the message says why."""


def _is_rsa_public_key(value: Any) -> bool:
    if not isinstance(value, str) or not value.startswith("ssh-rsa ") or len(value) > 2048:
        return False
    try:
        return isinstance(serialization.load_ssh_public_key(value.encode()), rsa.RSAPublicKey)
    except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm):
        return False


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RunSpec:
    """Published by the bootstrap on the DHT; every peer and trainer reads it from there."""

    run_id: str = "cfnode"  # namespace of every DHT key of this run
    num_stages: int = 3  # body stages 1..S; the trainer holds embedding, final norm and head
    layers_per_stage: int = 2  # identical transformer blocks per body stage
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as num_heads
    intermediate_size: int = 0  # the SwiGLU MLP's width; 0: LLaMa's rule, 8/3 x hidden_size rounded up to 32
    rope_theta: float = 10000.0  # base of the rotary angles
    norm_eps: float = 1e-6  # RMSNorm's epsilon
    seq_len: int = 128
    vocab_size: int = 256  # at least 256 with the byte tokenizer; a tokenizer file's own size otherwise
    # "byte", or "sha256:<hex>" of a Hugging Face tokenizers file (tokenizer.json) that every trainer, exporter and
    # generator of the run must hold (cfnode/data/tokenizer.py)
    tokenizer: str = BYTE_TOKENIZER
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max L2 norm of a stage's gradient per step
    seed: int = 0  # fresh weights of every stage derive from it
    recovery: str = "checkfree"
    lr_scale: float = 1.1  # learning-rate factor for a stage rebuilt from its neighbours
    swap_fraction: float = 0.5  # checkfree+: share of each step's microbatches routed 2,1,3,...,S,S-1
    head_copy_every: int = 10  # the trainer copies embedding, norm and head to stages 1 and S every N steps (0: off)
    announce_ttl: float = 10.0  # seconds an announcement lives unless refreshed
    max_message_mb: float = 64.0  # largest activation or gradient payload a peer accepts
    # Activations and their gradients on the wire; compute, states and the replicas' gradient exchange stay float32.
    # bfloat16 halves the bytes; in benchmarks/loss_compare.py it trained within the seed-to-seed noise. int8 sends
    # 1.06 bytes a value (64-value blocks, each with a float32 scale).
    wire_dtype: str = "bfloat16"
    # Refit (cfnode.recovery.refit): the trainer keeps each stage's last refit_cache (input, output) microbatch
    # pairs, and a newcomer that rebuilds a stage regresses it onto them for at most refit_steps steps. 0: off.
    refit_cache: int = 16
    refit_steps: int = 200
    refit_lr: float = 1e-3
    refit_seconds: float = 60.0  # the refit's time budget: a newcomer serves with the best weights it has by then
    # Who may drive training: the OpenSSH-format RSA public keys of the trainers this run authorises (the bootstrap's
    # --trainer). Stage peers take training calls and head copies only from these peers, and newcomers trust only
    # their records and the step proofs they signed (cfnode/protocol/trust.py).
    trainer_keys: tuple[str, ...] = ()
    # A run started from a checkpoint (`cfnode bootstrap --init-from DIR`): the sha256 of each part of it, index 0
    # the embedding, final norm and head, index s body stage s (cfnode/hf/checkpoint.py). Empty: fresh weights from
    # the seed.
    init_digests: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        positive_ints = ("num_stages", "layers_per_stage", "hidden_size", "num_heads", "seq_len", "vocab_size")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer (0: the default), got {value!r}")
        if self.num_heads % self.kv_heads != 0:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.kv_heads})")
        if self.num_stages > MAX_STAGES:
            raise ConfigError(f"num_stages must be at most {MAX_STAGES}, got {self.num_stages}")
        for name in ("refit_cache", "refit_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "grad_clip", "lr_scale", "announce_ttl", "max_message_mb", "refit_lr", "refit_seconds",
                     "rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be a non-negative number, got {self.weight_decay!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.hidden_size % self.num_heads != 0 or (self.hidden_size // self.num_heads) % 2 != 0:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}) "
                "into an even head size (rotary embeddings rotate pairs)"
            )
        if not _is_number(self.swap_fraction) or not 0 <= self.swap_fraction <= 1:
            raise ConfigError(f"swap_fraction must be a number in [0, 1], got {self.swap_fraction!r}")
        if not isinstance(self.head_copy_every, int) or isinstance(self.head_copy_every, bool) \
                or self.head_copy_every < 0:
            raise ConfigError(f"head_copy_every must be a non-negative integer, got {self.head_copy_every!r}")
        if self.recovery == "checkfree+" and self.num_stages < 2:
            raise ConfigError("recovery checkfree+ needs at least 2 body stages: it swaps neighbouring stages")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}; got {self.wire_dtype!r}")
        if self.recovery not in RECOVERY_MODES:
            raise ConfigError(f"recovery must be one of {', '.join(RECOVERY_MODES)}; got {self.recovery!r}")
        keys = self.trainer_keys
        if not isinstance(keys, tuple) or len(keys) > MAX_TRAINER_KEYS or not all(map(_is_rsa_public_key, keys)):
            raise ConfigError(f"trainer_keys must be at most {MAX_TRAINER_KEYS} OpenSSH RSA public keys "
                              "('ssh-rsa AAAA...')")
        if self.tokenizer == BYTE_TOKENIZER:
            if self.vocab_size < 256:
                raise ConfigError(f"the byte tokenizer needs vocab_size of at least 256, got {self.vocab_size}")
        elif not (isinstance(self.tokenizer, str) and self.tokenizer.startswith("sha256:")
                  and _is_sha256(self.tokenizer.removeprefix("sha256:"))):
            raise ConfigError(f"tokenizer must be 'byte' or 'sha256:<64 hex digits>' of a tokenizer file, "
                              f"got {self.tokenizer!r}")
        digests = self.init_digests
        if not isinstance(digests, tuple) or not all(map(_is_sha256, digests)) \
                or len(digests) not in (0, self.num_stages + 1):
            raise ConfigError(f"init_digests must be empty or {self.num_stages + 1} sha256 hex digests "
                              "(the head, then each body stage)")
        plain_run_id = isinstance(self.run_id, str) and self.run_id.replace("-", "").replace("_", "").isalnum()
        if not plain_run_id:
            raise ConfigError(f"run_id must be a non-empty name of letters, digits, '-' and '_', got {self.run_id!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """The SwiGLU MLP's width: intermediate_size, or LLaMa's 2/3 of 4 x hidden_size rounded up to 32."""
        if self.intermediate_size:
            return self.intermediate_size
        return 32 * ((int(8 * self.hidden_size / 3) + 31) // 32)

    @property
    def tokenizer_sha256(self) -> str | None:
        """The pinned tokenizer file's digest; None for the byte tokenizer."""
        return None if self.tokenizer == BYTE_TOKENIZER else self.tokenizer.removeprefix("sha256:")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise ConfigError(f"unknown run spec key(s): {', '.join(unknown)}; valid keys: {', '.join(known)}")
        values = {}
        for name, value in data.items():
            # TOML and YAML give ints where floats are meant ("lr: 1"); accept them.
            if known[name].type == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            # JSON, YAML and msgpack give lists
            if name in ("trainer_keys", "init_digests") and isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> RunSpec:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config {path} is not UTF-8 text") from None
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text)
                data = {} if data is None else data  # an empty file means all defaults
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise ConfigError(f"config {path} must end in .yaml, .yml, .toml or .json")
        except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot parse config {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must hold a mapping of keys to values")
        return cls.from_dict(data)


@dataclass(frozen=True)
class NetworkConfig:
    """How a node joins the DHT: shared by join, train, status and bootstrap."""

    initial_peers: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    identity_path: str | None = None
    announce_maddrs: tuple[str, ...] = ()
    client_mode: bool = False
    run_id: str = "cfnode"
    connect_timeout: float = 30.0  # bound on reaching the initial peers and finding the run spec
    # Peer ids trusted to sign the run spec (`--spec-owner`, the bootstrap's). Empty: the initial peers' ids, so a
    # node joins through the bootstrap itself; with it, any live peer of the swarm serves as an initial peer.
    spec_owner_ids: tuple[str, ...] = ()

    @property
    def initial_peer_ids(self) -> tuple[str, ...]:
        """The peer ids at the end of the initial peers' multiaddrs (/.../p2p/<peer id>)."""
        return tuple(maddr.rsplit("/p2p/", 1)[1].strip("/") for maddr in self.initial_peers if "/p2p/" in maddr)

    @property
    def spec_owners(self) -> tuple[str, ...]:
        """Peer ids trusted to sign the run spec: `spec_owner_ids` if given, else the initial peers' ids."""
        return self.spec_owner_ids or self.initial_peer_ids

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.connect_timeout <= 0:
            raise ConfigError("connect timeout must be positive")
        for owner in self.spec_owner_ids:
            if not is_peer_id(owner):
                raise ConfigError(f"spec owner {owner!r} is not a libp2p peer id: give the bootstrap's base58 peer "
                                  "id, which `cfnode status` prints (the part after /p2p/ of the bootstrap's "
                                  "multiaddr: Qm... or 12D3KooW...)")


def is_peer_id(value: Any) -> bool:
    """Whether `value` is a base58 libp2p peer id: a multihash, sha256 (Qm...) or identity (12D3KooW...)."""
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        return False
    from hivemind.p2p import PeerID  # here: hivemind is slow to import and only a given --spec-owner needs it

    try:
        peer_id = PeerID.from_base58(value)
    except ValueError:  # a character outside the base58 alphabet
        return False
    raw = peer_id.to_bytes()
    if peer_id.to_base58() != value:  # the decoder skips surrounding whitespace; a peer id has none
        return False
    # from_base58 takes any base58 text; a peer id is a multihash: <hash code> <digest length> <digest>
    return len(raw) > 2 and raw[0] in (0x00, 0x12) and raw[1] == len(raw) - 2 and (raw[0] == 0x00 or raw[1] == 32)


@dataclass(frozen=True)
class JoinConfig:
    """A stage peer: which stage to serve and where to compute."""

    network: NetworkConfig
    stage: int | None = None  # None: choose automatically
    device: str = "cpu"
    request_timeout: float = 30.0  # for the RPCs this peer makes (state download, gradient exchange)
    metrics_port: int | None = None  # serve Prometheus metrics at http://<host>:<port>/metrics
    standby: bool = False  # with stage None: wait, connected, until a stage has no live peer, then rebuild it
    standby_poll: float = 0.5  # seconds between a standby peer's looks at the stage map
    leave_timeout: float = 30.0  # on SIGTERM: time to finish in-flight work and hand the stage's state over
    keep_activations: int = 16  # microbatches whose forward graph waits for their backward (0: recompute)
    trace_dir: str | None = None  # write a JSON line per compute call here (cfnode/node/trace.py)
    init_from: str | None = None  # a local copy of the checkpoint the run started from (cfnode/hf/init_from.py)
    state_path: str | None = None  # save this replica's exact state here every state_every steps and on leaving
    state_every: int = 10


@dataclass(frozen=True)
class TrainConfig:
    """The trainer: the data, the schedule and the failure handling."""

    network: NetworkConfig
    steps: int = 100
    data_path: str | None = None  # raw text (file or folder of .txt), or a prepared token directory (has meta.json)
    tokenizer_path: str | None = None  # the file the spec's tokenizer pins by digest; None for the byte tokenizer
    batch_size: int = 16
    microbatches: int = 4
    log_jsonl: str | None = None
    eval_every: int = 10  # validation loss every N steps (0: only at the end)
    eval_batches: int = 4
    request_timeout: float = 30.0  # per forward / backward / step call
    stage_timeout: float = 300.0  # how long to wait for a lost stage to come back before giving up
    ban_seconds: float = 15.0  # how long a failed peer is skipped
    device: str = "cpu"
    seed: int = 0  # data order
    metrics_port: int | None = None  # serve Prometheus metrics at http://<host>:<port>/metrics
    state_path: str | None = None  # the trainer's own saved embedding and head, to resume from after a restart
    state_every: int = 10  # save it every N steps (and on exit)
    pipe: bool = True  # forward and backward calls on one long-lived stream per peer (protocol/pipe.py)
    init_from: str | None = None  # a local copy of the checkpoint the run started from (cfnode/hf/init_from.py)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1 or self.microbatches < 1:
            raise ConfigError("batch size and microbatches must be at least 1")
        if self.microbatches > MAX_MICROBATCHES:
            raise ConfigError(f"microbatches must be at most {MAX_MICROBATCHES}, got {self.microbatches}")
        if self.batch_size % self.microbatches != 0:
            raise ConfigError(
                f"batch size {self.batch_size} must be a multiple of the number of microbatches {self.microbatches}"
            )
        if self.state_every < 1:
            raise ConfigError(f"state_every must be at least 1, got {self.state_every}")
        if self.request_timeout <= 0 or self.stage_timeout <= 0 or self.ban_seconds < 0:
            raise ConfigError("timeouts must be positive")

"""Typed DHT records. Readers validate every record and skip what does not parse."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from cfnode.config import ConfigError, RunSpec

PROTOCOL_VERSION = 1
MAX_STEP_PROOF = 1024  # characters of a base64 RSA signature (protocol/trust.py)


class RecordError(ValueError):
    """A DHT record that does not match its schema."""


class PeerState(str, Enum):
    JOINING = "JOINING"  # obtaining weights; not routable yet
    ONLINE = "ONLINE"  # serving forward / backward / step
    LEAVING = "LEAVING"  # clean shutdown in progress; not routable


# Where a peer's weights came from: fresh init, an exact copy of a live replica, or a recovery kind.
# "handoff" is an exact state a stage's last peer left with a neighbour on a clean leave.
WEIGHT_SOURCES = ("fresh", "replica", "handoff", "checkfree", "checkfree+", "uniform", "copy", "random")


@dataclass(frozen=True)
class StageAnnouncement:
    """What a stage peer says about itself under `stage_key(run_id, stage)`, signed, under its own owner subkey."""

    peer_id: str
    stage: int
    state: PeerState
    step: int  # optimiser steps this stage has taken
    throughput: float  # tokens per second through forward + backward, recent average
    load: int  # requests in flight now
    grad_norm: float | None  # L2 norm of the stage gradient at its last step (before clipping)
    source: str  # one of WEIGHT_SOURCES
    recovered_from: list[str] = field(default_factory=list)  # "stage:peer_id" of the sources, if any
    announced_at: float = 0.0  # DHT time of this announcement; its age tells how fresh it is
    kept: list[int] = field(default_factory=list)  # stages whose state copies it keeps (0: the trainer's head)
    refit: dict[str, Any] = field(default_factory=dict)  # a rebuilt stage's refit: pairs, steps, losses (or why not)
    step_proof: str = ""  # a trainer's signature that the run reached `step` (protocol/trust.py); "" at step 0
    version: int = PROTOCOL_VERSION
    # Multiaddrs (/.../p2p/<peer id>) this peer can be dialed at: any of them is an entry point to the swarm for a
    # newcomer that names the spec owner (`cfnode join --spec-owner`); `cfnode status` lists some.
    maddrs: list[str] = field(default_factory=list)
    # DHT time of the join claim this peer made before choosing its stage (its place in the newcomers' queue): of
    # two newcomers obtaining one stage's weights, the later one waits for the earlier, never both for each other.
    claimed_at: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["state"] = self.state.value
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> StageAnnouncement:
        values = _known_fields(cls, data, "announcement")
        try:
            values["state"] = PeerState(values["state"])
        except ValueError:
            raise RecordError(f"unknown peer state {values['state']!r}") from None
        record = cls(**values)
        record._check()
        return record

    def _check(self) -> None:
        _check_shared(self, counts=("stage", "step", "load", "version"),
                      amounts=("announced_at", "throughput", "claimed_at"))
        if self.grad_norm is not None and not _finite_non_negative(self.grad_norm):
            raise RecordError(f"grad_norm must be a finite non-negative number or None, got {self.grad_norm!r}")
        if self.source not in WEIGHT_SOURCES:
            raise RecordError(f"unknown weight source {self.source!r}")
        if not isinstance(self.recovered_from, list) or not all(isinstance(s, str) for s in self.recovered_from):
            raise RecordError("recovered_from must be a list of strings")
        if not isinstance(self.kept, list) or len(self.kept) > 3 or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.kept):
            raise RecordError("kept must be a list of at most 3 stage numbers")
        if not isinstance(self.refit, dict) or len(self.refit) > 8 or not all(
                isinstance(k, str) and (v is None or isinstance(v, (int, float, str))) for k, v in self.refit.items()):
            raise RecordError("refit must be a small map of names to numbers or strings")
        if not isinstance(self.step_proof, str) or len(self.step_proof) > MAX_STEP_PROOF:
            raise RecordError(f"step_proof must be a string of at most {MAX_STEP_PROOF} characters")
        # A few interfaces and transports; bounded so a record cannot carry a list to flood readers with
        if not isinstance(self.maddrs, list) or len(self.maddrs) > 8 or not all(
                isinstance(m, str) and 0 < len(m) <= 256 for m in self.maddrs):
            raise RecordError("maddrs must be a list of at most 8 multiaddrs of at most 256 characters")


@dataclass(frozen=True)
class TrainerAnnouncement:
    """What the trainer says about itself under `trainer_key(run_id)`, signed, under its own owner subkey."""

    peer_id: str
    step: int
    cached: int  # microbatch pairs it keeps per stage for refits (the run spec's refit_cache)
    announced_at: float = 0.0
    version: int = PROTOCOL_VERSION

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Any) -> TrainerAnnouncement:
        record = cls(**_known_fields(cls, data, "trainer announcement"))
        _check_shared(record, counts=("step", "cached", "version"), amounts=("announced_at",))
        return record


@dataclass(frozen=True)
class JoinClaim:
    """A newcomer's claim under `claims_key(run_id)`, written before it chooses a stage with `--stage auto`.

    Newcomers that start together see each other's claims and order themselves by (claimed_at, peer_id), so each
    makes the choice the ones before it made (node/stage_choice.assign_stages). `stage` is 0 until the claimant
    has chosen; it refreshes the claim until its JOINING announcement is stored.
    """

    peer_id: str
    claimed_at: float  # DHT time at which it first claimed: its place in the queue
    stage: int = 0  # the stage it chose, 0 while undecided
    version: int = PROTOCOL_VERSION

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Any) -> JoinClaim:
        record = cls(**_known_fields(cls, data, "join claim"))
        _check_shared(record, counts=("stage", "version"), amounts=("claimed_at",))
        return record


PROGRESS_TTL = 3600.0  # a run's progress outlives its trainer and a bootstrap restart; both refresh it


@dataclass(frozen=True)
class RunProgress:
    """The furthest step the run is known to have reached, under `progress_key(run_id)`: kept by the bootstrap
    (and across its restarts), so a newcomer that sees no live stage still knows the run trained and does not
    start an island of fresh weights. The step counts only with a trainer's proof (protocol/trust.py)."""

    step: int
    step_proof: str
    announced_at: float = 0.0
    version: int = PROTOCOL_VERSION

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Any) -> RunProgress:
        record = cls(**_known_fields(cls, data, "run progress"))
        _check_shared(record, counts=("step", "version"), amounts=("announced_at",), peer=False)
        if not isinstance(record.step_proof, str) or len(record.step_proof) > MAX_STEP_PROOF:
            raise RecordError(f"step_proof must be a string of at most {MAX_STEP_PROOF} characters")
        return record


def _known_fields(cls: type, data: Any, what: str) -> dict[str, Any]:
    """A record's fields from its wire form. Unknown fields are ignored, so newer nodes can add some; a missing
    field without a default is an error."""
    if not isinstance(data, Mapping):
        raise RecordError(f"{what} must be a mapping, got {type(data).__name__}")
    values = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = required - set(values)
    if missing:
        raise RecordError(f"{what} lacks {', '.join(sorted(missing))}")
    return values


def _check_shared(record: Any, counts: tuple[str, ...], amounts: tuple[str, ...], peer: bool = True) -> None:
    """The checks records share: a non-empty peer id, counts that are non-negative integers, and amounts (times,
    rates) that are finite and non-negative."""
    if peer and (not isinstance(record.peer_id, str) or not record.peer_id):
        raise RecordError("peer_id must be a non-empty string")
    for name in counts:
        value = getattr(record, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RecordError(f"{name} must be a non-negative integer, got {value!r}")
    for name in amounts:
        value = getattr(record, name)
        if not _finite_non_negative(value):
            raise RecordError(f"{name} must be a finite non-negative number, got {value!r}")


def _finite_non_negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def spec_from_wire(data: Any) -> RunSpec:
    """The run spec record; a malformed one is a RecordError, never a crash."""
    if not isinstance(data, Mapping):
        raise RecordError(f"run spec must be a mapping, got {type(data).__name__}")
    try:
        return RunSpec.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise RecordError(f"invalid run spec record: {e}") from None

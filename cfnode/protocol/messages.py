"""RPC messages: typed dataclasses and their encoding into hivemind's ExpertRequest / ExpertResponse.

A message is msgpack metadata plus tensors. Messages that carry tensors are streamed in chunks (on this
daemon a stream is also faster than a unary call for activation-sized payloads); the first chunk
carries the metadata. Replies carry either a result or an `error` with a code and a one-line reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import hivemind.compression.base
import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from cfnode.config import MAX_MICROBATCHES
from cfnode.protocol import quantize
from cfnode.protocol.records import MAX_STEP_PROOF
from cfnode.protocol.timing import timed

CHUNK_BYTES = 2**16  # activations and gradients: small streams, where small chunks start sooner
STATE_CHUNK_BYTES = 2**20  # weights and optimiser state: large streams, where fewer chunks move faster
MAX_METADATA_BYTES = 2**20
# hivemind sends bfloat16 tensors widened to float32 unless told otherwise (its USE_LEGACY_BFLOAT16 switch, read
# from the environment at import): send them as the 2 bytes they are. Its decoder reads both forms.
hivemind.compression.base.USE_LEGACY_BFLOAT16 = False
Message = TypeVar("Message", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)


class ProtocolError(ValueError):
    """A request or reply that breaks the wire contract (bad metadata, too large, truncated, ...)."""


class TruncatedStream(ProtocolError):
    """A stream that ended before its last tensor was complete; the daemon sometimes cuts a stream's tail, so
    this is worth retrying, unlike other protocol errors."""


class RemoteError(RuntimeError):
    """The other side refused a request; `code` says why in one word."""

    def __init__(self, code: str, message: str, peers: list[str] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.peers = peers or []  # with GROUP_FAILED: the replicas that could not be reached


# Error codes a peer replies with.
BAD_REQUEST = "bad_request"  # malformed, wrong stage / shape / dtype, NaN or Inf, too large
STALE = "stale"  # the peer's step differs from the caller's; it resynchronises
NOT_READY = "not_ready"  # the peer is joining or leaving
INTERNAL = "internal"  # an unexpected failure while handling a valid request
TRUNCATED = "truncated"  # the request stream arrived incomplete; sending it again usually works
GROUP_FAILED = "group_failed"  # a step could not gather the gradients of every replica; nothing was applied
NO_ACTIVATIONS = "no_activations"  # a backward without its input, and the peer kept no activations for it
# A step whose replicas' records of summed microbatches (protocol/ledger.py) differ from what the trainer sent them;
# nothing was applied, and `peers` names the replicas whose records are off.
LEDGER_MISMATCH = "ledger_mismatch"
UNAUTHORISED = "unauthorised"  # the caller is not a peer the run lets make this call (protocol/trust.py)


@dataclass
class Envelope:
    """The decoded form of any message: metadata and tensors."""

    meta: dict[str, Any]
    tensors: list[torch.Tensor] = field(default_factory=list)


def wire_dtype(name: str) -> torch.dtype | None:
    """The dtype a RunSpec's `wire_dtype` names; None for float32, which needs no conversion. torch.int8 stands
    for blockwise 8-bit quantization (protocol/quantize.py)."""
    return None if name == "float32" else getattr(torch, name)


def pack_meta(meta: dict[str, Any]) -> bytes:
    return msgpack.packb(meta, use_bin_type=True)


def unpack_meta(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_METADATA_BYTES:
        raise ProtocolError(f"metadata of {len(raw)} bytes exceeds {MAX_METADATA_BYTES}")
    if not raw:
        return {}
    try:
        meta = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable metadata: {type(e).__name__}") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"metadata must be a map, got {type(meta).__name__}")
    return meta


def to_chunks(envelope: Envelope, message_type: type[Message], wire: torch.dtype | None = None,
              chunk_bytes: int = CHUNK_BYTES) -> Iterator[Message]:
    """Encode an envelope as a stream: metadata in the first message, then the tensors' chunks in order.
    With `wire`, floating-point tensors travel in that dtype, or blockwise 8-bit for torch.int8 (the receiver
    computes in float32 anyway)."""
    first = True
    for tensor in envelope.tensors:
        with timed("encode"):
            messages = []
            for part in split_for_streaming(_serialize(tensor, wire), chunk_bytes):
                messages.append(message_type(tensors=[part], metadata=pack_meta(envelope.meta) if first else b""))
                first = False
        yield from messages
    if first:
        yield message_type(metadata=pack_meta(envelope.meta))


def to_message(envelope: Envelope, message_type: type[Message], wire: torch.dtype | None = None) -> Message:
    """Encode an envelope as one message (a unary call, or one call on a pipe). `wire` as in `to_chunks`."""
    with timed("encode"):
        return message_type(tensors=[_serialize(t, wire) for t in envelope.tensors], metadata=pack_meta(envelope.meta))


def _serialize(tensor: torch.Tensor, wire: torch.dtype | None) -> runtime_pb2.Tensor:
    tensor = tensor.detach()
    if wire is not None and tensor.is_floating_point() and tensor.dtype != wire:
        if wire == torch.int8:
            return quantize.serialize_int8(tensor)
        tensor = tensor.to(wire)
    return serialize_torch_tensor(tensor)


def from_message(message: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse) -> Envelope:
    meta = unpack_meta(message.metadata)
    return Envelope(meta, [_deserialize(t) for t in message.tensors])


def meta_only(message: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse) -> Envelope:
    """A message that carries metadata alone (a step or info call, a download's request), refused if it holds
    tensors before anything is decoded."""
    if message.tensors:
        raise ProtocolError(f"this message carries no tensors, got {len(message.tensors)}")
    return Envelope(unpack_meta(message.metadata))


def decode_tensors(parts: Iterable[runtime_pb2.Tensor], max_bytes: int) -> list[torch.Tensor]:
    """The whole tensors of one message, refused before decoding if their payload passes max_bytes."""
    parts = list(parts)
    total = sum(len(part.buffer) for part in parts)
    if total > max_bytes:
        raise ProtocolError(f"payload of {total} bytes exceeds the limit of {max_bytes} bytes")
    if any(part.chunks > 1 for part in parts):
        raise ProtocolError("a single message must hold whole tensors, not chunks")
    with timed("decode"):
        return [_deserialize(part) for part in parts]


async def from_chunks(stream: AsyncIterator[Message], max_bytes: int) -> Envelope:
    """Decode a stream, refusing it as soon as its payload passes max_bytes (before any compute)."""
    meta: dict[str, Any] | None = None
    tensors: list[torch.Tensor] = []
    pending: runtime_pb2.Tensor | None = None
    pending_parts: list[bytes] = []
    total = 0
    async for message in stream:
        if meta is None:
            meta = unpack_meta(message.metadata)
        for part in message.tensors:
            total += len(part.buffer)
            if total > max_bytes:
                raise ProtocolError(f"payload exceeds the limit of {max_bytes} bytes")
            if pending is None:
                if part.chunks < 1 and not part.buffer and not part.size:
                    raise ProtocolError("tensor chunk without a header")
                pending, pending_parts = part, []
            pending_parts.append(part.buffer)
            if len(pending_parts) >= max(pending.chunks, 1):
                with timed("decode"):
                    tensors.append(_combine(pending, pending_parts))
                pending = None
    if meta is None:
        raise TruncatedStream("empty message stream")  # the daemon dropped the whole stream: worth a retry
    if pending is not None:
        raise TruncatedStream(f"truncated tensor: {len(pending_parts)} of {pending.chunks} chunks")
    return Envelope(meta, tensors)


def _combine(header: runtime_pb2.Tensor, parts: Iterable[bytes]) -> torch.Tensor:
    serialized = runtime_pb2.Tensor()
    serialized.CopyFrom(header)
    serialized.buffer = b"".join(parts)
    return _deserialize(serialized)


def _deserialize(serialized: runtime_pb2.Tensor) -> torch.Tensor:
    try:
        if serialized.compression == quantize.COMPRESSION:
            return quantize.deserialize_int8(serialized)
        return deserialize_torch_tensor(serialized)
    except Exception as e:  # wrong sizes, unknown dtypes, corrupt buffers
        raise ProtocolError(f"undecodable tensor: {type(e).__name__}: {e}") from None


def error_envelope(code: str, message: str, peers: list[str] | None = None) -> Envelope:
    return Envelope({"error": {"code": code, "message": message[:500], "peers": peers or []}})


def raise_for_error(envelope: Envelope) -> Envelope:
    error = envelope.meta.get("error")
    if error is not None:
        if isinstance(error, dict):
            peers = error.get("peers")
            peers = [p for p in peers if isinstance(p, str)] if isinstance(peers, list) else []
            raise RemoteError(str(error.get("code", INTERNAL)), str(error.get("message", "")), peers)
        raise RemoteError(INTERNAL, str(error))
    return envelope


# --- Typed requests -----------------------------------------------------------------------------------------


def _field(meta: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in meta:
        raise ProtocolError(f"missing field {name!r}")
    value = meta[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"field {name!r} has the wrong type {type(value).__name__}")
    return value


def _counter(meta: dict[str, Any], name: str, limit: int | None = None) -> int:
    """A non-negative integer field (stage, step, microbatch), below `limit` if given."""
    value = _field(meta, name, int)
    if value < 0 or (limit is not None and value >= limit):
        raise ProtocolError(f"field {name!r} is out of range: {value}")
    return value


def _session(meta: dict[str, Any]) -> str:
    session = meta.get("session", "")
    if not isinstance(session, str) or len(session) > 128:
        raise ProtocolError("field 'session' must be a short string")
    return session


def _group(meta: dict[str, Any], name: str) -> list[str]:
    group = _field(meta, name, list)
    if not group or not all(isinstance(p, str) and len(p) <= 128 for p in group) or len(group) > 1024:
        raise ProtocolError(f"{name} must be a non-empty list of peer ids")
    return group


def _microbatches(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_MICROBATCHES or not all(
            isinstance(mb, int) and not isinstance(mb, bool) and 0 <= mb < MAX_MICROBATCHES for mb in value):
        raise ProtocolError(f"{name} must be a list of microbatch numbers")
    return value


def _ledger(meta: dict[str, Any], name: str, group: list[str]) -> dict[str, list[int]]:
    """Which microbatches of the step the trainer gave each replica of the group (absent: none)."""
    ledger = _field(meta, name, dict)
    if not all(peer in group for peer in ledger):
        raise ProtocolError(f"{name} names peers outside the step group")
    return {peer: _microbatches(mbs, f"{name} entries") for peer, mbs in ledger.items()}


def _proof(meta: dict[str, Any], name: str) -> str:
    proof = meta.get(name, "")
    if not isinstance(proof, str) or len(proof) > MAX_STEP_PROOF:
        raise ProtocolError(f"field {name!r} must be a short string")
    return proof


def _tensors(envelope: Envelope, count: int, what: str) -> list[torch.Tensor]:
    if len(envelope.tensors) != count:
        raise ProtocolError(f"{what} expects {count} tensor(s), got {len(envelope.tensors)}")
    return envelope.tensors


@dataclass
class ForwardRequest:
    stage: int
    step: int  # the caller's optimiser step; a peer at another step refuses as STALE
    microbatch: int
    hidden: torch.Tensor  # (B, T, C) input of the stage
    keep: bool = False  # training: keep the activations, so this microbatch's backward need not recompute them

    def envelope(self) -> Envelope:
        meta = {"stage": self.stage, "step": self.step, "microbatch": self.microbatch, "keep": self.keep}
        return Envelope(meta, [self.hidden])

    @classmethod
    def parse(cls, envelope: Envelope) -> ForwardRequest:
        meta = envelope.meta
        (hidden,) = _tensors(envelope, 1, "forward")
        return cls(_counter(meta, "stage"), _counter(meta, "step"), _counter(meta, "microbatch", MAX_MICROBATCHES),
                   hidden, _field(meta, "keep", bool) if "keep" in meta else False)


@dataclass
class ForwardReply:
    output: torch.Tensor  # (B, T, C) the stage output
    kept: bool = False  # the peer kept this forward's activations: the microbatch's backward may leave out the input

    def envelope(self) -> Envelope:
        return Envelope({"kept": self.kept}, [self.output])

    @classmethod
    def parse(cls, envelope: Envelope) -> ForwardReply:
        (output,) = _tensors(envelope, 1, "forward reply")
        return cls(output, envelope.meta.get("kept") is True)


@dataclass
class BackwardRequest:
    stage: int
    step: int
    microbatch: int
    # (B, T, C) the input the forward saw, for a peer to recompute from; None: the peer whose forward reply said
    # `kept` uses the activations it kept (and refuses with NO_ACTIVATIONS if it has dropped them since).
    hidden: torch.Tensor | None
    grad_output: torch.Tensor  # (B, T, C) gradient of the loss w.r.t. the stage output
    session: str = ""  # the trainer run; gradients a previous trainer left half-accumulated are dropped
    # The stage's last backward of the step, when one peer did all of the stage's work: that peer, alone in the
    # group, applies the step right after this backward, saving the step call's round trip. Any other peer ignores it.
    # With it, as in a StepRequest: the microbatches the peer must have summed, and the trainer's step proof.
    step_group: list[str] | None = None
    step_ledger: dict[str, list[int]] | None = None
    step_proof: str = ""

    def envelope(self) -> Envelope:
        meta = {"stage": self.stage, "step": self.step, "microbatch": self.microbatch, "session": self.session}
        if self.step_group is not None:
            meta["step_group"] = list(self.step_group)
            meta["step_ledger"] = dict(self.step_ledger or {})
            meta["step_proof"] = self.step_proof
        return Envelope(meta, [self.grad_output] if self.hidden is None else [self.hidden, self.grad_output])

    @classmethod
    def parse(cls, envelope: Envelope) -> BackwardRequest:
        meta = envelope.meta
        if len(envelope.tensors) == 1:
            hidden, (grad_output,) = None, envelope.tensors
        else:
            hidden, grad_output = _tensors(envelope, 2, "backward")
        group = _group(meta, "step_group") if "step_group" in meta else None
        ledger = _ledger(meta, "step_ledger", group) if group is not None else None
        return cls(_counter(meta, "stage"), _counter(meta, "step"), _counter(meta, "microbatch", MAX_MICROBATCHES),
                   hidden, grad_output, _session(meta), group, ledger, _proof(meta, "step_proof"))

    def step_request(self) -> StepRequest | None:
        """The step that rides on this backward, if any."""
        if self.step_group is None:
            return None
        return StepRequest(self.stage, self.step, self.step_group, self.session, self.step_ledger or {},
                           self.step_proof)


@dataclass
class StepRequest:
    """Apply the accumulated gradients of `step`, summed over every replica in `group` (sorted peer ids).

    `ledger` says which microbatches the trainer gave each replica this step; every replica checks every replica's
    record against it before applying (protocol/ledger.py). `proof` is the trainer's signature of step + 1, which
    the peer keeps as the proof of the step it is then at (protocol/trust.py)."""

    stage: int
    step: int
    group: list[str]
    session: str = ""
    ledger: dict[str, list[int]] = field(default_factory=dict)
    proof: str = ""

    def envelope(self) -> Envelope:
        return Envelope({"stage": self.stage, "step": self.step, "group": list(self.group), "session": self.session,
                         "ledger": dict(self.ledger), "proof": self.proof})

    @classmethod
    def parse(cls, envelope: Envelope) -> StepRequest:
        meta = envelope.meta
        group = _group(meta, "group")
        return cls(_counter(meta, "stage"), _counter(meta, "step"), group, _session(meta),
                   _ledger(meta, "ledger", group), _proof(meta, "proof"))


@dataclass
class StepReply:
    step: int  # the step the peer is at now
    grad_norm: float  # norm of the summed gradient before clipping
    # What the applied update summed, over the whole group: each (session, microbatch) once is the goal.
    count: int = 0
    digest: str = ""
    microbatches: list[int] = field(default_factory=list)  # sorted; a microbatch summed twice is listed twice

    def envelope(self) -> Envelope:
        return Envelope({"step": self.step, "grad_norm": self.grad_norm, "count": self.count, "digest": self.digest,
                         "microbatches": list(self.microbatches)})

    @classmethod
    def parse(cls, envelope: Envelope) -> StepReply:
        meta = envelope.meta
        count = _field(meta, "count", int) if "count" in meta else 0
        digest = meta.get("digest", "")
        if not isinstance(digest, str) or len(digest) > 64:
            raise ProtocolError("field 'digest' must be a short string")
        microbatches = meta.get("microbatches", [])
        if not isinstance(microbatches, list) or len(microbatches) > 2 * MAX_MICROBATCHES or not all(
                isinstance(mb, int) and not isinstance(mb, bool) for mb in microbatches):
            raise ProtocolError("field 'microbatches' must be a list of microbatch numbers")
        return cls(_field(meta, "step", int), float(_field(meta, "grad_norm", (int, float))), count, digest,
                   microbatches)


@dataclass
class BackwardReply:
    grad_input: torch.Tensor  # (B, T, C) gradient of the loss w.r.t. the stage input
    # With a request's step_group: the step this peer applied right after the backward, or why it did not (the
    # caller then sends the step call as usual).
    stepped: StepReply | None = None
    step_refused: str | None = None

    def envelope(self) -> Envelope:
        meta: dict[str, Any] = {}
        if self.stepped is not None:
            meta["stepped"] = self.stepped.envelope().meta
        if self.step_refused is not None:
            meta["step_refused"] = self.step_refused[:500]
        return Envelope(meta, [self.grad_input])

    @classmethod
    def parse(cls, envelope: Envelope) -> BackwardReply:
        (grad_input,) = _tensors(envelope, 1, "backward reply")
        stepped = envelope.meta.get("stepped")
        try:
            stepped = StepReply.parse(Envelope(stepped)) if isinstance(stepped, dict) else None
        except ProtocolError:  # a malformed account of the step: the caller sends the step call, which is idempotent
            stepped = None
        refused = envelope.meta.get("step_refused")
        return cls(grad_input, stepped, refused if isinstance(refused, str) else None)


@dataclass
class StageRequest:
    """Requests that name only a stage and a step: info, state download, gradient fetch."""

    stage: int
    step: int = 0
    weights_only: bool = False  # a state download without the optimiser state (for rebuilding another stage)
    session: str = ""  # gradient fetches: the trainer run whose gradients are wanted

    def envelope(self) -> Envelope:
        return Envelope({"stage": self.stage, "step": self.step, "weights_only": self.weights_only,
                         "session": self.session})

    @classmethod
    def parse(cls, envelope: Envelope) -> StageRequest:
        weights_only = envelope.meta.get("weights_only", False)
        if not isinstance(weights_only, bool):
            raise ProtocolError("field 'weights_only' must be a boolean")
        return cls(_counter(envelope.meta, "stage"), _counter(envelope.meta, "step"), weights_only,
                   _session(envelope.meta))


@dataclass
class StateSnapshot:
    """A stage's full training state: weights, optimiser state and step, as sent to a joining replica."""

    stage: int
    step: int
    grad_norm: float | None
    names: list[str]  # one per tensor: "model.<param>" or "optim.<index>.<key>"
    tensors: list[torch.Tensor]
    param_groups: list[dict[str, Any]]
    step_proof: str = ""  # the trainer's proof of `step`, handed on with the state (protocol/trust.py)

    def envelope(self) -> Envelope:
        meta = {"stage": self.stage, "step": self.step, "grad_norm": self.grad_norm, "names": self.names,
                "param_groups": self.param_groups, "step_proof": self.step_proof}
        return Envelope(meta, self.tensors)

    @classmethod
    def parse(cls, envelope: Envelope) -> StateSnapshot:
        meta = envelope.meta
        names = _field(meta, "names", list)
        if len(names) != len(envelope.tensors) or not all(isinstance(n, str) for n in names):
            raise ProtocolError(f"state has {len(names)} names for {len(envelope.tensors)} tensors")
        grad_norm = meta.get("grad_norm")
        if grad_norm is not None and (not isinstance(grad_norm, (int, float)) or isinstance(grad_norm, bool)):
            raise ProtocolError("grad_norm must be a number or None")
        return cls(_field(meta, "stage", int), _field(meta, "step", int), grad_norm, names, envelope.tensors,
                   _field(meta, "param_groups", list), _proof(meta, "step_proof"))

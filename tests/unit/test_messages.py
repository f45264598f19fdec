import asyncio

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2

from cfnode.protocol.messages import (
    BAD_REQUEST,
    CHUNK_BYTES,
    GROUP_FAILED,
    INTERNAL,
    MAX_METADATA_BYTES,
    BackwardReply,
    BackwardRequest,
    Envelope,
    ForwardReply,
    ForwardRequest,
    ProtocolError,
    RemoteError,
    StageRequest,
    StateSnapshot,
    StepReply,
    StepRequest,
    error_envelope,
    from_chunks,
    from_message,
    meta_only,
    pack_meta,
    raise_for_error,
    to_chunks,
    to_message,
    unpack_meta,
    wire_dtype,
)

BIG = 10**9


async def _stream(chunks):
    for chunk in chunks:
        yield chunk


def decode(chunks, max_bytes: int = BIG) -> Envelope:
    return asyncio.run(from_chunks(_stream(list(chunks)), max_bytes))


def chunks_of(envelope: Envelope, message_type=runtime_pb2.ExpertRequest, wire: torch.dtype | None = None) -> list:
    return list(to_chunks(envelope, message_type, wire))


def assert_same_tensors(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def sample_tensors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(2, 3, generator=gen),
        torch.randn(4, 100, 128, generator=gen),  # 200 KiB: several chunks
        torch.zeros(5, 7),
        torch.zeros(0),  # no elements at all
        torch.zeros(0, 3),
        torch.tensor(3.5),  # 0-d
        torch.arange(10, dtype=torch.int64),
        torch.randn(3, 3, generator=gen).to(torch.bfloat16),
        torch.randn(300, 300, generator=gen).half(),  # 175 KiB of float16
    ]


META = {"stage": 2, "step": 11, "name": "x", "nested": {"a": [1, 2.5, None]}, "blob": b"\x00\x01"}


@pytest.mark.parametrize("message_type", [runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse])
def test_chunk_round_trip(message_type):
    tensors = sample_tensors()
    chunks = chunks_of(Envelope(META, tensors), message_type)
    assert all(isinstance(c, message_type) for c in chunks)
    assert len(chunks) > len(tensors)  # large tensors were split
    assert all(len(part.buffer) <= CHUNK_BYTES for c in chunks for part in c.tensors)
    # the metadata travels once, in the first chunk
    assert chunks[0].metadata and not any(c.metadata for c in chunks[1:])
    envelope = decode(chunks)
    assert envelope.meta == META
    assert_same_tensors(envelope.tensors, tensors)


def test_chunk_round_trip_single_large_tensor():
    tensor = torch.randn(3 * CHUNK_BYTES // 4 + 5)  # just over 3 chunks of float32
    chunks = chunks_of(Envelope({}, [tensor]))
    assert len(chunks) == 4
    envelope = decode(chunks)
    assert envelope.meta == {}
    assert_same_tensors(envelope.tensors, [tensor])


def test_chunk_round_trip_without_tensors():
    chunks = chunks_of(Envelope({"only": "meta"}))
    assert len(chunks) == 1
    envelope = decode(chunks)
    assert envelope.meta == {"only": "meta"} and envelope.tensors == []


def test_chunk_round_trip_detaches():
    tensor = torch.randn(4, 4, requires_grad=True)
    envelope = decode(chunks_of(Envelope({}, [tensor * 2])))
    assert torch.equal(envelope.tensors[0], (tensor * 2).detach())


def test_bfloat16_wire_round_trip():
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(2, 50, 400, generator=gen), torch.zeros(3, 3), torch.randn(0, 4), torch.arange(3)]
    full = chunks_of(Envelope(META, tensors))
    half = chunks_of(Envelope(META, tensors), wire=wire_dtype("bfloat16"))
    size = sum(len(p.buffer) for c in half for p in c.tensors)
    assert size < 0.6 * sum(len(p.buffer) for c in full for p in c.tensors)
    envelope = decode(half)
    assert envelope.meta == META
    assert len(envelope.tensors) == len(tensors)
    for got, sent in zip(envelope.tensors[:3], tensors):
        assert got.dtype == torch.bfloat16 and got.shape == sent.shape  # the receiver casts (validate_hidden)
        assert torch.equal(got.float(), sent.bfloat16().float())
    assert torch.equal(envelope.tensors[3], tensors[3])  # integers travel as they are
    assert wire_dtype("float32") is None


def test_from_chunks_refuses_over_max_bytes():
    tensors = [torch.randn(4, 100, 128)]
    chunks = chunks_of(Envelope({}, tensors))
    total = sum(len(p.buffer) for c in chunks for p in c.tensors)
    assert_same_tensors(decode(chunks, max_bytes=total).tensors, tensors)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(chunks, max_bytes=total - 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(chunks, max_bytes=10)


def test_from_chunks_stops_reading_once_over_the_limit():
    chunks = chunks_of(Envelope({}, [torch.randn(4, 100, 128)]))
    consumed = []

    async def stream():
        for chunk in chunks:
            consumed.append(chunk)
            yield chunk

    with pytest.raises(ProtocolError):
        asyncio.run(from_chunks(stream(), CHUNK_BYTES + 1))
    assert len(consumed) < len(chunks)


def test_from_chunks_refuses_truncated_stream():
    chunks = chunks_of(Envelope({"a": 1}, [torch.randn(3), torch.randn(4, 100, 128)]))
    with pytest.raises(ProtocolError, match="truncated"):
        decode(chunks[:-1])
    with pytest.raises(ProtocolError, match="truncated"):
        decode(chunks[:2])


def test_from_chunks_refuses_empty_stream():
    with pytest.raises(ProtocolError, match="empty"):
        decode([])


@pytest.mark.parametrize("garbage", [b"\xc1", b"\x92\x01", b"\x81\xa1a", b"\x80\x80"])
def test_from_chunks_refuses_undecodable_metadata(garbage):
    chunks = chunks_of(Envelope({}, [torch.randn(3)]))
    chunks[0].metadata = garbage
    with pytest.raises(ProtocolError, match="undecodable"):
        decode(chunks)


@pytest.mark.parametrize("meta", [[1, 2], 5, "text", None])
def test_from_chunks_refuses_non_map_metadata(meta):
    message = runtime_pb2.ExpertRequest(metadata=msgpack.packb(meta, use_bin_type=True))
    with pytest.raises(ProtocolError, match="map"):
        decode([message])


def test_unpack_meta():
    assert unpack_meta(b"") == {}
    assert unpack_meta(pack_meta({"a": [1, 2]})) == {"a": [1, 2]}
    with pytest.raises(ProtocolError, match="undecodable"):
        unpack_meta(msgpack.packb({1: 2}))  # non-string map keys
    with pytest.raises(ProtocolError, match="exceeds"):
        unpack_meta(b"\x00" * (MAX_METADATA_BYTES + 1))


def test_from_chunks_refuses_headerless_chunk():
    message = runtime_pb2.ExpertRequest(metadata=pack_meta({}), tensors=[runtime_pb2.Tensor()])
    with pytest.raises(ProtocolError, match="header"):
        decode([message])


def test_from_chunks_refuses_corrupt_tensor():
    chunks = chunks_of(Envelope({}, [torch.randn(10)]))
    chunks[0].tensors[0].buffer = chunks[0].tensors[0].buffer[:-4]
    with pytest.raises(ProtocolError, match="undecodable tensor"):
        decode(chunks)


@pytest.mark.parametrize("message_type", [runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse])
def test_message_round_trip(message_type):
    tensors = [t for t in sample_tensors() if t.numel() < 1000]
    message = to_message(Envelope(META, tensors), message_type)
    assert isinstance(message, message_type)
    envelope = from_message(message_type.FromString(message.SerializeToString()))
    assert envelope.meta == META
    assert_same_tensors(envelope.tensors, tensors)


def test_message_round_trip_empty():
    envelope = from_message(to_message(Envelope({}), runtime_pb2.ExpertResponse))
    assert envelope.meta == {} and envelope.tensors == []


def test_from_message_refuses_garbage_metadata():
    with pytest.raises(ProtocolError):
        from_message(runtime_pb2.ExpertResponse(metadata=b"\xc1"))


def test_meta_only_refuses_tensors_before_decoding_them():
    undecodable = runtime_pb2.Tensor(buffer=b"\x00" * 7, size=[10**6], dtype="float32")
    with pytest.raises(ProtocolError, match="carries no tensors, got 1"):
        meta_only(runtime_pb2.ExpertRequest(metadata=pack_meta({"stage": 1}), tensors=[undecodable]))
    assert meta_only(runtime_pb2.ExpertResponse(metadata=pack_meta({"step": 3}))) == Envelope({"step": 3})
    with pytest.raises(ProtocolError):
        meta_only(runtime_pb2.ExpertRequest(metadata=b"\xc1"))


def test_raise_for_error():
    ok = Envelope({"step": 1})
    assert raise_for_error(ok) is ok

    with pytest.raises(RemoteError) as info:
        raise_for_error(error_envelope(GROUP_FAILED, "replica gone", ["QmA", "QmB"]))
    assert info.value.code == GROUP_FAILED
    assert info.value.message == "replica gone"
    assert info.value.peers == ["QmA", "QmB"]
    assert GROUP_FAILED in str(info.value) and "replica gone" in str(info.value)

    with pytest.raises(RemoteError) as info:
        raise_for_error(error_envelope(BAD_REQUEST, "x" * 2000))
    assert info.value.code == BAD_REQUEST and len(info.value.message) == 500 and info.value.peers == []


def test_raise_for_error_after_the_wire():
    sent = error_envelope(GROUP_FAILED, "nope", ["QmA"])
    received = from_message(to_message(sent, runtime_pb2.ExpertResponse))
    with pytest.raises(RemoteError) as info:
        raise_for_error(received)
    assert (info.value.code, info.value.message, info.value.peers) == (GROUP_FAILED, "nope", ["QmA"])


def test_raise_for_error_malformed():
    with pytest.raises(RemoteError) as info:
        raise_for_error(Envelope({"error": "plain text"}))
    assert info.value.code == INTERNAL and info.value.message == "plain text"

    with pytest.raises(RemoteError) as info:
        raise_for_error(Envelope({"error": {"peers": ["a", 5, None, "b"]}}))
    assert info.value.code == INTERNAL and info.value.peers == ["a", "b"]

    with pytest.raises(RemoteError) as info:
        raise_for_error(Envelope({"error": {"code": "stale", "peers": "notalist"}}))
    assert info.value.code == "stale" and info.value.peers == []


# --- Typed requests ---------------------------------------------------------------------------------------------


def over_the_wire(envelope: Envelope) -> Envelope:
    return decode(chunks_of(envelope))


def test_forward_request_round_trip():
    hidden = torch.randn(2, 5, 8)
    for keep in (False, True):
        request = ForwardRequest(stage=3, step=9, microbatch=1, hidden=hidden, keep=keep)
        for envelope in (request.envelope(), over_the_wire(request.envelope())):
            parsed = ForwardRequest.parse(envelope)
            assert (parsed.stage, parsed.step, parsed.microbatch, parsed.keep) == (3, 9, 1, keep)
            assert torch.equal(parsed.hidden, hidden)
    envelope = ForwardRequest(1, 0, 0, hidden).envelope()
    del envelope.meta["keep"]  # an older caller: no keep field means recompute
    assert ForwardRequest.parse(envelope).keep is False
    envelope.meta["keep"] = 1
    with pytest.raises(ProtocolError, match="keep"):
        ForwardRequest.parse(envelope)


def test_forward_reply_round_trip():
    output = torch.randn(2, 5, 8)
    for kept in (False, True):
        reply = ForwardReply(output, kept)
        for envelope in (reply.envelope(), over_the_wire(reply.envelope())):
            parsed = ForwardReply.parse(envelope)
            assert parsed.kept is kept and torch.equal(parsed.output, output)
    assert ForwardReply.parse(Envelope({"kept": 1}, [output])).kept is False  # only a true bool says kept
    with pytest.raises(ProtocolError, match="1 tensor"):
        ForwardReply.parse(Envelope({}, [output, output]))


def test_backward_request_round_trip():
    hidden, grad = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    request = BackwardRequest(stage=1, step=0, microbatch=3, hidden=hidden, grad_output=grad)
    for envelope in (request.envelope(), over_the_wire(request.envelope())):
        parsed = BackwardRequest.parse(envelope)
        assert (parsed.stage, parsed.step, parsed.microbatch) == (1, 0, 3)
        assert torch.equal(parsed.hidden, hidden) and torch.equal(parsed.grad_output, grad)
    # Without its input: the peer that ran the forward uses the activations it kept.
    request = BackwardRequest(stage=1, step=0, microbatch=3, hidden=None, grad_output=grad, session="s")
    for envelope in (request.envelope(), over_the_wire(request.envelope())):
        parsed = BackwardRequest.parse(envelope)
        assert parsed.hidden is None and torch.equal(parsed.grad_output, grad) and parsed.session == "s"
    with pytest.raises(ProtocolError, match="2 tensor"):
        BackwardRequest.parse(Envelope(request.envelope().meta, [grad, grad, grad]))
    # The stage's last backward of the step carries its step group.
    request = BackwardRequest(stage=1, step=0, microbatch=3, hidden=None, grad_output=grad, step_group=["QmA"])
    for envelope in (request.envelope(), over_the_wire(request.envelope())):
        assert BackwardRequest.parse(envelope).step_group == ["QmA"]
    assert "step_group" not in BackwardRequest(1, 0, 3, None, grad).envelope().meta


def test_backward_reply_round_trip():
    grad = torch.randn(2, 5, 8)
    for reply in (BackwardReply(grad), BackwardReply(grad, StepReply(4, 0.5)), BackwardReply(grad, None, "stale: x")):
        for envelope in (reply.envelope(), over_the_wire(reply.envelope())):
            parsed = BackwardReply.parse(envelope)
            assert (parsed.stepped, parsed.step_refused) == (reply.stepped, reply.step_refused)
            assert torch.equal(parsed.grad_input, grad)
    # A malformed account of the step is no step: the caller then sends the step call, which is idempotent.
    for stepped in ({"step": "4", "grad_norm": 0.5}, {"grad_norm": 0.5}, [4, 0.5], 4):
        parsed = BackwardReply.parse(Envelope({"stepped": stepped, "step_refused": 7}, [grad]))
        assert (parsed.stepped, parsed.step_refused) == (None, None)
    with pytest.raises(ProtocolError, match="1 tensor"):
        BackwardReply.parse(Envelope({}, [grad, grad]))


def test_step_request_round_trip():
    request = StepRequest(stage=2, step=4, group=["QmA", "QmB"], ledger={"QmA": [0, 2], "QmB": [1]}, proof="c2ln")
    for envelope in (request.envelope(), over_the_wire(request.envelope())):
        assert StepRequest.parse(envelope) == request


def test_a_step_ledger_must_name_group_members_and_microbatch_numbers():
    good = StepRequest(stage=2, step=4, group=["QmA"], ledger={"QmA": [0]}).envelope().meta
    for ledger in ({"QmZ": [0]}, {"QmA": [-1]}, {"QmA": ["0"]}, {"QmA": [True]}, {"QmA": 3}, [0], None):
        with pytest.raises(ProtocolError):
            StepRequest.parse(Envelope({**good, "ledger": ledger}))
    with pytest.raises(ProtocolError, match="ledger"):
        StepRequest.parse(Envelope({k: v for k, v in good.items() if k != "ledger"}))
    with pytest.raises(ProtocolError, match="proof"):
        StepRequest.parse(Envelope({**good, "proof": "x" * 5000}))


def test_a_riding_step_carries_its_ledger_and_proof():
    grad = torch.zeros(1, 2, 4)
    request = BackwardRequest(1, 3, 2, None, grad, "s", step_group=["QmA"], step_ledger={"QmA": [0, 1, 2]},
                              step_proof="c2ln")
    parsed = BackwardRequest.parse(over_the_wire(request.envelope()))
    assert parsed.step_request() == StepRequest(1, 3, ["QmA"], "s", {"QmA": [0, 1, 2]}, "c2ln")
    assert BackwardRequest.parse(BackwardRequest(1, 3, 2, None, grad).envelope()).step_request() is None


def test_step_reply_round_trip():
    reply = StepReply(step=5, grad_norm=1.25, count=3, digest="00ff", microbatches=[0, 1, 1])
    for envelope in (reply.envelope(), over_the_wire(reply.envelope())):
        assert StepReply.parse(envelope) == reply
    for bad in ({"digest": 7}, {"digest": "x" * 100}, {"microbatches": "0,1"}, {"microbatches": [0.5]}):
        with pytest.raises(ProtocolError):
            StepReply.parse(Envelope({"step": 5, "grad_norm": 2, **bad}))
    parsed = StepReply.parse(Envelope({"step": 5, "grad_norm": 2}))
    assert parsed.grad_norm == 2.0 and type(parsed.grad_norm) is float


def test_stage_request_round_trip():
    for request in (StageRequest(stage=4), StageRequest(stage=1, step=12)):
        for envelope in (request.envelope(), over_the_wire(request.envelope())):
            assert StageRequest.parse(envelope) == request


def make_snapshot(grad_norm=0.5) -> StateSnapshot:
    return StateSnapshot(stage=2, step=6, grad_norm=grad_norm, names=["model.w", "optim.0.exp_avg"],
                         tensors=[torch.randn(3, 4), torch.randn(3, 4)],
                         param_groups=[{"lr": 0.1, "betas": [0.9, 0.95], "params": [0]}])


@pytest.mark.parametrize("grad_norm", [0.5, None, 3])
def test_state_snapshot_round_trip(grad_norm):
    snap = make_snapshot(grad_norm)
    for envelope in (snap.envelope(), over_the_wire(snap.envelope())):
        parsed = StateSnapshot.parse(envelope)
        assert (parsed.stage, parsed.step, parsed.grad_norm) == (2, 6, grad_norm)
        assert parsed.names == snap.names and parsed.param_groups == snap.param_groups
        assert_same_tensors(parsed.tensors, snap.tensors)


FORWARD_META = {"stage": 1, "step": 0, "microbatch": 0}
T = torch.zeros(1, 1, 4)


@pytest.mark.parametrize(
    ("cls", "envelope", "pattern"),
    [
        # wrong tensor counts
        (ForwardRequest, Envelope(FORWARD_META, []), "tensor"),
        (ForwardRequest, Envelope(FORWARD_META, [T, T]), "tensor"),
        (BackwardRequest, Envelope(FORWARD_META, []), "tensor"),
        (BackwardRequest, Envelope(FORWARD_META, [T, T, T]), "tensor"),
        (StateSnapshot, Envelope({"stage": 1, "step": 0, "names": ["a"], "param_groups": []}, []), "names"),
        (StateSnapshot, Envelope({"stage": 1, "step": 0, "names": [], "param_groups": []}, [T]), "names"),
        # missing fields
        (ForwardRequest, Envelope({"stage": 1, "step": 0}, [T]), "microbatch"),
        (ForwardRequest, Envelope({"step": 0, "microbatch": 0}, [T]), "stage"),
        (BackwardRequest, Envelope({"stage": 1, "microbatch": 0}, [T, T]), "step"),
        (StepRequest, Envelope({"stage": 1, "step": 0}), "group"),
        (StepRequest, Envelope({"step": 0, "group": ["a"]}), "stage"),
        (StepReply, Envelope({"step": 0}), "grad_norm"),
        (StepReply, Envelope({"grad_norm": 1.0}), "step"),
        (StageRequest, Envelope({"step": 0}), "stage"),
        (StageRequest, Envelope({"stage": 1}), "step"),
        (StateSnapshot, Envelope({"stage": 1, "step": 0, "names": []}), "param_groups"),
        (StateSnapshot, Envelope({"stage": 1, "step": 0, "param_groups": []}), "names"),
        (StateSnapshot, Envelope({"step": 0, "names": [], "param_groups": []}), "stage"),
        # wrong field types
        (ForwardRequest, Envelope({**FORWARD_META, "stage": "1"}, [T]), "stage"),
        (ForwardRequest, Envelope({**FORWARD_META, "step": 1.0}, [T]), "step"),
        (ForwardRequest, Envelope({**FORWARD_META, "microbatch": True}, [T]), "microbatch"),
        (BackwardRequest, Envelope({**FORWARD_META, "stage": None}, [T, T]), "stage"),
        (StepRequest, Envelope({"stage": 1, "step": 0, "group": "QmA"}), "group"),
        (StepRequest, Envelope({"stage": 1, "step": 0, "group": []}), "group"),
        (StepRequest, Envelope({"stage": 1, "step": 0, "group": ["QmA", 5]}), "group"),
        (StepRequest, Envelope({"stage": 1, "step": 0, "group": ["p"] * 1025}), "group"),
        (StepRequest, Envelope({"stage": 1, "step": False, "group": ["a"]}), "step"),
        (StepRequest, Envelope({"stage": 1, "step": 0, "group": ["p" * 129]}), "group"),
        (BackwardRequest, Envelope({**FORWARD_META, "step_group": []}, [T, T]), "step_group"),
        (BackwardRequest, Envelope({**FORWARD_META, "step_group": "QmA"}, [T, T]), "step_group"),
        (BackwardRequest, Envelope({**FORWARD_META, "step_group": [None]}, [T, T]), "step_group"),
        (StepReply, Envelope({"step": 0, "grad_norm": "1.0"}), "grad_norm"),
        (StepReply, Envelope({"step": 0, "grad_norm": True}), "grad_norm"),
        (StepReply, Envelope({"step": 0.5, "grad_norm": 1.0}), "step"),
        (StageRequest, Envelope({"stage": [1], "step": 0}), "stage"),
        (StateSnapshot, Envelope({"stage": 1, "step": 0, "names": "a", "param_groups": []}, [T]), "names"),
        (StateSnapshot, Envelope({"stage": 1, "step": 0, "names": [5], "param_groups": []}, [T]), "names"),
        (StateSnapshot, Envelope({"stage": 1, "step": 0, "names": [], "param_groups": {}}), "param_groups"),
        (StateSnapshot, Envelope({"stage": 1, "step": 0, "names": [], "param_groups": [], "grad_norm": "x"}),
         "grad_norm"),
    ],
)
def test_parse_refuses(cls, envelope, pattern):
    with pytest.raises(ProtocolError, match=pattern):
        cls.parse(envelope)

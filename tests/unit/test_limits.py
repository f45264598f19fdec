from types import SimpleNamespace

import pytest
import torch
from hivemind.proto import runtime_pb2

from cfnode.config import RunSpec
from cfnode.model import build_body_stage, build_head
from cfnode.node.stage_state import flat_grads, make_optimizer, snapshot
from cfnode.protocol.limits import (
    MAX_PART_BYTES,
    ReplyLimits,
    activation_bytes,
    activations_reply_bytes,
    grads_bytes,
    head_state_bytes,
    max_copy_bytes,
    message_bytes,
    part_message_bytes,
    stage_state_bytes,
)
from cfnode.protocol.messages import MAX_METADATA_BYTES, STATE_CHUNK_BYTES, Envelope, to_chunks, to_message
from cfnode.protocol.service import StageService, TrainerService

SPEC = RunSpec(num_stages=2, layers_per_stage=2, hidden_size=32, num_heads=2, seq_len=16, vocab_size=300)


def payload(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def stepped(model: torch.nn.Module, spec: RunSpec = SPEC) -> torch.optim.Optimizer:
    """An optimiser that has stepped once, so its state holds both moments and the step of every parameter."""
    optimizer = make_optimizer(model, spec)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer


def test_stage_state_bound_covers_a_real_snapshot_tightly():
    model = build_body_stage(SPEC, 1)
    state = snapshot(1, 1, 0.5, model, stepped(model))
    params = len(list(model.parameters()))
    actual = payload(state.tensors)
    # Exact but for the scalar steps, counted at 8 bytes each (float64 under a float64 default dtype).
    assert actual <= stage_state_bytes(SPEC) <= actual + 4 * params


def test_weights_only_and_grads_bounds_are_exact():
    model = build_body_stage(SPEC, 2)
    assert payload(snapshot(2, 0, None, model, stepped(model), weights_only=True).tensors) == \
        stage_state_bytes(SPEC, weights_only=True)
    assert payload(flat_grads(model)) == grads_bytes(SPEC)


def test_head_bound_covers_the_trainers_copy():
    head = build_head(SPEC)
    actual = payload(snapshot(0, 1, None, head, stepped(head)).tensors)
    assert actual <= head_state_bytes(SPEC) <= actual + 4 * len(list(head.parameters()))


def test_max_copy_is_the_larger_of_head_and_stage():
    assert max_copy_bytes(SPEC) == max(head_state_bytes(SPEC), stage_state_bytes(SPEC))
    big_vocab = SPEC.replace(vocab_size=50_000)  # now the head outweighs a stage
    assert max_copy_bytes(big_vocab) == head_state_bytes(big_vocab) > stage_state_bytes(big_vocab)


def test_bounds_follow_the_spec_without_building_weights():
    # A 7B-sized stage costs nothing to size: the shapes come from the meta device.
    big = RunSpec(num_stages=4, layers_per_stage=8, hidden_size=4096, num_heads=32, vocab_size=32000)
    assert stage_state_bytes(big) > 3 * grads_bytes(big) > 3 * 4 * 8 * 12 * 4096**2
    assert stage_state_bytes(big, weights_only=True) == grads_bytes(big)
    assert stage_state_bytes(SPEC.replace(layers_per_stage=4)) > stage_state_bytes(SPEC)


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_activations_reply_holds_refit_cache_pairs_of_the_largest_accepted_activation(wire):
    spec = SPEC.replace(max_message_mb=0.25, wire_dtype=wire, refit_cache=3)
    itemsize = getattr(torch, wire).itemsize
    # The largest microbatch a stage accepts: its wire payload is exactly max_message_bytes.
    batch = spec.max_message_bytes // (spec.seq_len * spec.hidden_size * itemsize)
    assert batch * spec.seq_len * spec.hidden_size * itemsize == activation_bytes(spec) == spec.max_message_bytes
    cached = torch.zeros(batch, spec.seq_len, spec.hidden_size)  # the trainer caches and sends float32
    assert payload([cached] * 2 * spec.refit_cache) == activations_reply_bytes(spec)
    assert activations_reply_bytes(spec.replace(refit_cache=0)) == 0


def test_reply_limits_pick_the_bound_of_each_call():
    limits = ReplyLimits.of(SPEC)
    assert limits.state(weights_only=False) == stage_state_bytes(SPEC)
    assert limits.state(weights_only=True) == stage_state_bytes(SPEC, weights_only=True)
    assert limits.copy(0) == head_state_bytes(SPEC)
    assert limits.copy(2) == stage_state_bytes(SPEC)
    assert limits.grads == grads_bytes(SPEC)
    assert limits.activations == activations_reply_bytes(SPEC)


def test_message_bounds_hold_the_largest_valid_messages():
    spec = SPEC.replace(max_message_mb=0.5)
    hidden = torch.zeros(spec.max_message_bytes // 4)
    # A pipe call: its whole payload in one message, with metadata at the limit.
    meta = {"pad": b"x" * (MAX_METADATA_BYTES - 16)}
    whole = to_message(Envelope(meta, [hidden]), runtime_pb2.ExpertRequest)
    assert whole.ByteSize() <= message_bytes(spec.max_message_bytes)
    assert to_message(Envelope(meta), runtime_pb2.ExpertRequest).ByteSize() <= message_bytes(0)
    # A chunked state: every part fits the part bound, which does not grow with the state.
    model = build_body_stage(SPEC, 1)
    state = snapshot(1, 1, 0.5, model, stepped(model))
    chunks = list(to_chunks(state.envelope(), runtime_pb2.ExpertRequest, chunk_bytes=STATE_CHUNK_BYTES))
    assert max(c.ByteSize() for c in chunks) <= part_message_bytes(stage_state_bytes(SPEC))
    assert part_message_bytes(2**40) == message_bytes(MAX_PART_BYTES) < 3 * 2**20
    assert part_message_bytes(100) == message_bytes(100)


def test_each_streamed_rpc_reads_its_requests_within_its_bound():
    backend = SimpleNamespace(spec=SPEC, max_request_bytes=activation_bytes(SPEC), max_copy_bytes=max_copy_bytes(SPEC))
    service = StageService(backend)
    expected = {
        "rpc_pipe": message_bytes(SPEC.max_message_bytes),  # whole calls
        "rpc_forward": part_message_bytes(SPEC.max_message_bytes),
        "rpc_backward": part_message_bytes(SPEC.max_message_bytes),
        "rpc_put_copy": part_message_bytes(max_copy_bytes(SPEC)),
        "rpc_download_state": message_bytes(0),  # one request of metadata alone
        "rpc_fetch_grads": message_bytes(0),
        "rpc_get_copy": message_bytes(0),
    }
    StageService._collect_rpc_handlers()
    streamed = {rpc.method_name for rpc in StageService._rpc_handlers if rpc.stream_input or rpc.stream_output}
    assert streamed == set(expected)
    assert {name: service.stream_limit(name) for name in streamed} == expected
    assert TrainerService(SimpleNamespace()).stream_limit("rpc_activations") == message_bytes(0)

import asyncio
import math

import pytest
import torch
from hivemind.proto import runtime_pb2

from cfnode.config import RunSpec
from cfnode.protocol import quantize
from cfnode.protocol.limits import activations_reply_bytes, wire_bytes_per_value
from cfnode.protocol.messages import (
    Envelope,
    ProtocolError,
    from_chunks,
    from_message,
    to_chunks,
    to_message,
    wire_dtype,
)
from cfnode.protocol.validation import validate_hidden

INT8 = wire_dtype("int8")


async def _stream(chunks):
    for chunk in chunks:
        yield chunk


def decode(chunks, max_bytes: int = 10**9) -> Envelope:
    return asyncio.run(from_chunks(_stream(list(chunks)), max_bytes))


@pytest.mark.parametrize("shape", [(2, 50, 400), (1, 1, 64), (3, 7), (1,), (), (0, 4)])
def test_each_value_is_within_half_a_step_of_its_block(shape):
    n = math.prod(shape)  # values from 1e-3 to 1e3, so blocks have very different scales
    x = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, n)).reshape(shape)
    codes, scales = quantize.quantize_blockwise(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert codes.numel() == scales.numel() * quantize.BLOCK >= x.numel()
    got = quantize.dequantize_blockwise(codes, scales, tuple(shape))
    assert got.shape == x.shape and got.dtype == torch.float32
    if x.numel():
        padded = torch.nn.functional.pad(x.reshape(-1), (0, -x.numel() % quantize.BLOCK)).view(-1, quantize.BLOCK)
        step = (padded.abs().amax(dim=1) / 127).repeat_interleave(quantize.BLOCK)[:x.numel()]
        assert torch.all((got.reshape(-1) - x.reshape(-1)).abs() <= step / 2 * (1 + 1e-6))
        # Each block's largest value is exact up to float rounding: it is code +-127.
        assert torch.allclose(got.reshape(-1).abs().max(), x.abs().max(), rtol=1e-6)


def test_an_outlier_coarsens_only_its_own_block():
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    x[0, 3] = 1e4
    got = quantize.dequantize_blockwise(*quantize.quantize_blockwise(x), tuple(x.shape))
    rest = (got - x)[:, 64:].abs().max()
    assert rest < 0.05 and (got - x)[0, :64].abs().max() > 1  # the others keep their own scale


def test_tiny_gradients_keep_their_precision():
    """float32 scales: a gradient block of 1e-12 is not flushed to zero (a float16 scale would be)."""
    x = torch.randn(128, generator=torch.Generator().manual_seed(2)) * 1e-12
    got = quantize.dequantize_blockwise(*quantize.quantize_blockwise(x), (128,))
    assert torch.count_nonzero(got) > 120
    assert (got - x).abs().max() / x.abs().max() < 0.01


def test_zeros_travel_exactly():
    x = torch.zeros(3, 100)
    x[1, 5] = 2.0
    got = quantize.dequantize_blockwise(*quantize.quantize_blockwise(x), (3, 100))
    assert torch.equal(got, x)


def test_wire_size_is_one_byte_and_a_sixteenth_per_value():
    x = torch.randn(2, 64, 512)
    message = to_message(Envelope({}, [x]), runtime_pb2.ExpertRequest, INT8)
    assert len(message.tensors[0].buffer) == x.numel() * quantize.BYTES_PER_VALUE == x.numel() * 17 // 16
    assert wire_bytes_per_value("int8") == 1.0625 and wire_bytes_per_value("bfloat16") == 2


def test_int8_wire_round_trip_in_chunks_and_in_one_message():
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(2, 50, 400, generator=gen), torch.zeros(3, 3), torch.randn(0, 4), torch.arange(3)]
    for envelope in (decode(to_chunks(Envelope({"a": 1}, tensors), runtime_pb2.ExpertRequest, INT8)),
                     from_message(to_message(Envelope({"a": 1}, tensors), runtime_pb2.ExpertRequest, INT8))):
        assert envelope.meta == {"a": 1} and len(envelope.tensors) == 4
        for got, sent in zip(envelope.tensors[:3], tensors):
            assert got.dtype == torch.float32 and got.shape == sent.shape
            expected = quantize.dequantize_blockwise(*quantize.quantize_blockwise(sent), tuple(sent.shape))
            assert torch.equal(got, expected)
        assert torch.equal(envelope.tensors[3], tensors[3])  # integers travel as they are


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_arrives_non_finite_and_is_refused(bad):
    spec = RunSpec()
    x = torch.randn(1, 4, spec.hidden_size)
    x[0, 2, 7] = bad
    got = from_message(to_message(Envelope({}, [x]), runtime_pb2.ExpertRequest, INT8)).tensors[0]
    assert not torch.isfinite(got).all()
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        validate_hidden(got, spec, "hidden")


@pytest.mark.parametrize("cut", [-1, 1, -65])
def test_a_buffer_that_does_not_fit_its_shape_is_refused(cut):
    message = to_message(Envelope({}, [torch.randn(2, 100)]), runtime_pb2.ExpertRequest, INT8)
    buffer = message.tensors[0].buffer
    message.tensors[0].buffer = buffer[:cut] if cut < 0 else buffer + b"\0" * cut
    with pytest.raises(ProtocolError, match="undecodable tensor.*int8 tensor of shape"):
        from_message(message)


def test_a_forged_huge_shape_is_refused_before_allocating():
    message = to_message(Envelope({}, [torch.randn(64)]), runtime_pb2.ExpertRequest, INT8)
    del message.tensors[0].size[:]
    message.tensors[0].size.extend([2**20, 2**20])
    with pytest.raises(ProtocolError, match="takes"):
        from_message(message)


def test_activations_reply_holds_the_float32_form_of_the_largest_int8_activation():
    spec = RunSpec(max_message_mb=0.25, wire_dtype="int8", refit_cache=3)
    per_sample = spec.seq_len * spec.hidden_size
    batch = int(spec.max_message_bytes // (per_sample * quantize.BYTES_PER_VALUE))  # the largest accepted
    assert batch * per_sample * quantize.BYTES_PER_VALUE <= spec.max_message_bytes
    assert 2 * spec.refit_cache * batch * per_sample * 4 <= activations_reply_bytes(spec)
    assert activations_reply_bytes(spec) < 2 * spec.refit_cache * (batch + 1) * per_sample * 4

import pytest
import torch

from cfnode.config import RunSpec
from cfnode.protocol.messages import ProtocolError
from cfnode.protocol.validation import validate_hidden

SPEC = RunSpec(num_stages=2, layers_per_stage=1, hidden_size=32, num_heads=2, seq_len=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 32), (3, 7, 32), (2, 16, 32)])
def test_accepts_float_hidden_states(dtype, shape):
    tensor = torch.randn(shape).to(dtype)
    out = validate_hidden(tensor, SPEC, "hidden")
    assert out.dtype == torch.float32 and out.shape == shape
    assert torch.equal(out, tensor.float())


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float64])
def test_refuses_other_dtypes(dtype):
    with pytest.raises(ProtocolError, match="dtype"):
        validate_hidden(torch.zeros(1, 4, 32, dtype=dtype), SPEC, "hidden")


@pytest.mark.parametrize("shape", [(32,), (4, 32), (1, 1, 4, 32), ()])
def test_refuses_wrong_rank(shape):
    with pytest.raises(ProtocolError, match="shape"):
        validate_hidden(torch.zeros(shape), SPEC, "hidden")


@pytest.mark.parametrize(
    "shape",
    [
        (1, 4, 31),  # wrong channels
        (1, 4, 64),
        (1, 17, 32),  # T > seq_len
        (1, 0, 32),  # T = 0
        (0, 4, 32),  # no batch
    ],
)
def test_refuses_wrong_shape(shape):
    with pytest.raises(ProtocolError, match="shape"):
        validate_hidden(torch.zeros(shape), SPEC, "hidden")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_refuses_non_finite(bad, dtype):
    tensor = torch.randn(2, 4, 32)
    tensor[1, 3, 5] = bad
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        validate_hidden(tensor.to(dtype), SPEC, "hidden")


def test_error_names_the_tensor():
    with pytest.raises(ProtocolError, match="grad_output"):
        validate_hidden(torch.zeros(1, 4, 31), SPEC, "grad_output")


def test_accepts_huge_finite_values_whose_sum_overflows():
    tensor = torch.full((2, 4, 32), torch.finfo(torch.float32).max / 2)  # the sum is inf, every value finite
    assert torch.equal(validate_hidden(tensor, SPEC, "hidden"), tensor)
    tensor[0, 0, 0] = float("nan")
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        validate_hidden(tensor, SPEC, "hidden")

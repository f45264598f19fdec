import asyncio

import pytest
import torch
from hivemind.proto import runtime_pb2

from cfnode.config import RunSpec
from cfnode.model import build_body_stage
from cfnode.node.stage_state import (
    flat_grads,
    load_snapshot,
    load_state_file,
    make_optimizer,
    save_state_file,
    snapshot,
    state_file_spec,
)
from cfnode.protocol.messages import ProtocolError, StateSnapshot, from_chunks, to_chunks

SPEC = RunSpec(num_stages=2, layers_per_stage=1, hidden_size=32, num_heads=2, seq_len=16)
OTHER_SEED = SPEC.replace(seed=7)


def train_step(model, optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 8, SPEC.hidden_size, generator=gen)
    target = torch.randn(2, 8, SPEC.hidden_size, generator=gen)
    optimizer.zero_grad()
    (model(hidden) - target).pow(2).mean().backward()
    optimizer.step()


def trained(steps: int = 3):
    model = build_body_stage(SPEC, 1)
    optimizer = make_optimizer(model, SPEC)
    for i in range(steps):
        train_step(model, optimizer, seed=i)
    return model, optimizer


def fresh_other():
    model = build_body_stage(OTHER_SEED, 1)
    return model, make_optimizer(model, OTHER_SEED, lr=0.5)


def assert_identical(model_a, opt_a, model_b, opt_b) -> None:
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert state_a[name].dtype == state_b[name].dtype, name
        assert torch.equal(state_a[name], state_b[name]), name
    optim_a, optim_b = opt_a.state_dict(), opt_b.state_dict()
    # betas travel as a list (msgpack has no tuples); the values must match exactly
    assert _lists(optim_a["param_groups"]) == _lists(optim_b["param_groups"])
    assert optim_a["state"].keys() == optim_b["state"].keys()
    for index in optim_a["state"]:
        per_a, per_b = optim_a["state"][index], optim_b["state"][index]
        assert per_a.keys() == per_b.keys()
        for key in per_a:
            a, b = torch.as_tensor(per_a[key]), torch.as_tensor(per_b[key])
            assert a.dtype == b.dtype and torch.equal(a, b), (index, key)


def _lists(value):
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def over_the_wire(state: StateSnapshot) -> StateSnapshot:
    async def decode():
        async def stream():
            for chunk in to_chunks(state.envelope(), runtime_pb2.ExpertResponse):
                yield chunk
        return await from_chunks(stream(), SPEC.max_message_bytes)

    return StateSnapshot.parse(asyncio.run(decode()))


def test_fresh_stage_of_other_seed_differs():
    model, _ = trained(0)
    other, _ = fresh_other()
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


@pytest.mark.parametrize("wire", [False, True], ids=["direct", "wire"])
def test_snapshot_load_is_exact(wire):
    model, optimizer = trained(3)
    state = snapshot(1, 3, 0.75, model, optimizer)
    assert (state.stage, state.step, state.grad_norm) == (1, 3, 0.75)
    assert len(state.names) == len(state.tensors)
    assert all(name.startswith(("model.", "optim.")) for name in state.names)
    if wire:
        state = over_the_wire(state)

    other, other_opt = fresh_other()
    load_snapshot(state, other, other_opt)
    assert_identical(model, optimizer, other, other_opt)
    assert len(other_opt.state_dict()["state"]) == len(list(other.parameters()))
    assert other_opt.param_groups[0]["lr"] == SPEC.lr

    # one more identical step on both keeps them identical
    train_step(model, optimizer, seed=100)
    train_step(other, other_opt, seed=100)
    assert_identical(model, optimizer, other, other_opt)


def test_snapshot_is_a_copy():
    model, optimizer = trained(1)
    state = snapshot(1, 1, None, model, optimizer)
    before = [t.clone() for t in state.tensors]
    train_step(model, optimizer, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(before, state.tensors))


def test_snapshot_before_any_step():
    model = build_body_stage(SPEC, 1)
    optimizer = make_optimizer(model, SPEC)
    state = snapshot(1, 0, None, model, optimizer)
    assert all(name.startswith("model.") for name in state.names)
    other, other_opt = fresh_other()
    load_snapshot(state, other, other_opt)
    assert_identical(model, optimizer, other, other_opt)


def test_param_groups_are_plain():
    _, optimizer = trained(1)
    model, _ = trained(0)
    state = snapshot(1, 1, None, model, optimizer)

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str))

    assert plain(state.param_groups)


def _drop(state: StateSnapshot, name: str) -> StateSnapshot:
    index = state.names.index(name)
    names = state.names[:index] + state.names[index + 1:]
    tensors = state.tensors[:index] + state.tensors[index + 1:]
    return StateSnapshot(state.stage, state.step, state.grad_norm, names, tensors, state.param_groups)


def test_load_refuses_missing_parameter():
    model, optimizer = trained(1)
    state = snapshot(1, 1, None, model, optimizer)
    name = next(n for n in state.names if n.startswith("model."))
    other, other_opt = fresh_other()
    with pytest.raises(ProtocolError):
        load_snapshot(_drop(state, name), other, other_opt)


def test_load_refuses_extra_parameter():
    model, optimizer = trained(1)
    state = snapshot(1, 1, None, model, optimizer)
    state.names.append("model.blocks.9.extra")
    state.tensors.append(torch.zeros(3))
    other, other_opt = fresh_other()
    with pytest.raises(ProtocolError):
        load_snapshot(state, other, other_opt)


def test_load_refuses_wrong_shape():
    model, optimizer = trained(1)
    state = snapshot(1, 1, None, model, optimizer)
    index = next(i for i, n in enumerate(state.names) if n.startswith("model.") and state.tensors[i].dim() == 2)
    state.tensors[index] = state.tensors[index][:, :-1].clone()
    other, other_opt = fresh_other()
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ProtocolError, match="shape"):
        load_snapshot(state, other, other_opt)
    # nothing was loaded
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))


@pytest.mark.parametrize("name", ["bogus.x", "optim.x.exp_avg", "optim.0.", "optim.-1.exp_avg"])
def test_load_refuses_bad_entry_names(name):
    model, optimizer = trained(1)
    state = snapshot(1, 1, None, model, optimizer)
    state.names.append(name)
    state.tensors.append(torch.zeros(1))
    other, other_opt = fresh_other()
    with pytest.raises(ProtocolError):
        load_snapshot(state, other, other_opt)


def test_load_refuses_wrong_optimizer_state_shape():
    model, optimizer = trained(1)
    state = snapshot(1, 1, None, model, optimizer)
    state.tensors[state.names.index("optim.0.exp_avg")] = torch.zeros(5)
    other, other_opt = fresh_other()
    with pytest.raises(ProtocolError):
        load_snapshot(state, other, other_opt)


def test_load_refuses_bad_param_groups_without_side_effects():
    model, optimizer = trained(1)
    state = snapshot(1, 1, None, model, optimizer)
    state.param_groups[0]["params"] = state.param_groups[0]["params"][:-1]
    other, other_opt = fresh_other()
    before = [p.detach().clone() for p in other.parameters()]
    try:
        with pytest.raises(ProtocolError):
            load_snapshot(state, other, other_opt)
    finally:
        assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))


def test_flat_grads():
    model = build_body_stage(SPEC, 1)
    params = list(model.parameters())
    grads = flat_grads(model)
    assert len(grads) == len(params)
    for grad, param in zip(grads, params):
        assert grad.shape == param.shape and grad.dtype == param.dtype and grad.device.type == "cpu"
        assert not grad.any()

    # a gradient on some parameters only: those are copied, the rest are zeros
    params[0].grad = torch.full_like(params[0], 2.0)
    grads = flat_grads(model)
    assert torch.equal(grads[0], torch.full_like(params[0], 2.0))
    assert all(not g.any() for g in grads[1:])
    grads[0].zero_()  # a copy, not the live gradient
    assert params[0].grad.eq(2.0).all()


def test_flat_grads_after_backward():
    model = build_body_stage(SPEC, 1)
    model(torch.randn(1, 4, SPEC.hidden_size)).sum().backward()
    grads = flat_grads(model)
    for grad, param in zip(grads, model.parameters()):
        assert torch.equal(grad, param.grad)


def test_state_file_round_trip_and_refusals(tmp_path):
    model = build_body_stage(SPEC, 1)
    optimizer = make_optimizer(model, SPEC)
    state = snapshot(1, 7, 0.25, model, optimizer)
    path = tmp_path / "state.pt"
    spec = SPEC.replace(run_id="run")
    save_state_file(state, path, spec)
    loaded = load_state_file(path, "run")
    assert (loaded.stage, loaded.step, loaded.grad_norm, loaded.names) == (1, 7, 0.25, state.names)
    assert state_file_spec(path) == spec  # a state file alone says which model it belongs to
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors, state.tensors))
    assert not (tmp_path / "state.pt.partial").exists()
    with pytest.raises(ProtocolError, match="not from run"):
        load_state_file(path, "another-run")
    path.write_bytes(b"garbage")
    with pytest.raises(ProtocolError, match="cannot read"):
        load_state_file(path, "run")

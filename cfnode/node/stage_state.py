"""A stage's training state (weights, optimiser, step) and its exact transfer between replicas."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cfnode.config import RunSpec
from cfnode.model import BodyStage
from cfnode.protocol.messages import ProtocolError, StateSnapshot


def make_optimizer(model: torch.nn.Module, spec: RunSpec, lr: float | None = None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=spec.lr if lr is None else lr, weight_decay=spec.weight_decay,
                             betas=(0.9, 0.95))


def snapshot(stage: int, step: int, grad_norm: float | None, model: BodyStage,
             optimizer: torch.optim.Optimizer, weights_only: bool = False, step_proof: str = "") -> StateSnapshot:
    """A copy of everything a replica needs to continue exactly where this one is (or just the weights), with the
    trainer's proof of its step."""
    names, tensors = [], []
    for name, tensor in model.state_dict().items():
        names.append(f"model.{name}")
        tensors.append(tensor.detach().to("cpu", copy=True))
    if weights_only:
        return StateSnapshot(stage, step, grad_norm, names, tensors, [], step_proof)
    optim_state = optimizer.state_dict()
    for index, per_param in optim_state["state"].items():
        for key, value in per_param.items():
            names.append(f"optim.{index}.{key}")
            tensors.append(torch.as_tensor(value).detach().to("cpu", copy=True))
    groups = [_plain(group) for group in optim_state["param_groups"]]
    return StateSnapshot(stage, step, grad_norm, names, tensors, groups, step_proof)


def load_snapshot(state: StateSnapshot, model: BodyStage, optimizer: torch.optim.Optimizer) -> None:
    """Load a replica's state. Everything is checked first, so a bad snapshot changes nothing."""
    params = list(model.parameters())
    model_state: dict[str, torch.Tensor] = {}
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in zip(state.names, state.tensors):
        kind, _, rest = name.partition(".")
        if kind == "model":
            model_state[rest] = tensor
        elif kind == "optim":
            index, _, key = rest.partition(".")
            if not index.isdigit() or int(index) >= len(params) or not key:
                raise ProtocolError(f"bad optimiser entry {name!r}")
            if key != "step" and tensor.shape != params[int(index)].shape:
                raise ProtocolError(f"{name} has shape {tuple(tensor.shape)}, "
                                    f"expected {tuple(params[int(index)].shape)}")
            optim_state.setdefault(int(index), {})[key] = tensor
        else:
            raise ProtocolError(f"unknown state entry {name!r}")
    expected = model.state_dict()
    if set(model_state) != set(expected):
        raise ProtocolError("state download does not hold this stage's parameters")
    for name, tensor in model_state.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise ProtocolError(f"{name} has shape {tuple(tensor.shape)} {tensor.dtype}, "
                                f"expected {tuple(expected[name].shape)} {expected[name].dtype}")
    groups = state.param_groups
    if (not isinstance(groups, list) or len(groups) != len(optimizer.param_groups)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
            or [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]):
        raise ProtocolError("optimiser param groups do not match this stage")
    try:
        optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    except (ValueError, TypeError, KeyError) as e:
        raise ProtocolError(f"optimiser state does not load: {e}") from None
    model.load_state_dict(model_state)


def save_state_file(state: StateSnapshot, path: str | Path, spec: RunSpec) -> None:
    """Write a snapshot, with the run spec it belongs to, to a file atomically: a crash mid-write leaves the previous
    file intact. The spec lets `cfnode export` rebuild the model from state files alone."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save({"run_id": spec.run_id, "spec": spec.to_dict(), "stage": state.stage, "step": state.step,
                "grad_norm": state.grad_norm, "names": state.names, "tensors": state.tensors,
                "param_groups": state.param_groups, "step_proof": state.step_proof}, partial)
    os.replace(partial, path)


def state_file_spec(path: str | Path) -> RunSpec | None:
    """The run spec a state file records (None for a file that records none); ProtocolError if unreadable."""
    data = _read_state_file(path)
    if "spec" not in data:
        return None
    try:
        return RunSpec.from_dict(data["spec"])
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"state file {path} records a malformed run spec: {e}") from None


def _read_state_file(path: str | Path) -> dict:
    try:
        data = torch.load(path, weights_only=True)
    except Exception as e:  # not a torch file, truncated, unreadable
        raise ProtocolError(f"cannot read state file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{path} is not a cfnode state file")
    return data


def load_state_file(path: str | Path, run_id: str) -> StateSnapshot:
    """A snapshot written by save_state_file for this run; ProtocolError if it is not one."""
    data = _read_state_file(path)
    if data.get("run_id") != run_id:
        raise ProtocolError(f"state file {path} is not from run {run_id!r}")
    try:
        return StateSnapshot(int(data["stage"]), int(data["step"]), data["grad_norm"], list(data["names"]),
                             list(data["tensors"]), list(data["param_groups"]), str(data.get("step_proof", "")))
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"state file {path} is malformed: {e}") from None


def flat_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    """The accumulated gradient of every parameter, zeros where none has arrived yet, on the CPU."""
    return [p.grad.detach().to("cpu", copy=True) if p.grad is not None else torch.zeros_like(p, device="cpu")
            for p in model.parameters()]


def _plain(value: Any) -> Any:
    """Optimiser param groups as msgpack-friendly values (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def model_state(state: StateSnapshot) -> dict[str, torch.Tensor]:
    """The weights in a snapshot, as a state dict."""
    return {name.removeprefix("model."): tensor for name, tensor in zip(state.names, state.tensors)
            if name.startswith("model.")}

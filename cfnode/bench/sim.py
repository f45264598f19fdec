"""The churn benchmark's in-process pipeline: the live swarm's model, stage and recovery code in one process.

`SimPipeline` holds the trainer's HeadModule and S BodyStages, each body stage with its own AdamW
(`make_optimizer`, as a stage peer) and the same per-stage gradient clipping. A step runs the step's microbatches
along their routes (`microbatch_routes`: in order, or CheckFree+'s swap); each stage's forward runs without a graph
and its backward recomputes it from the stage input and output gradient, as a peer does, and each stage sums its
microbatch gradients in microbatch order before it clips and steps. Recovery is one of:

- `checkfree`, `checkfree+`, `uniform`, `copy`, `random`: `plan_rebuild` + `rebuild_weights` from the live stages,
  then a fresh optimiser at lr * lr_scale (as `StagePeer._rebuild`);
- `checkpoint`, `checkpoint-yd`: every stage (and the head, and the data order) is saved to files every N steps (the
  paper's 20, or the Young-Daly interval; `cfnode.bench.churn` picks N); a lost stage rolls every stage back to the
  last checkpoint and the steps since are redone;
- `checkfree+refit`, `checkfree++refit` (CheckFree+ then refit), `copy+refit`: the rebuild, then `refit` on the
  lost stage's last `refit_cache` (input, output) pairs, which the pipeline caches as the trainer does;
- `redundant` (Bamboo-style): stage s-1 keeps a shadow of stage s (stage S's shadow lives on stage 1) that runs the
  same forward and backward on the same inputs and output gradients and applies the same update, so a lost stage is
  replaced by its shadow exactly; the shadow's compute is measured.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cfnode.config import RunSpec
from cfnode.data import TextDataset
from cfnode.model import BodyStage, HeadModule
from cfnode.model.stages import build_body_stage, build_head
from cfnode.node.stage_state import make_optimizer
from cfnode.recovery.rebuild import plan_rebuild, rebuild_weights
from cfnode.recovery.refit import ActivationCache, RefitResult, refit

REBUILD_METHODS = ("checkfree", "checkfree+", "uniform", "copy", "random")
# A rebuild followed by a refit on the lost stage's cached activations (cfnode.recovery.refit).
REFIT_METHODS = ("checkfree+refit", "checkfree++refit", "copy+refit")
# Checkpointing at the paper's fixed interval, and at the Young-Daly interval for the failure rate.
CHECKPOINT_METHODS = ("checkpoint", "checkpoint-yd")
METHODS = ("none", *CHECKPOINT_METHODS, "redundant", *REBUILD_METHODS, *REFIT_METHODS)


def recovery_mode(method: str) -> tuple[str, bool]:
    """The live recovery mode a method rebuilds with, and whether it refits afterwards."""
    if method in REFIT_METHODS:
        return method.removesuffix("+refit"), True
    return method, False


def stage_backward(model: torch.nn.Module, hidden: torch.Tensor,
                   grad_output: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A stage peer's backward: recompute the forward from the input, backpropagate the output gradient.

    Returns the input gradient and this microbatch's parameter gradients (zeros where none), leaving .grad empty."""
    hidden = hidden.detach().requires_grad_(True)
    model(hidden).backward(grad_output)
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return hidden.grad, grads


def apply_grads(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ordered: Sequence[Sequence[torch.Tensor]],
                grad_clip: float) -> float:
    """A stage peer's step: sum the microbatch gradients in order, clip, step; returns the norm before clipping."""
    params = list(model.parameters())
    for index, param in enumerate(params):
        total = torch.zeros_like(param)
        for grads in ordered:
            total += grads[index]
        param.grad = total
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


class Shadow:
    """Bamboo-style redundancy: an identical copy of a stage, with its own optimiser, updated in step with it."""

    def __init__(self, model: BodyStage, optimizer: torch.optim.Optimizer, spec: RunSpec):
        self.model = copy.deepcopy(model)
        self.optimizer = make_optimizer(self.model, spec, lr=optimizer.param_groups[0]["lr"])
        self.optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))


class SimPipeline:
    def __init__(self, spec: RunSpec, method: str = "none"):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        self.spec, self.method = spec, method
        self.mode, self.refits = recovery_mode(method)
        if self.refits and spec.refit_cache == 0:
            raise ValueError(f"method {method} needs a run spec with refit_cache > 0")
        self.cache = ActivationCache(spec.refit_cache if self.refits else 0)
        self.refit_results: list[RefitResult] = []
        self.num_stages = spec.num_stages
        self.head: HeadModule = build_head(spec)
        # The trainer's own optimiser (cfnode.node.trainer.Trainer).
        self.head_optimizer = torch.optim.AdamW(self.head.parameters(), lr=spec.lr, weight_decay=spec.weight_decay,
                                                betas=(0.9, 0.95))
        self.stages: dict[int, BodyStage] = {s: build_body_stage(spec, s) for s in range(1, self.num_stages + 1)}
        self.optimizers = {s: make_optimizer(m, spec) for s, m in self.stages.items()}
        self.grad_norms: dict[int, float | None] = {s: None for s in self.stages}
        self.step = 0
        # shadows[s]: the copy of stage s kept by the peer of stage s-1 (stage S's by stage 1).
        self.shadows: dict[int, Shadow] = (
            {s: Shadow(self.stages[s], self.optimizers[s], spec) for s in self.stages} if method == "redundant" else {})

    # --- training --------------------------------------------------------------------------------------------

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor,
                   routes: Sequence[Sequence[int]]) -> tuple[float, float]:
        """One optimiser step of every stage and the head; returns (mean microbatch loss, shadow compute seconds)."""
        microbatches = len(routes)
        stage_grads: dict[int, list[list[torch.Tensor]]] = {s: [] for s in self.stages}
        shadow_grads: dict[int, list[list[torch.Tensor]]] = {s: [] for s in self.shadows}
        shadow_seconds = 0.0
        losses = []
        for x, y, route in zip(inputs.chunk(microbatches), targets.chunk(microbatches), routes):
            embedded = self.head.embed(x)  # (B, T, C), keeps its graph for the embedding's gradient
            hidden = embedded.detach()
            stage_inputs = {}
            for stage in route:
                stage_inputs[stage] = hidden
                with torch.no_grad():
                    hidden = self.stages[stage](hidden)
                self.cache.record(stage, stage_inputs[stage], hidden)
            hidden = hidden.requires_grad_(True)
            loss = self.head.loss(hidden, y)
            (loss / microbatches).backward()
            losses.append(float(loss.detach()))
            grad = hidden.grad
            for stage in reversed(route):
                grad_in, grads = stage_backward(self.stages[stage], stage_inputs[stage], grad)
                stage_grads[stage].append(grads)
                if stage in self.shadows:
                    started = time.perf_counter()
                    with torch.no_grad():  # the shadow's own forward (Bamboo runs it), then its backward
                        self.shadows[stage].model(stage_inputs[stage])
                    _, grads = stage_backward(self.shadows[stage].model, stage_inputs[stage], grad)
                    shadow_grads[stage].append(grads)
                    shadow_seconds += time.perf_counter() - started
                grad = grad_in
            embedded.backward(grad)
        for stage, model in self.stages.items():
            self.grad_norms[stage] = apply_grads(model, self.optimizers[stage], stage_grads[stage], self.spec.grad_clip)
        started = time.perf_counter()
        for stage, shadow in self.shadows.items():
            apply_grads(shadow.model, shadow.optimizer, shadow_grads[stage], self.spec.grad_clip)
        shadow_seconds += time.perf_counter() - started
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.spec.grad_clip)
        self.head_optimizer.step()
        self.head_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return sum(losses) / len(losses), shadow_seconds

    @torch.no_grad()
    def evaluate(self, dataset: TextDataset, batch_size: int, max_batches: int) -> float:
        """The trainer's validation loss: mean over the first max_batches validation batches, stages in order."""
        losses = []
        for inputs, targets in dataset.val_batches(batch_size, max_batches):
            hidden = self.head.embed(inputs)
            for stage in range(1, self.num_stages + 1):
                hidden = self.stages[stage](hidden)
            losses.append(float(self.head.loss(hidden, targets)))
        return sum(losses) / len(losses)

    # --- recovery: rebuild from neighbours ----------------------------------------------------------------------

    def rebuild(self, lost: Sequence[int]) -> list[str]:
        """Rebuild every lost stage from the stages that survived, as a newcomer peer does; returns what each used."""
        live = set(self.stages) - set(lost)
        sources = {s: {k: v.clone() for k, v in self.stages[s].state_dict().items()} for s in live}
        described = []
        for stage in sorted(lost):
            plan = plan_rebuild(stage, self.num_stages, live, self.mode, trained=self.step > 0)
            fresh = build_body_stage(self.spec, stage).state_dict() if not plan.sources else {}
            new_state = rebuild_weights(plan, [sources[s] for s in plan.sources],
                                        [self.grad_norms[s] for s in plan.sources], fresh)
            self.stages[stage].load_state_dict(new_state)
            refitted = ""
            if self.refits:
                result = refit(self.stages[stage], self.cache.pairs(stage), self.spec.refit_steps, self.spec.refit_lr)
                self.refit_results.append(result)
                refitted = f" refit {result.steps} steps {result.loss_before:.4g}->{result.loss_after:.4g}"
            lr = self.spec.lr * (self.spec.lr_scale if plan.kind not in ("fresh",) else 1.0)
            self.optimizers[stage] = make_optimizer(self.stages[stage], self.spec, lr=lr)
            self.grad_norms[stage] = None
            described.append(f"{stage}<-{plan.kind}{list(plan.sources)}{refitted}")
        return described

    # --- recovery: redundant computation ------------------------------------------------------------------------

    def replace_from_shadows(self, lost: Sequence[int]) -> list[str]:
        """Each lost stage s becomes its shadow (held by stage s-1); the shadows the lost peers held are re-made from
        the stages they shadow, and the new peer gets a new shadow."""
        described = []
        lost_set = set(lost)
        for stage in sorted(lost):
            holder = self.num_stages if stage == 1 else stage - 1
            if holder in lost_set:
                # The peer that held this stage's shadow is gone too: nothing exact is left; start fresh.
                model = build_body_stage(self.spec, stage)
                self.stages[stage].load_state_dict(model.state_dict())
                self.optimizers[stage] = make_optimizer(self.stages[stage], self.spec)
                described.append(f"{stage}<-fresh (shadow holder {holder} lost too)")
            else:
                shadow = self.shadows[stage]
                self.stages[stage].load_state_dict(shadow.model.state_dict())
                optimizer = make_optimizer(self.stages[stage], self.spec, lr=shadow.optimizer.param_groups[0]["lr"])
                optimizer.load_state_dict(copy.deepcopy(shadow.optimizer.state_dict()))
                self.optimizers[stage] = optimizer
                described.append(f"{stage}<-shadow on {holder}")
            self.grad_norms[stage] = None
        # Re-make every shadow that was lost (held by a lost peer) or that shadowed a replaced stage.
        for stage in self.stages:
            holder = self.num_stages if stage == 1 else stage - 1
            if stage in lost_set or holder in lost_set:
                self.shadows[stage] = Shadow(self.stages[stage], self.optimizers[stage], self.spec)
        return described

    # --- recovery: checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self, directory: Path) -> None:
        """Every stage writes its weights and optimiser to its own file (the data order follows the step)."""
        directory.mkdir(parents=True, exist_ok=True)
        for stage, model in self.stages.items():
            torch.save({"step": self.step, "model": model.state_dict(),
                        "optimizer": self.optimizers[stage].state_dict(), "grad_norm": self.grad_norms[stage]},
                       directory / f"stage-{stage}.pt.tmp")
        torch.save({"step": self.step, "model": self.head.state_dict(), "optimizer": self.head_optimizer.state_dict()},
                   directory / "stage-0.pt.tmp")
        for stage in range(self.num_stages + 1):  # replace the previous checkpoint only once all files are written
            (directory / f"stage-{stage}.pt.tmp").replace(directory / f"stage-{stage}.pt")

    def load_checkpoint(self, directory: Path) -> int:
        """Every stage and the head roll back to the files; returns the checkpoint's step."""
        for stage, model in self.stages.items():
            state = torch.load(directory / f"stage-{stage}.pt", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer = make_optimizer(model, self.spec)
            optimizer.load_state_dict(state["optimizer"])
            self.optimizers[stage] = optimizer
            self.grad_norms[stage] = state["grad_norm"]
        state = torch.load(directory / "stage-0.pt", weights_only=True)
        self.head.load_state_dict(state["model"])
        self.head_optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        return self.step

"""A stage peer: serves one body stage's forward, backward and step over RPC and announces itself on the DHT.

Compute runs on one worker thread, so the event loop keeps answering (info, state downloads, gradient
fetches) while a forward is busy, and requests from several microbatches queue up in arrival order.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import hivemind
import torch
from hivemind.utils import get_dht_time
from hivemind.utils.logging import get_logger

from cfnode.config import JoinConfig, RunSpec
from cfnode.model import build_body_stage, build_head
from cfnode.node.stage_choice import choose_stage, is_live
from cfnode.node.stage_state import flat_grads, load_snapshot, make_optimizer, model_state, snapshot
from cfnode.node.swarm_map import StageMap, merge_stage_maps, online, read_stage_map, read_trainers, swarm_step
from cfnode.node.trace import ComputeTrace
from cfnode.protocol.identity import Identity
from cfnode.protocol.keys import stage_key
from cfnode.protocol.messages import (
    BAD_REQUEST,
    GROUP_FAILED,
    NO_ACTIVATIONS,
    NOT_READY,
    STALE,
    BackwardRequest,
    ForwardReply,
    ForwardRequest,
    ProtocolError,
    StageRequest,
    StateSnapshot,
    StepReply,
    StepRequest,
)
from cfnode.protocol.records import PeerState, StageAnnouncement
from cfnode.protocol.service import RequestRefused, StageClient
from cfnode.protocol.timing import add_time, run_timed
from cfnode.protocol.validation import validate_hidden
from cfnode.recovery.rebuild import plan_rebuild, rebuild_weights, source_weights
from cfnode.recovery.refit import refit

logger = get_logger(__name__)
T = TypeVar("T")

# After a step, a peer re-announces (its new step) only if its last announcement is older than this. Every store
# is signed, sent to and verified by several DHT nodes: once per step it cost about 8% of the CPU of a local swarm.
# Whoever needs a peer's exact step asks the peer (live_stage_map, the trainer's step replies).
STEP_ANNOUNCE_SECONDS = 1.0


class ThroughputMeter:
    """Tokens per second of compute time, smoothed: the peer's capacity, for stage choice and routing."""

    def __init__(self, smoothing: float = 0.9):
        self.smoothing = smoothing
        self.value = 0.0

    def record(self, tokens: int, seconds: float) -> None:
        rate = tokens / max(seconds, 1e-6)
        self.value = rate if self.value == 0 else self.smoothing * self.value + (1 - self.smoothing) * rate


class StagePeer:
    """One replica of body stage `stage`: the StageBackend behind StageService."""

    def __init__(self, spec: RunSpec, stage: int, identity: Identity, dht: hivemind.DHT, client: StageClient,
                 device: str = "cpu", request_timeout: float = 30.0, keep_activations: int = 16,
                 trace: ComputeTrace | None = None):
        self.spec, self.stage, self.identity = spec, stage, identity
        self.peer_id = identity.peer_id.to_base58()
        self.dht, self.client = dht, client
        self.device = torch.device(device)
        self.request_timeout = request_timeout
        self.trace = trace  # compute calls with their wall-clock times, for pipeline timelines
        self.max_request_bytes = spec.max_message_bytes
        self.model = build_body_stage(spec, stage).to(self.device)
        self.optimizer = make_optimizer(self.model, spec)
        # A kept copy is a head's or a stage's weights and two Adam moments in float32, plus metadata.
        largest = max(sum(p.numel() for p in build_head(spec).parameters()),
                      sum(p.numel() for p in self.model.parameters()))
        self.max_copy_bytes = 3 * 4 * largest + 2**20
        self.current_step = 0
        self.grad_norm: float | None = None
        self.source = "fresh"
        self.recovered_from: list[str] = []
        self.state = PeerState.JOINING
        self.throughput = ThroughputMeter()
        self.load = 0
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"stage{stage}-compute")
        self._state_lock = asyncio.Lock()  # held while the weights change (step, state load)
        self._input_grads: dict[int, torch.Tensor] = {}  # microbatch -> input grad, this step: retries are idempotent
        # ... and of the step last applied: a backward that carried the step may be retried after its reply was lost
        self._applied_grads: dict[int, torch.Tensor] = {}
        # microbatch -> (input, output) with the autograd graph of this step's forward, until its backward arrives.
        self.keep_activations = keep_activations
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._grads_cache: tuple[int, list[torch.Tensor]] | None = None  # (step, summed-over-microbatches grads)
        self._resync_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._announce_lock = asyncio.Lock()
        self._announced_at = 0.0  # time.monotonic() of the last announcement
        self._step_anchored = False  # True once this copy has stepped or copied a replica: its step is real
        self.recovery_timing: dict[str, float] = {}
        self.refit_report: dict = {}  # a rebuilt stage's refit result, or why it was skipped (announced)
        # State copies kept for others: the trainer's embedding and head (stage 0), for a new trainer, and a
        # neighbouring stage's exact state, handed over by its last peer on a clean leave, for the next newcomer.
        self.kept: dict[int, StateSnapshot] = {}
        self._grad_session = ""  # the trainer run whose gradients are accumulated now
        self._last_applied: int | None = None  # the step last applied, so a retried step call is idempotent

    # --- obtaining weights -------------------------------------------------------------------------------

    async def obtain_weights(self, stage_map: StageMap) -> None:
        """Copy a replica exactly if there is one (a leaving one counts: it waits to hand its state over), else an
        exact copy a leaving last peer left with a neighbour, else rebuild the stage (see recovery.rebuild)."""
        timeout = self.request_timeout * 4
        replicas = [p for p in stage_map.get(self.stage, [])
                    if p.state in (PeerState.ONLINE, PeerState.LEAVING) and p.peer_id != self.peer_id]
        random.shuffle(replicas)
        replicas.sort(key=lambda p: -p.step)
        if await self._copy_exact(replicas, "replica",
                                  lambda p: self.client.download_state(p.peer_id, self.stage, timeout)):
            return
        # A stage that left mid-step is one step behind the others (they applied the step it refused, and the
        # trainer replays its share on the newcomer): a copy one step behind the swarm is current.
        current = swarm_step(stage_map) - 1

        async def current_copy(holder: StageAnnouncement) -> StateSnapshot:
            state = await self.client.get_copy(holder.peer_id, self.stage, timeout)
            if state.step < current:  # left before the swarm moved on: stale, so rebuild instead
                raise ProtocolError(f"the kept copy is at step {state.step}, the swarm at step {current + 1}")
            return state

        holders = [p for s in (self.stage - 1, self.stage + 1) for p in online(stage_map.get(s, []))
                   if self.stage in p.kept]
        if await self._copy_exact(holders, "handoff", current_copy):
            return
        await self._rebuild(stage_map)

    async def _copy_exact(self, peers: list[StageAnnouncement], source: str,
                          fetch: Callable[[StageAnnouncement], Awaitable[StateSnapshot]]) -> bool:
        """Load the first state `fetch` gets from `peers` as this stage's exact state (weights, optimiser, step)."""
        for peer in peers:
            try:
                started = time.perf_counter()
                await self._load(await fetch(peer))
            except Exception as e:
                logger.warning(f"stage {self.stage}: taking the state of stage {peer.stage} peer {peer.peer_id} "
                               f"({source}) failed: {e}")
                continue
            self.source, self.recovered_from = source, [f"{peer.stage}:{peer.peer_id}"]
            self._step_anchored = True
            origin = "replica" if source == "replica" else f"the copy kept by stage {peer.stage} peer"
            logger.info(f"stage {self.stage}: copied step {self.current_step} from {origin} {peer.peer_id} "
                        f"in {time.perf_counter() - started:.2f} s")
            return True
        return False

    async def _rebuild(self, stage_map: StageMap) -> None:
        """No live replica: rebuild from the nearest live stages, or start fresh in a swarm that never trained."""
        trained = swarm_step(stage_map) > 0
        live = {s for s, peers in stage_map.items() if s != self.stage and online(peers)}
        while True:
            plan = plan_rebuild(self.stage, self.spec.num_stages, live, self.spec.recovery, trained)
            for warning in plan.warnings:
                logger.warning(f"stage {self.stage}: {warning}")
            started = time.perf_counter()
            downloads = await asyncio.gather(*[self._download_weights(s, stage_map) for s in plan.sources])
            failed = {s for s, d in zip(plan.sources, downloads) if d is None}
            if not failed:
                break
            live -= failed  # a source stage died while we were reading it: plan again without it
        downloaded = time.perf_counter()
        snapshots = [snap for _, snap in downloads]
        norms = [snap.grad_norm for snap in snapshots]
        fresh = build_body_stage(self.spec, self.stage).state_dict() if not plan.sources else {}
        new_state = await self._compute(rebuild_weights, plan, [model_state(s) for s in snapshots], norms, fresh)
        async with self._state_lock:
            await self._compute(self.model.load_state_dict, new_state)
            # A rebuilt stage starts a fresh optimiser, at a slightly higher learning rate (the paper's x1.1).
            lr = self.spec.lr * (self.spec.lr_scale if plan.kind not in ("fresh",) else 1.0)
            self.optimizer = make_optimizer(self.model, self.spec, lr=lr)
            self.current_step = max([snap.step for snap in snapshots], default=swarm_step(stage_map))
            self.grad_norm = None
            self._reset_step_buffers()
        averaged = time.perf_counter()
        self.source = plan.kind
        self.recovered_from = [f"{s}:{peer}" for s, (peer, _) in zip(plan.sources, downloads)]
        self.recovery_timing = {"download": round(downloaded - started, 4), "rebuild": round(averaged - downloaded, 4)}
        if plan.sources:
            weights = source_weights(plan.kind, norms) if len(plan.sources) > 1 else [1.0]
            described = " and ".join(f"stage {s} (peer {peer}, grad norm {snap.grad_norm}, weight {w:.3f})"
                                     for s, (peer, snap), w in zip(plan.sources, downloads, weights))
            logger.info(f"stage {self.stage}: rebuilt by {plan.kind} from {described} at step {self.current_step}; "
                        f"download {self.recovery_timing['download']:.2f} s, "
                        f"rebuild {self.recovery_timing['rebuild']:.2f} s")
        elif trained:
            logger.warning(f"stage {self.stage}: starting from {plan.kind} weights at step {self.current_step}")
        if trained and self.spec.refit_cache:
            started = time.perf_counter()
            await self._refit()
            self.recovery_timing["refit"] = round(time.perf_counter() - started, 4)

    async def _refit(self) -> None:
        """Regress the rebuilt weights onto the lost stage's recent (input, output) pairs, cached by the trainer."""
        reason = "no trainer announces cached activations (a trainer that started after the loss has none)"
        pairs: list = []
        origin = ""
        for trainer in await read_trainers(self.dht, self.spec):
            try:
                pairs = await self.client.activations(trainer.peer_id, self.stage, self.request_timeout * 4)
                for inputs, outputs in pairs:
                    validate_hidden(inputs, self.spec, "cached input")
                    validate_hidden(outputs, self.spec, "cached output")
            except Exception as e:
                reason = f"trainer {trainer.peer_id} gave no usable activations: {type(e).__name__}: {e}"
                pairs = []
                continue
            origin = trainer.peer_id
            reason = "the trainer holds no activations of this stage yet"
            break
        if not pairs:
            self.refit_report = {"skipped": reason[:200]}
            logger.info(f"stage {self.stage}: skipping the refit: {reason}")
            return
        started = time.perf_counter()
        async with self._state_lock:
            result = await self._compute(refit, self.model, pairs, self.spec.refit_steps, self.spec.refit_lr)
        self.refit_report = {**result.to_wire(), "trainer": origin}
        logger.info(f"stage {self.stage}: refit on {result.pairs} cached pairs from trainer {origin}: {result.steps} "
                    f"steps, held-out loss {result.loss_before:.5g} -> {result.loss_after:.5g} ({result.stopped}) "
                    f"in {time.perf_counter() - started:.2f} s")

    async def _download_weights(self, stage: int, stage_map: StageMap) -> tuple[str, StateSnapshot] | None:
        """The weights and last gradient norm of one live peer of `stage`; None if none of them answers."""
        for peer in sorted(online(stage_map.get(stage, [])), key=lambda p: -p.step):
            try:
                snap = await self.client.download_state(peer.peer_id, stage, self.request_timeout * 4,
                                                        weights_only=True)
            except Exception as e:
                logger.warning(f"stage {self.stage}: weight download from stage {stage} peer {peer.peer_id} "
                               f"failed: {e}")
                continue
            if snap.stage != stage:
                continue
            return peer.peer_id, snap
        return None

    async def _load(self, state: StateSnapshot) -> None:
        if state.stage != self.stage:
            raise ProtocolError(f"asked for stage {self.stage}, received stage {state.stage}")
        async with self._state_lock:
            await self._compute(load_snapshot, state, self.model, self.optimizer)
            self.current_step, self.grad_norm = state.step, state.grad_norm
            self._reset_step_buffers()

    # --- StageBackend ------------------------------------------------------------------------------------

    async def forward(self, request: ForwardRequest) -> ForwardReply:
        hidden = self._check(request.stage, request.step, request.hidden, "hidden")
        tokens = hidden.shape[0] * hidden.shape[1]
        if not (request.keep and self.keep_activations):
            kind = "forward" if request.keep else "evaluate"  # the trainer asks to keep in training only
            return ForwardReply(await self._timed(kind, request, tokens, self._forward, hidden))
        hidden, output = await self._timed("forward", request, tokens, self._forward_keeping, hidden)
        self._kept[request.microbatch] = (hidden, output)
        while len(self._kept) > self.keep_activations:  # the oldest falls back to recomputation
            del self._kept[next(iter(self._kept))]
        return ForwardReply(output.detach().cpu(), kept=True)

    async def backward(self, request: BackwardRequest) -> torch.Tensor:
        if (request.step == self._last_applied and request.session == self._grad_session
                and request.microbatch in self._applied_grads):
            self._check_stage(request.stage)
            return self._applied_grads[request.microbatch]  # its step call, idempotent too, reports the step applied
        if request.hidden is None:
            self._check_stage(request.stage)
            self._check_ready()
            self._check_step(request.step)
            hidden_in = None
        else:
            hidden_in = self._check(request.stage, request.step, request.hidden, "hidden")
        grad_output = validate_hidden(request.grad_output, self.spec, "grad_output")
        await self._adopt_session(request.session)
        if request.microbatch in self._input_grads:  # a retry of a backward already accumulated
            return self._input_grads[request.microbatch]
        kept = self._kept.get(request.microbatch)
        if hidden_in is None and kept is None:
            raise RequestRefused(NO_ACTIVATIONS, f"no activations kept for microbatch {request.microbatch}; "
                                                 "send its input")
        hidden = kept[0] if kept is not None else hidden_in
        if grad_output.shape != hidden.shape:
            raise RequestRefused(BAD_REQUEST, f"grad_output shape {tuple(grad_output.shape)} differs from hidden "
                                              f"shape {tuple(hidden.shape)}")
        tokens = hidden.shape[0] * hidden.shape[1]
        if kept is not None:
            del self._kept[request.microbatch]  # a graph runs backward once
            grad_input = await self._timed("backward", request, tokens, self._backward_kept, *kept, grad_output)
        else:
            grad_input = await self._timed("backward", request, 2 * tokens, self._backward, hidden_in, grad_output)
        self._input_grads[request.microbatch] = grad_input
        self._grads_cache = None
        return grad_input

    async def apply_step(self, request: StepRequest) -> StepReply:
        self._check_stage(request.stage)
        if self.state != PeerState.ONLINE:
            # Leaving, the state is frozen so what a newcomer copies is final; the trainer replays this peer's share.
            raise RequestRefused(NOT_READY, f"peer is {self.state.value}")
        if self.peer_id not in request.group:
            raise RequestRefused(BAD_REQUEST, "this peer is not in the step group")
        async with self._state_lock:
            if self._last_applied == request.step:
                return StepReply(self.current_step, self.grad_norm or 0.0)  # already applied: the caller retried
            self._check_step(request.step)
            await self._adopt_session(request.session)
            others = [p for p in sorted(request.group) if p != self.peer_id]
            if others:
                own = await self._own_grads(request.step)
                self.grad_norm = await self._apply_traced(request.step, await self._group_grads(request, others, own))
                # Keep this step's own gradients: a slower replica of the group may still fetch them.
                self._grads_cache = (request.step, own)
            else:  # alone: no replica fetches them, so step on the accumulated gradients in place, uncopied
                self.grad_norm = await self._apply_traced(request.step, None)
                self._grads_cache = None
            self._last_applied = request.step
            self._step_anchored = True
            self.current_step += 1
            self._applied_grads, self._input_grads = self._input_grads, {}
            self._kept.clear()  # their graphs saw the weights this step just changed
        if time.monotonic() - self._announced_at > STEP_ANNOUNCE_SECONDS:
            self._spawn(self.announce())  # status sees the new step soon; a store per step would cost much CPU
        return StepReply(self.current_step, self.grad_norm)

    async def _group_grads(self, request: StepRequest, others: list[str],
                           own: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Every replica's gradients in the group's (sorted) order, checked: one broken replica must not poison the
        rest, and every replica sums in the same order, so all of them apply bitwise-identical updates."""
        results = await asyncio.gather(
            *[self.client.fetch_grads(p, self.stage, request.step, self.request_timeout, request.session)
              for p in others],
            return_exceptions=True,
        )
        failed = [p for p, r in zip(others, results) if isinstance(r, BaseException)]
        if failed:
            raise RequestRefused(GROUP_FAILED, f"could not fetch gradients from {', '.join(failed)}", failed)
        by_peer = dict(zip(others, results))
        by_peer[self.peer_id] = own
        for peer, grads in by_peer.items():
            if len(grads) != len(own) or any(g.shape != o.shape for g, o in zip(grads, own)):
                raise RequestRefused(GROUP_FAILED, f"gradients from {peer} do not match this stage", [peer])
            if not all(torch.isfinite(g).all() for g in grads):
                raise RequestRefused(GROUP_FAILED, f"gradients from {peer} hold NaN or Inf values", [peer])
        return [by_peer[p] for p in sorted(request.group)]

    async def describe(self) -> dict:
        return self.announcement().to_wire()

    async def export_state(self, request: StageRequest) -> StateSnapshot:
        self._check_stage(request.stage)
        if self.state == PeerState.JOINING:  # a LEAVING peer still hands out its (frozen) state
            raise RequestRefused(NOT_READY, f"peer is {self.state.value}")
        async with self._state_lock:
            return await self._compute(snapshot, self.stage, self.current_step, self.grad_norm, self.model,
                                       self.optimizer, request.weights_only)

    async def export_grads(self, request: StageRequest) -> list[torch.Tensor]:
        self._check_stage(request.stage)
        if self._grads_cache is not None and self._grads_cache[0] == request.step:
            return self._grads_cache[1]
        self._check_step(request.step)
        await self._adopt_session(request.session)
        return await self._own_grads(request.step)

    def keepable_stages(self) -> set[int]:
        """Whose state copies this peer keeps: the trainer's head (stage 0) and its neighbouring stages'."""
        return {0} | {s for s in (self.stage - 1, self.stage + 1) if 1 <= s <= self.spec.num_stages}

    async def keep_copy(self, state: StateSnapshot) -> None:
        if state.stage not in self.keepable_stages():
            raise RequestRefused(BAD_REQUEST, f"stage {self.stage} keeps copies of stages "
                                              f"{sorted(self.keepable_stages())}, not of stage {state.stage}")
        await self._compute(self._check_copy, state)  # a copy nobody could load is refused now, not later
        known = self.kept.get(state.stage)
        if known is None or state.step >= known.step:
            self.kept[state.stage] = state
            self._spawn(self.announce())  # newcomers find kept copies through the announcement

    def _check_copy(self, state: StateSnapshot) -> None:
        model = build_head(self.spec) if state.stage == 0 else build_body_stage(self.spec, state.stage)
        load_snapshot(state, model, make_optimizer(model, self.spec))
        if not all(torch.isfinite(t).all() for t in state.tensors if t.is_floating_point()):
            raise ProtocolError(f"the copy of stage {state.stage} holds NaN or Inf values")

    async def export_copy(self, request: StageRequest) -> StateSnapshot:
        state = self.kept.get(request.stage)
        if state is None:
            raise RequestRefused(NOT_READY, f"this peer holds no copy of stage {request.stage}")
        return state

    async def _adopt_session(self, session: str) -> None:
        """Gradients belong to one trainer run: a new trainer's first request drops what a dead one left behind."""
        if session == self._grad_session:
            return
        if self._grad_session or self._input_grads:  # not the first trainer, or one without a session
            dropped = len(self._input_grads)
            (logger.warning if dropped else logger.info)(
                f"stage {self.stage}: a new trainer took over; dropping {dropped} microbatch(es) of gradients from "
                "the previous one")
        self._grad_session = session
        self._reset_step_buffers()
        await self._compute(self.optimizer.zero_grad, True)

    # --- helpers -----------------------------------------------------------------------------------------

    def _check_stage(self, stage: int) -> None:
        if stage != self.stage:
            raise RequestRefused(BAD_REQUEST, f"this peer serves stage {self.stage}, not stage {stage}")

    def _check_step(self, step: int) -> None:
        if step != self.current_step and not self._step_anchored and self.source != "fresh":
            # Rebuilt weights have no step history of their own: take the trainer's step.
            logger.info(f"stage {self.stage}: taking the trainer's step {step} (was {self.current_step})")
            self.current_step = step
        if step != self.current_step:
            # Behind: catch up. Fresh weights while the trainer is elsewhere: the view this peer joined with may
            # have been incomplete (a DHT that had not caught up yet), so it looks again before serving.
            if step > self.current_step or not self._step_anchored:
                self._start_resync(step)
            raise RequestRefused(STALE, f"peer is at step {self.current_step}, request is for step {step}")

    def _check(self, stage: int, step: int, hidden: torch.Tensor, name: str) -> torch.Tensor:
        self._check_stage(stage)
        self._check_ready()
        try:
            checked = validate_hidden(hidden, self.spec, name)
        except ProtocolError as e:
            raise RequestRefused(BAD_REQUEST, str(e)) from None
        self._check_step(step)
        return checked

    def _check_ready(self) -> None:
        if self.state != PeerState.ONLINE:
            raise RequestRefused(NOT_READY, f"peer is {self.state.value}")

    async def _own_grads(self, step: int) -> list[torch.Tensor]:
        if self._grads_cache is None or self._grads_cache[0] != step:
            self._grads_cache = (step, await self._compute(flat_grads, self.model))
        return self._grads_cache[1]

    def _reset_step_buffers(self) -> None:
        self._input_grads.clear()
        self._applied_grads.clear()
        self._kept.clear()
        self._grads_cache = None

    async def _compute(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def _timed(self, kind: str, request: ForwardRequest | BackwardRequest, tokens: int, fn: Callable[..., T],
                     *args) -> T:
        """Compute on the worker, recording the wait for it (`queue`) and the compute itself for the reply."""
        self.load += 1
        try:
            submitted = time.perf_counter()
            result, started, finished = await self._compute(run_timed, fn, *args)
            self.throughput.record(tokens, finished - started)
            add_time("queue", started - submitted)
            add_time("compute", finished - started)
            if self.trace is not None:
                self.trace.record(kind, request.step, request.microbatch, started, finished)
            return result
        finally:
            self.load -= 1

    async def _apply_traced(self, step: int, ordered_grads: list[list[torch.Tensor]] | None) -> float:
        norm, started, finished = await self._compute(run_timed, self._apply, ordered_grads)
        if self.trace is not None:
            self.trace.record("step", step, None, started, finished)
        return norm

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(hidden.to(self.device)).cpu()

    def _forward_keeping(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden.to(self.device).requires_grad_(True)
        return hidden, self.model(hidden)

    @staticmethod
    def _backward_kept(hidden: torch.Tensor, output: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        output.backward(grad_output.to(output.device))
        return hidden.grad.cpu()

    def _backward(self, hidden: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        # Recompute the forward: the backward of a microbatch whose forward ran elsewhere (a retry on another
        # replica, a replay after a replica died) or whose activations were not kept.
        hidden = hidden.to(self.device).requires_grad_(True)
        output = self.model(hidden)
        output.backward(grad_output.to(self.device))
        return hidden.grad.cpu()

    def _apply(self, ordered_grads: list[list[torch.Tensor]] | None) -> float:
        """Clip and step on the group's gradients summed in the given order, or (None) on this peer's own
        accumulated ones. Returns the norm before clipping."""
        params = list(self.model.parameters())
        for index, param in enumerate(params):
            if ordered_grads is None:
                if param.grad is None:  # no microbatch reached it: a zero gradient, as a replica would send
                    param.grad = torch.zeros_like(param)
                continue
            total = torch.zeros_like(param)
            for grads in ordered_grads:
                total += grads[index].to(self.device)
            param.grad = total
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(norm):
            raise RequestRefused(GROUP_FAILED, f"gradients from {self.peer_id} hold NaN or Inf values", [self.peer_id])
        torch.nn.utils.clip_grads_with_norm_(params, self.spec.grad_clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # --- resynchronisation ---------------------------------------------------------------------------------

    def _start_resync(self, target_step: int) -> None:
        if self._resync_task is None or self._resync_task.done():
            self._resync_task = self._spawn(self._resync(target_step))

    async def _resync(self, target_step: int) -> None:
        """This replica fell behind (it missed a step); copy a replica that is at the swarm's step."""
        logger.warning(f"stage {self.stage}: at step {self.current_step} but the swarm is at step {target_step}; "
                       "resyncing")
        stage_map = await live_stage_map(self.dht, self.spec, self.client)  # the replicas' steps now, not announced
        replicas = [p for p in stage_map.get(self.stage, []) if p.state in (PeerState.ONLINE, PeerState.LEAVING)
                    and p.peer_id != self.peer_id and p.step >= target_step]
        self.state = PeerState.JOINING
        await self.announce()
        try:
            if replicas:
                await self.obtain_weights({self.stage: replicas})
            elif not self._step_anchored:  # fresh weights: a second look at the swarm
                await self.obtain_weights(await live_stage_map(self.dht, self.spec, self.client))
                async with self._state_lock:
                    if self.current_step != target_step:
                        logger.info(f"stage {self.stage}: taking the trainer's step {target_step} "
                                    f"(was {self.current_step})")
                        self.current_step = target_step
                        self._reset_step_buffers()
                    self._step_anchored = True
            else:
                # No replica holds the newer weights: this copy is the best the swarm has; carry on from it.
                logger.warning(f"stage {self.stage}: no replica at step {target_step}; continuing from own weights")
                async with self._state_lock:
                    self.current_step = target_step
                    self._reset_step_buffers()
        finally:
            self.state = PeerState.ONLINE
            await self.announce()

    # --- leaving cleanly -----------------------------------------------------------------------------------

    async def leave(self, timeout: float) -> None:
        """A clean exit: take no new work, finish what is in flight and, as the stage's last peer, hand the exact
        state over (to a newcomer copying it now, and to a neighbour for the next one), so nothing is rebuilt."""
        deadline = time.monotonic() + timeout
        self.state = PeerState.LEAVING  # forward, backward and step are refused from now on: the state is frozen
        await self.announce()
        while self.load > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stage_map = await live_stage_map(self.dht, self.spec, self.client)
        others = [p for p in online(stage_map.get(self.stage, [])) if p.peer_id != self.peer_id]
        if others:
            logger.info(f"stage {self.stage}: leaving; {len(others)} other replica(s) keep serving it")
            return
        if self.current_step > 0:  # an untrained stage has nothing worth handing over
            await self._hand_to_neighbours(stage_map, deadline)
        await self._wait_for_newcomer(deadline)

    async def _hand_to_neighbours(self, stage_map: StageMap, deadline: float) -> None:
        async with self._state_lock:  # an in-flight step finishes first
            state = await self._compute(snapshot, self.stage, self.current_step, self.grad_norm, self.model,
                                        self.optimizer)
        holders = []
        for stage in (self.stage + 1, self.stage - 1):
            for peer in online(stage_map.get(stage, [])):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await self.client.put_copy(peer.peer_id, state, min(self.request_timeout * 4, remaining))
                except Exception as e:
                    logger.warning(f"stage {self.stage}: stage {stage} peer {peer.peer_id} did not take the state: {e}")
                    continue
                holders.append(f"{stage}:{peer.peer_id}")
                break
        if holders:
            logger.info(f"stage {self.stage}: last peer leaving; left its exact state (step {state.step}) with "
                        f"{', '.join(holders)}")
        else:
            logger.warning(f"stage {self.stage}: last peer leaving and no neighbour took its state; the next "
                           f"newcomer rebuilds the stage by {self.spec.recovery}")

    async def _wait_for_newcomer(self, deadline: float, grace: float = 3.0) -> None:
        """Stay while a newcomer joining this stage copies this peer, until it is online. A standby spare claims
        the stage within its poll interval, so wait `grace` seconds for one to show up."""
        noticed_by = time.monotonic() + grace
        while time.monotonic() < deadline:
            peers = [p for p in (await read_stage_map(self.dht, self.spec)).get(self.stage, [])
                     if p.peer_id != self.peer_id]
            taken = online(peers)
            if taken:
                logger.info(f"stage {self.stage}: handed over to {', '.join(p.peer_id for p in taken)}")
                return
            if not any(p.state == PeerState.JOINING for p in peers) and time.monotonic() > noticed_by:
                return
            await asyncio.sleep(0.25)
        logger.warning(f"stage {self.stage}: a newcomer was still joining when the leave timeout ran out")

    # --- announcing ----------------------------------------------------------------------------------------

    def announcement(self) -> StageAnnouncement:
        return StageAnnouncement(
            peer_id=self.peer_id, stage=self.stage, state=self.state, step=self.current_step,
            throughput=round(self.throughput.value, 3), load=self.load, grad_norm=self.grad_norm,
            source=self.source, recovered_from=list(self.recovered_from), announced_at=round(get_dht_time(), 3),
            kept=sorted(self.kept), refit=dict(self.refit_report),
        )

    async def announce(self) -> None:
        # One announcement at a time: the DHT keeps a subkey's value with the latest expiration, so two racing
        # stores would have the older record win or the newer one refused.
        async with self._announce_lock:
            self._announced_at = time.monotonic()
            record = self.announcement().to_wire()
            expiration = get_dht_time() + self.spec.announce_ttl
            ok = await self.dht.store(stage_key(self.spec.run_id, self.stage), record, expiration,
                                      subkey=self.identity.owner_subkey, return_future=True)
        if not ok:
            logger.warning(f"stage {self.stage}: announcement was not stored")

    async def announce_forever(self) -> None:
        """Refresh the announcement well within its TTL, so a live peer never drops off the map."""
        while True:
            try:
                await self.announce()
            except Exception as e:  # the DHT may hiccup; the next round retries
                logger.warning(f"stage {self.stage}: announcing failed: {e}")
            await asyncio.sleep(self.spec.announce_ttl / 4)

    def _spawn(self, coroutine) -> asyncio.Task:
        """A background task that is kept referenced until it finishes (the loop holds only weak references)."""
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        if self.trace is not None:
            self.trace.close()


async def pick_stage(config: JoinConfig, dht: hivemind.DHT, spec: RunSpec, client: StageClient) -> int:
    """The stage to serve: the one asked for, or the automatic choice after a short random delay.

    The delay spreads newcomers that start together, so they see each other's JOINING records.
    """
    if config.stage is not None:
        if not 1 <= config.stage <= spec.num_stages:
            raise ValueError(f"stage {config.stage} does not exist: this run has stages 1..{spec.num_stages}")
        return config.stage
    if config.standby:
        # A warm spare: already connected and imported, it claims a lost stage as soon as one appears.
        logger.info("standing by until a stage has no live peer")
        while True:
            stage_map = await live_stage_map(dht, spec, client)
            if any(not is_live(stage_map.get(s, [])) for s in range(1, spec.num_stages + 1)):
                return choose_stage(stage_map, spec.num_stages)
            await asyncio.sleep(config.standby_poll)
    await asyncio.sleep(random.uniform(0, 0.3))
    stage_map = await live_stage_map(dht, spec, client)
    return choose_stage(stage_map, spec.num_stages)


async def live_stage_map(dht: hivemind.DHT, spec: RunSpec, client: StageClient, timeout: float = 3.0) -> StageMap:
    """The stage map without peers that no longer answer: a SIGKILLed peer's record outlives it by up to its TTL,
    and a newcomer must see that stage as lost at once.

    The map is the union of two DHT reads: while a DHT node is unreachable (a host cut off, not a process
    killed) a single read can time out on it and come back without live stages, and a newcomer that trusted
    it would take a stage that has peers, or rebuild from one neighbour when it has two."""
    stage_map = merge_stage_maps(await read_stage_map(dht, spec), await read_stage_map(dht, spec), spec.announce_ttl)
    peers = [p for records in stage_map.values() for p in records]

    async def current(peer: StageAnnouncement) -> StageAnnouncement | None:
        """The peer's own account of itself (its step and state now), or None if it does not answer. An
        announcement can lag a step or two behind: peers refresh it at most every STEP_ANNOUNCE_SECONDS."""
        for attempt_timeout in (timeout, 3 * timeout):
            try:
                info = await client.info(peer.peer_id, peer.stage, attempt_timeout)
                break
            except asyncio.TimeoutError:
                # Slow, not gone: on an overloaded machine a live peer can miss a short deadline, and a newcomer
                # that took its stage for lost would rebuild a stage that has peers. A dead process refuses at once.
                continue
            except Exception:
                return None
        else:
            return None
        try:
            fresh = StageAnnouncement.from_wire(info)
        except Exception:
            return peer
        return fresh if (fresh.peer_id, fresh.stage) == (peer.peer_id, peer.stage) else peer

    answers = dict(zip([p.peer_id for p in peers], await asyncio.gather(*[current(p) for p in peers])))
    return {stage: [answers[p.peer_id] for p in records if answers[p.peer_id] is not None]
            for stage, records in stage_map.items()}

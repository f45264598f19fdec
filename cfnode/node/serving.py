"""What a stage peer serves: forward, backward and the step, state and gradient downloads, and kept copies.

Compute runs on one worker thread, so the event loop keeps answering (info, state downloads, gradient
fetches) while a forward is busy, and requests from several microbatches queue up in arrival order."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from hivemind.utils.logging import get_logger

from cfnode.faults import CURRENT_PIPE_CUT, FAULTS
from cfnode.model import build_body_stage, build_head
from cfnode.node.stage_state import flat_grads, load_snapshot, make_optimizer, snapshot
from cfnode.node.swarm_map import read_stage_map
from cfnode.protocol.ledger import group_mismatches, ledger_digest
from cfnode.protocol.messages import (
    BAD_REQUEST,
    GROUP_FAILED,
    LEDGER_MISMATCH,
    NO_ACTIVATIONS,
    NOT_READY,
    STALE,
    UNAUTHORISED,
    BackwardRequest,
    ForwardReply,
    ForwardRequest,
    ProtocolError,
    StageRequest,
    StateSnapshot,
    StepReply,
    StepRequest,
)
from cfnode.protocol.records import PeerState
from cfnode.protocol.service import RequestRefused
from cfnode.protocol.timing import add_time, run_timed
from cfnode.protocol.trust import is_trainer, step_proven
from cfnode.protocol.validation import validate_hidden

logger = get_logger(__name__)
T = TypeVar("T")

# After a step, a peer re-announces (its new step) only if its last announcement is older than this. Every store
# is signed, sent to and verified by several DHT nodes: once per step it cost about 8% of the CPU of a local swarm.
# Whoever needs a peer's exact step asks the peer (live_stage_map, the trainer's step replies).
STEP_ANNOUNCE_SECONDS = 1.0


class Serving:
    """The serving half of StagePeer, the StageBackend behind StageService (its state lives there)."""

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
        microbatch = request.microbatch
        if microbatch in self._input_grads:  # a retry of a backward already accumulated
            return self._input_grads[microbatch]
        running = self._running.get(microbatch)
        if running is None:
            kept = self._kept.get(microbatch)
            if hidden_in is None and kept is None:
                raise RequestRefused(NO_ACTIVATIONS, f"no activations kept for microbatch {microbatch}; "
                                                     "send its input")
            hidden = kept[0] if kept is not None else hidden_in
            if grad_output.shape != hidden.shape:
                raise RequestRefused(BAD_REQUEST, f"grad_output shape {tuple(grad_output.shape)} differs from hidden "
                                                  f"shape {tuple(hidden.shape)}")
            if kept is not None:
                del self._kept[microbatch]  # a graph runs backward once
            running = self._running[microbatch] = asyncio.ensure_future(
                self._accumulate(request, kept, hidden_in, grad_output))
        # Shielded: once the worker adds a microbatch's gradient it must be recorded, even if this call is cancelled
        # meanwhile (its pipe was cut). A retry then finds it recorded, or still running, and is not added again.
        grad_input = await asyncio.shield(running)
        if FAULTS.fire("slow_backward", request.step, microbatch):
            await asyncio.sleep(FAULTS.delay)
        return grad_input

    async def _accumulate(self, request: BackwardRequest, kept: tuple[torch.Tensor, torch.Tensor] | None,
                          hidden_in: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor:
        """Add one microbatch's gradient to the stage's and record it in the step's ledger (its input gradient)."""
        epoch, microbatch = self._buffer_epoch, request.microbatch
        after = self._fault_cut(request)
        try:
            if kept is not None:
                tokens = kept[0].shape[0] * kept[0].shape[1]
                grad_input = await self._timed("backward", request, tokens, self._backward_kept, *kept, grad_output,
                                               after)
            else:
                tokens = 2 * hidden_in.shape[0] * hidden_in.shape[1]
                grad_input = await self._timed("backward", request, tokens, self._backward, hidden_in, grad_output,
                                               after)
        finally:
            if epoch == self._buffer_epoch:
                self._running.pop(microbatch, None)
        if epoch == self._buffer_epoch:  # not dropped meanwhile (a new trainer session, a state loaded)
            self._input_grads[microbatch] = grad_input
            self._grads_cache = None
        return grad_input

    def _fault_cut(self, request: BackwardRequest) -> Callable[[], None] | None:
        """Fault point `cut_backward` (cfnode/faults.py): what the worker runs right after the autograd, to cut the
        call's pipe while the gradient is in but unanswered."""
        cut = CURRENT_PIPE_CUT.get()
        if cut is None or not FAULTS.fire("cut_backward", request.step, request.microbatch):
            return None
        loop, done = asyncio.get_running_loop(), threading.Event()

        def cut_now() -> None:
            cut()
            done.set()

        def in_worker() -> None:
            loop.call_soon_threadsafe(cut_now)
            done.wait(10)

        return in_worker

    async def _settle(self) -> None:
        """Let the backwards still running finish, so the step's record of microbatches is final."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def apply_step(self, request: StepRequest) -> StepReply:
        self._check_stage(request.stage)
        if self.state != PeerState.ONLINE:
            # Leaving, the state is frozen so what a newcomer copies is final; the trainer replays this peer's share.
            raise RequestRefused(NOT_READY, f"peer is {self.state.value}")
        if self.peer_id not in request.group:
            raise RequestRefused(BAD_REQUEST, "this peer is not in the step group")
        async with self._state_lock:
            if self._last_applied == request.step and self._applied_reply is not None:
                return self._applied_reply  # already applied: the caller retried
            self._check_step(request.step)
            await self._adopt_session(request.session)
            await self._settle()
            own, own_ledger = await self._own_grads(request.step)
            others = [p for p in sorted(request.group) if p != self.peer_id]
            grads, ledgers = await self._group_grads(request, others, own, own_ledger)
            # Every replica checks every replica's record against the trainer's before any applies: all of them
            # apply this update or none does, and none sums a microbatch twice or misses one.
            check_ledgers(request, ledgers)
            if others:
                self.grad_norm = await self._apply_traced(request.step, grads)
                # Keep this step's own gradients: a slower replica of the group may still fetch them.
                self._grads_cache = (request.step, own, own_ledger)
            else:  # alone: no replica fetches them, so step on the accumulated gradients in place, uncopied
                self.grad_norm = await self._apply_traced(request.step, None)
                self._grads_cache = None
            self._last_applied = request.step
            self._step_anchored = True
            self.current_step += 1
            self._take_step_proof(request.proof)
            summed = sorted(mb for peer in request.group for mb in ledgers[peer])
            self._applied_reply = StepReply(self.current_step, self.grad_norm, len(summed),
                                            ledger_digest(request.session, summed), summed)
            self._applied_grads, self._input_grads = self._input_grads, {}
            self._kept.clear()  # their graphs saw the weights this step just changed
        if self.state_path is not None and self.current_step % self.state_every == 0:
            self._spawn(self.save_state())
        if time.monotonic() - self._announced_at > STEP_ANNOUNCE_SECONDS:
            self._spawn(self.announce())  # status sees the new step soon; a store per step would cost much CPU
        return self._applied_reply

    def _take_step_proof(self, proof: str) -> None:
        """Keep the trainer's signature of the step this peer is now at; it backs the step claim in announcements."""
        if step_proven(self.spec, self.current_step, proof):
            self.step_proof = proof
        else:
            self.step_proof = ""
            logger.warning(f"stage {self.stage}: the step call carried no valid proof of step {self.current_step}")

    async def _group_grads(self, request: StepRequest, others: list[str], own: list[torch.Tensor],
                           own_ledger: list[int]) -> tuple[list[list[torch.Tensor]], dict[str, list[int]]]:
        """Every replica's gradients in the group's (sorted) order, checked, with each one's record of the
        microbatches summed into them: one broken replica must not poison the rest, and every replica sums in the
        same order, so all of them apply bitwise-identical updates."""
        if not others:
            return [own], {self.peer_id: own_ledger}
        results = await asyncio.gather(
            *[self.client.fetch_grads(p, self.stage, request.step, self.request_timeout, request.session)
              for p in others],
            return_exceptions=True,
        )
        failed = [p for p, r in zip(others, results) if isinstance(r, BaseException)]
        if failed:
            raise RequestRefused(GROUP_FAILED, f"could not fetch gradients from {', '.join(failed)}", failed)
        by_peer = {peer: grads for peer, (grads, _) in zip(others, results)}
        ledgers = {peer: ledger for peer, (_, ledger) in zip(others, results)}
        by_peer[self.peer_id], ledgers[self.peer_id] = own, own_ledger
        for peer, grads in by_peer.items():
            if len(grads) != len(own) or any(g.shape != o.shape for g, o in zip(grads, own)):
                raise RequestRefused(GROUP_FAILED, f"gradients from {peer} do not match this stage", [peer])
            if not all(torch.isfinite(g).all() for g in grads):
                raise RequestRefused(GROUP_FAILED, f"gradients from {peer} hold NaN or Inf values", [peer])
        return [by_peer[p] for p in sorted(request.group)], ledgers

    async def describe(self) -> dict:
        return self.announcement().to_wire()

    async def export_state(self, request: StageRequest) -> StateSnapshot:
        self._check_stage(request.stage)
        if self.state == PeerState.JOINING:  # a LEAVING peer still hands out its (frozen) state
            raise RequestRefused(NOT_READY, f"peer is {self.state.value}")
        async with self._state_lock:
            return await self._compute(snapshot, self.stage, self.current_step, self.grad_norm, self.model,
                                       self.optimizer, request.weights_only, self.step_proof)

    async def export_grads(self, request: StageRequest) -> tuple[list[torch.Tensor], list[int]]:
        """This replica's gradients of a step and the microbatches summed into them."""
        self._check_stage(request.stage)
        if self._grads_cache is not None and self._grads_cache[0] == request.step:
            return self._grads_cache[1], self._grads_cache[2]
        self._check_step(request.step)
        await self._adopt_session(request.session)
        await self._settle()
        return await self._own_grads(request.step)

    def keepable_stages(self) -> set[int]:
        """Whose state copies this peer keeps: the trainer's head (stage 0) and its neighbouring stages'."""
        return {0} | {s for s in (self.stage - 1, self.stage + 1) if 1 <= s <= self.spec.num_stages}

    async def keep_copy(self, state: StateSnapshot, sender: str) -> None:
        if state.stage not in self.keepable_stages():
            raise RequestRefused(BAD_REQUEST, f"stage {self.stage} keeps copies of stages "
                                              f"{sorted(self.keepable_stages())}, not of stage {state.stage}")
        await self._check_sender(state, sender)
        await self._compute(self._check_copy, state)  # a copy nobody could load is refused now, not later
        known = self.kept.get(state.stage)
        if known is None or state.step >= known.step:
            self.kept[state.stage] = state
            self._spawn(self.announce())  # newcomers find kept copies through the announcement

    async def _check_sender(self, state: StateSnapshot, sender: str) -> None:
        """A newcomer may take a kept copy as its exact state, so only its owner may leave one: a trainer of the run
        for the head (stage 0); for a stage, a peer that announces itself on that stage, and only with a signed
        proof of the step the copy claims (protocol/trust.py)."""
        if state.stage == 0:
            if not is_trainer(self.spec, sender):
                raise RequestRefused(UNAUTHORISED, f"{sender} is not a trainer of this run: it may not leave a head "
                                                   "copy")
            return
        announced = (await read_stage_map(self.dht, self.spec)).get(state.stage, [])
        if not any(p.peer_id == sender and p.state in (PeerState.ONLINE, PeerState.LEAVING) for p in announced):
            raise RequestRefused(UNAUTHORISED, f"{sender} does not serve stage {state.stage}: it may not leave a copy "
                                               "of it")
        if not step_proven(self.spec, state.step, state.step_proof):
            raise RequestRefused(UNAUTHORISED, f"the copy of stage {state.stage} claims step {state.step} without a "
                                               "proof signed by a trainer of this run")

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
        """Gradients belong to one trainer session: a new trainer's first request drops what a dead one left behind,
        and so does a trainer that starts a stage's share of a step over (step_book.py)."""
        if session == self._grad_session:
            return
        if self._grad_session or self._input_grads:  # not the first trainer, or one without a session
            dropped = len(self._input_grads) + len(self._running)
            (logger.warning if dropped else logger.info)(
                f"stage {self.stage}: a new trainer session began; dropping {dropped} microbatch(es) of gradients "
                "from the previous one")
        self._grad_session = session
        self._reset_step_buffers()
        await self._compute(self.optimizer.zero_grad, True)


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

    async def _own_grads(self, step: int) -> tuple[list[torch.Tensor], list[int]]:
        """The gradients accumulated this step and the microbatches in them (call `_settle` first)."""
        if self._grads_cache is None or self._grads_cache[0] != step:
            self._grads_cache = (step, await self._compute(flat_grads, self.model), sorted(self._input_grads))
        return self._grads_cache[1], self._grads_cache[2]


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
    def _backward_kept(hidden: torch.Tensor, output: torch.Tensor, grad_output: torch.Tensor,
                       after: Callable[[], None] | None = None) -> torch.Tensor:
        output.backward(grad_output.to(output.device))
        if after is not None:
            after()
        return hidden.grad.cpu()

    def _backward(self, hidden: torch.Tensor, grad_output: torch.Tensor,
                  after: Callable[[], None] | None = None) -> torch.Tensor:
        # Recompute the forward: the backward of a microbatch whose forward ran elsewhere (a retry on another
        # replica, a replay after a replica died) or whose activations were not kept.
        hidden = hidden.to(self.device).requires_grad_(True)
        output = self.model(hidden)
        output.backward(grad_output.to(self.device))
        if after is not None:
            after()
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


def check_ledgers(request: StepRequest, ledgers: dict[str, list[int]]) -> None:
    """Refuse the step if any replica's record of summed microbatches differs from what the trainer gave it."""
    mismatches = group_mismatches(request.ledger, ledgers)
    if mismatches:
        described = "; ".join(f"{peer}: {diff.describe()}" for peer, diff in sorted(mismatches.items()))
        raise RequestRefused(LEDGER_MISMATCH, f"the replicas' records of step {request.step} differ from the "
                                              f"trainer's: {described}", sorted(mismatches))

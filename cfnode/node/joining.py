"""How a stage peer obtains its weights: an exact copy of a replica or of a hand-over, else a rebuild from the
neighbouring stages (CheckFree and its variants, see recovery.rebuild), refitted on cached activations; and how a
replica that fell behind copies an up-to-date one again."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable, Sequence

from hivemind.utils.logging import get_logger

from cfnode.faults import FAULTS
from cfnode.hf.init_from import initial_state
from cfnode.model import build_body_stage
from cfnode.node.claims import read_claims
from cfnode.node.discovery import live_stage_map, wait_for_live_stage
from cfnode.node.stage_state import load_snapshot, make_optimizer, model_state
from cfnode.node.swarm_map import StageMap, merge_stage_maps, online, read_progress, read_trainers, swarm_step
from cfnode.protocol.messages import (
    ProtocolError,
    StateSnapshot,
)
from cfnode.protocol.records import PeerState, StageAnnouncement
from cfnode.protocol.trust import step_proven
from cfnode.protocol.validation import validate_hidden
from cfnode.recovery.rebuild import plan_rebuild, rebuild_weights, source_weights
from cfnode.recovery.refit import refit, refits

logger = get_logger(__name__)

SECOND_LOOK_SECONDS = 2.0  # between the two looks that find a stage of a trained run lost
FIRST_WAIT_SLACK = 120.0  # beyond the refit budget: how long a newcomer waits for the one ahead of it to serve


class Joining:
    """The joining half of StagePeer (its state lives there)."""

    async def obtain_weights(self, stage_map: StageMap, ahead: Sequence[str] = ()) -> None:
        """Copy a replica exactly if there is one (a leaving one counts: it waits to hand its state over), else an
        exact copy a leaving last peer left with a neighbour, else rebuild the stage (see recovery.rebuild).

        `ahead`: newcomers that took this stage before this one. While one of them is still obtaining the stage's
        weights this one waits and copies it, so racing newcomers end up as replicas, not as independent rebuilds.
        """
        if ahead and not self._replicas(stage_map):
            stage_map = await self._wait_for_first(stage_map, ahead)
        if not self._replicas(stage_map) and swarm_step(stage_map, self.spec) > 0:
            # A second look before concluding the stage is lost: a view taken while the DHT is slow, or just after
            # this node connected, can miss live replicas, and a rebuild would start a second, diverging copy.
            await asyncio.sleep(SECOND_LOOK_SECONDS)
            second = await live_stage_map(self.dht, self.spec, self.client, unanswered=self.unanswered)
            stage_map = merge_stage_maps(stage_map, second, self.spec.announce_ttl)
        timeout = self.request_timeout * 4
        replicas = self._replicas(stage_map)
        random.shuffle(replicas)
        replicas.sort(key=lambda p: -p.step)
        if await self._copy_exact(replicas, "replica",
                                  lambda p: self.client.download_state(p.peer_id, self.stage, timeout)):
            return
        # A stage that left mid-step is one step behind the others (they applied the step it refused, and the
        # trainer replays its share on the newcomer): a copy one step behind the swarm is current.
        current = swarm_step(stage_map, self.spec) - 1

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

    def _replicas(self, stage_map: StageMap) -> list[StageAnnouncement]:
        return [p for p in stage_map.get(self.stage, [])
                if p.state in (PeerState.ONLINE, PeerState.LEAVING) and p.peer_id != self.peer_id]

    async def _wait_for_first(self, stage_map: StageMap, ahead: Sequence[str]) -> StageMap:
        """Wait until a replica of this stage serves (to copy it) or every newcomer ahead of this one has gone."""
        started = logged = time.monotonic()
        deadline = started + self.spec.refit_seconds + FIRST_WAIT_SLACK
        gone: set[str] = set()  # announced and then stopped answering: its claim may linger, but it is not ahead
        while not self._replicas(stage_map):
            joining = {p.peer_id for p in stage_map.get(self.stage, []) if p.state == PeerState.JOINING}
            claiming = {c.peer_id for c in await read_claims(self.dht, self.spec)
                        if c.stage in (0, self.stage) and c.peer_id not in gone}
            waiting_on = [p for p in ahead if p in joining | claiming]
            now = time.monotonic()
            if not waiting_on:
                logger.info(f"stage {self.stage}: the newcomers ahead of this one are gone; obtaining the weights "
                            "without them")
                break
            if now > deadline:
                logger.warning(f"stage {self.stage}: {waiting_on[0]} has not served after {now - started:.0f} s; "
                               "obtaining the weights without it")
                break
            if now - logged >= 10.0 or logged == started:
                logged = now
                logger.info(f"stage {self.stage}: waiting for {waiting_on[0]}, which took this stage first, to "
                            f"serve, so as to copy it ({now - started:.0f} s so far)")
            await asyncio.sleep(1.0)
            stage_map = await live_stage_map(self.dht, self.spec, self.client, unanswered=gone)
        return stage_map

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
        progress = await read_progress(self.dht, self.spec)
        reached = max(swarm_step(stage_map, self.spec), progress.step if progress else 0)
        trained = reached > 0
        live = {s for s, peers in stage_map.items() if s != self.stage and online(peers)}
        if trained and not live and self.spec.num_stages > 1:
            stage_map = await wait_for_live_stage(self.dht, self.spec, self.client, reached, besides=self.stage)
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
        if plan.kind == "fresh":  # the run's starting weights: the seed's, or its checkpoint's
            fresh = await self._compute(initial_state, self.spec, self.stage, self.init_from)
        else:  # "random" recovery starts a lost stage over from the seed (the paper's baseline)
            fresh = build_body_stage(self.spec, self.stage).state_dict() if not plan.sources else {}
        new_state = await self._compute(rebuild_weights, plan, [model_state(s) for s in snapshots], norms, fresh)
        async with self._state_lock:
            await self._compute(self.model.load_state_dict, new_state)
            await self._compute(self.model.zero_grad, True)
            # A rebuilt stage starts a fresh optimiser, at a slightly higher learning rate (the paper's x1.1).
            lr = self.spec.lr * (self.spec.lr_scale if plan.kind not in ("fresh",) else 1.0)
            self.optimizer = make_optimizer(self.model, self.spec, lr=lr)
            # The step of the sources, where a trainer's proof backs it; a source's unproven claim is ignored.
            proven = [snap for snap in snapshots if step_proven(self.spec, snap.step, snap.step_proof)]
            newest = max(proven, key=lambda snap: snap.step, default=None)
            self.current_step = newest.step if newest else swarm_step(stage_map, self.spec)
            self.step_proof = newest.step_proof if newest else ""
            self.grad_norm = None
            self._reset_step_buffers()
        if FAULTS.fire("slow_rebuild", 0, 0):
            await asyncio.sleep(FAULTS.delay)
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
        if not refits(plan.kind):  # fresh weights (recovery none or random, an untrained swarm) are not refitted
            self.refit_report = {"skipped": f"{plan.kind} weights are not refitted"}
        elif self.spec.refit_cache:
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
        logged = [started]

        def progress(steps: int, best: float) -> None:  # on the compute thread; a long refit says how it goes
            if time.perf_counter() - logged[0] >= 5.0:
                logged[0] = time.perf_counter()
                logger.info(f"stage {self.stage}: refitting, {steps} of at most {self.spec.refit_steps} steps, "
                            f"held-out loss {best:.5g}, {logged[0] - started:.0f} of at most "
                            f"{self.spec.refit_seconds:.0f} s")

        async with self._state_lock:
            result = await self._compute(functools.partial(refit, max_seconds=self.spec.refit_seconds,
                                                           progress=progress),
                                         self.model, pairs, self.spec.refit_steps, self.spec.refit_lr)
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
            # Gradients a backward added before this load belong to the old weights (the worker ran it first).
            await self._compute(self.model.zero_grad, True)
            self.current_step, self.grad_norm = state.step, state.grad_norm
            self.step_proof = state.step_proof
            self._reset_step_buffers()


    async def check_in_the_run(self) -> None:
        """A peer that serves fresh weights at step 0 while the run's progress says the run trained joined on a
        partial view: it serves a swarm of its own (an island), which the trainer may never call. It rejoins."""
        if (self.state != PeerState.ONLINE or self._step_anchored or self.source != "fresh"
                or self.current_step != 0):
            return
        progress = await read_progress(self.dht, self.spec)
        if progress is not None and progress.step > 0:
            self._start_resync(progress.step)

    def _start_resync(self, target_step: int) -> None:
        if self._resync_task is None or self._resync_task.done():
            self._resync_task = self._spawn(self._resync(target_step))

    async def _resync(self, target_step: int) -> None:
        """This replica fell behind (it missed a step), or it served weights of its own that the trainer's swarm
        never trained (an island): stop serving (JOINING) and take the swarm's state, as a newcomer would."""
        if self.source == "fresh" and not self._step_anchored:
            logger.warning(f"stage {self.stage}: serving fresh weights at step {self.current_step}, but the "
                           f"trainer's swarm is at step {target_step}: this peer was outside it; joining it properly")
        else:
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
                        self.current_step, self.step_proof = target_step, ""  # proven at its next step
                        self._reset_step_buffers()
                    self._step_anchored = True
            else:
                # No replica holds the newer weights: this copy is the best the swarm has; carry on from it.
                logger.warning(f"stage {self.stage}: no replica at step {target_step}; continuing from own weights")
                async with self._state_lock:
                    self.current_step, self.step_proof = target_step, ""  # proven at its next step
                    self._reset_step_buffers()
        finally:
            self.state = PeerState.ONLINE
            await self.announce()

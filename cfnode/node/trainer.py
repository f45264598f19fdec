"""`cfnode train`: drives microbatches through the body stages and back, steps every stage, logs the run.

The trainer holds the token embedding, final norm and LM head (the paper's stage 0). For each step it
runs all microbatches concurrently, so different stages work on different microbatches at once; each
call goes to the least loaded usable replica of its stage, and a failed call moves to another one (stage_calls.py).
The inputs and output gradients sent to each stage are kept until the step is applied, so a replica
that dies before the step can have its share of the gradient replayed on a survivor: no microbatch is
silently dropped.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import hivemind
import torch
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.logging import get_logger

from cfnode.config import RunSpec, TrainConfig
from cfnode.data import TextDataset, batch_generator, load_run_dataset, load_run_tokenizer
from cfnode.hf.init_from import initial_state
from cfnode.model import build_head
from cfnode.node.events import EventLog
from cfnode.node.metrics import TrainerMetrics, serving
from cfnode.node.routing import Router
from cfnode.node.stage_calls import StageCalls, TrainerError, describe_error
from cfnode.node.stage_state import load_snapshot, load_state_file, save_state_file, snapshot
from cfnode.node.step_book import SentBackward, StepBook
from cfnode.node.stepping import Stepping
from cfnode.node.swarm_map import swarm_step
from cfnode.protocol.identity import Identity
from cfnode.protocol.keys import progress_key, trainer_key
from cfnode.protocol.messages import (
    BAD_REQUEST,
    NO_ACTIVATIONS,
    BackwardRequest,
    ForwardRequest,
    ProtocolError,
    RemoteError,
    StageRequest,
    StepReply,
)
from cfnode.protocol.records import PROGRESS_TTL, RunProgress, TrainerAnnouncement
from cfnode.protocol.service import RequestRefused, StageClient, TrainerService
from cfnode.protocol.timing import add_time, collecting, run_timed, timed
from cfnode.protocol.trust import is_trainer, sign_step
from cfnode.protocol.validation import validate_hidden
from cfnode.recovery.refit import ActivationCache
from cfnode.recovery.schedule import microbatch_routes

logger = get_logger(__name__)
T = TypeVar("T")



class Trainer(Stepping, StageCalls):
    def __init__(self, config: TrainConfig, spec: RunSpec, dht: hivemind.DHT, p2p: P2P, dataset: TextDataset,
                 identity: Identity | None = None):
        self.config, self.spec = config, spec
        self.dht, self.identity = dht, identity
        self.dataset = dataset
        self.device = torch.device(config.device)
        self.head = build_head(spec).to(self.device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=spec.lr, weight_decay=spec.weight_decay,
                                           betas=(0.9, 0.95))
        self.router = Router(dht, spec, config.ban_seconds)
        self.client = StageClient(p2p, spec.max_message_bytes, spec.wire_dtype, pipe=config.pipe, spec=spec)
        self.p2p_peer_id = p2p.peer_id.to_base58()
        self.events = EventLog(config.log_jsonl)
        self.metrics = TrainerMetrics()
        self.events.listeners.append(self.metrics.on_event)
        self.step = 0
        self.grad_norms: dict[int, float] = {}
        self.session = secrets.token_hex(8)  # tells stage peers which trainer's gradients they accumulate
        self.book = StepBook(self.session, spec.num_stages, config.microbatches)  # who holds which gradient
        self.ledger_checks = 0  # stage steps whose summed microbatches were checked and found exact
        self._step_proof = ""  # this trainer's signature of the step being applied (protocol/trust.py)
        self._backwards_in_flight: dict[int, dict[int, asyncio.Event]] = {}  # stage -> microbatch -> set when done
        self._known_step: dict[str, int] = {}  # peer -> step it confirmed (fresher than its announcement)
        self._lost_since: dict[int, float] = {}  # stage -> when it was found without a usable peer
        self._lost_logged: dict[int, float] = {}  # stage -> when its wait was last logged
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="trainer-compute")
        self._stepping: asyncio.Future | None = None  # the step in progress, microbatches to applied
        self._stage_steps: dict[int, asyncio.Future] = {}  # stage -> applying this step there, once started
        # Each stage's last refit_cache (input, output) microbatch pairs, for a newcomer that rebuilds it to refit.
        self.activations = ActivationCache(spec.refit_cache)

    # --- the run -------------------------------------------------------------------------------------------

    async def run(self) -> dict:
        refresher = asyncio.create_task(self.router.refresh_forever())
        announcer = asyncio.create_task(self._announce_forever()) if self.identity else None
        try:
            self._check_authorised()
            await self._wait_for_all_stages()
            self.step = swarm_step(self.router.stage_map, self.spec)
            if self.step > 0:
                await self._restore_head()
            elif self.spec.init_digests:  # a run started from a checkpoint starts from its embedding and head
                await self._start_head_from_checkpoint()
            first_step, last_loss, val_loss = self.step, float("nan"), None
            logger.info(f"training steps {self.step + 1}..{self.step + self.config.steps} over "
                        f"{self.spec.num_stages} stages; {self.dataset.train_tokens:,} training tokens")
            self.events.emit("train_started", step=self.step, steps=self.config.steps,
                             num_stages=self.spec.num_stages)
            while self.step < first_step + self.config.steps:
                started = time.perf_counter()
                with collecting({}) as timing:
                    last_loss = await self.train_step()
                elapsed = time.perf_counter() - started
                tokens = self.config.batch_size * self.spec.seq_len
                done = self.step - first_step
                record = dict(step=self.step, loss=round(last_loss, 5), tokens=tokens,
                              step_time=round(elapsed, 4), tokens_per_s=round(tokens / elapsed, 1),
                              grad_norms={str(s): round(n, 5) for s, n in self.grad_norms.items()},
                              time_split=time_split(timing))
                val_text = ""
                if (self.config.eval_every and done % self.config.eval_every == 0) or done == self.config.steps:
                    val_loss = await self.evaluate()
                    record["val_loss"] = round(val_loss, 5)
                    val_text = f" | val loss {val_loss:.4f}"
                self.events.emit("step", **record)
                logger.info(f"step {done}/{self.config.steps} (swarm step {self.step}) | loss {last_loss:.4f} | "
                            f"{tokens / elapsed:,.0f} tok/s{val_text}")
            if self.spec.head_copy_every and self.step % self.spec.head_copy_every != 0:
                await self._copy_head_to_edges()  # the edges hold the final head too: `cfnode export` takes it
            try:  # the last step too: the progress a restarted bootstrap keeps is then the run's final step
                await self._publish_progress()
            except Exception as e:
                logger.warning(f"publishing the run's final progress failed: {e}")
            summary = dict(final_step=self.step, loss=last_loss, val_loss=val_loss, ledger_checks=self.ledger_checks,
                           step_mismatches=self.events.counts.get("step_mismatch", 0), events=dict(self.events.counts))
            self.events.emit("train_finished", **{k: v for k, v in summary.items() if k != "events"})
            return summary
        finally:
            refresher.cancel()
            if announcer is not None:
                announcer.cancel()
            await self._finish_step()
            if self.step > 0 and (self._stepping is None or self._stepping.done()):
                try:
                    await self._save_own_state()
                except Exception as e:
                    logger.warning(f"could not save the trainer state to {self.config.state_path}: {e}")
            await self.client.close()
            self.events.close()
            self._worker.shutdown(wait=False, cancel_futures=True)

    async def train_step(self) -> float:
        inputs, targets = self.dataset.sample_batch(self.config.batch_size,
                                                    batch_generator(self.config.seed, self.step + 1))
        # Once a stage has applied the step, the step runs to its end even if this trainer is stopped meanwhile
        # (SIGTERM), so the stages, the head and the step count never disagree in what it leaves behind.
        self._stepping = asyncio.ensure_future(self._run_step(inputs, targets))
        losses = await asyncio.shield(self._stepping)
        with collecting({}):  # housekeeping, not the step's own calls: left out of its time_split
            if self.spec.head_copy_every and self.step % self.spec.head_copy_every == 0:
                await self._copy_head_to_edges()
            if self.config.state_path and self.step % self.config.state_every == 0:
                await self._save_own_state()
        return sum(losses) / len(losses)

    async def _run_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        """The microbatches of one step, then the step applied at every stage and the head."""
        self.book.start()
        if self.identity is not None:
            self._step_proof = sign_step(self.identity, self.spec.run_id, self.step + 1)
        self._backwards_in_flight = {s: {} for s in range(1, self.spec.num_stages + 1)}
        self._stage_steps = {}
        chunks = zip(inputs.chunk(self.config.microbatches), targets.chunk(self.config.microbatches))
        routes = microbatch_routes(self.spec.num_stages, self.config.microbatches, self.spec.recovery,
                                   self.spec.swap_fraction)
        try:
            losses = await asyncio.gather(*[self._microbatch(i, x, y, route)
                                            for i, ((x, y), route) in enumerate(zip(chunks, routes))])
        except Exception:
            # The stages that were applying the step finish it: their gradients are complete.
            await asyncio.gather(*self._stage_steps.values(), return_exceptions=True)
            raise
        with timed("apply_step"):
            await asyncio.gather(*self._stage_steps.values(), self._compute(self._step_head))
        self.step += 1
        return losses

    async def evaluate(self) -> float:
        losses = []
        for inputs, targets in self.dataset.val_batches(self.config.batch_size, self.config.eval_batches):
            hidden = await self._compute(self._embed, inputs, False)
            for stage in range(1, self.spec.num_stages + 1):
                _, (hidden, _) = await self._forward(stage, 0, hidden)
            losses.append(await self._compute(self._loss_only, hidden, targets))
        return sum(losses) / len(losses)

    # --- one microbatch ------------------------------------------------------------------------------------

    async def _microbatch(self, index: int, inputs: torch.Tensor, targets: torch.Tensor, route: list[int]) -> float:
        """Forward through the stages in `route` order (1..S, or CheckFree+'s swap), then backward in reverse."""
        embedded = await self._compute(self._embed, inputs, True)  # keeps its graph for the embedding's grad
        hidden = embedded.detach()
        stage_inputs: dict[int, torch.Tensor] = {}
        kept_by: dict[int, str | None] = {}  # the peer that ran each stage's forward and kept its activations
        for stage in route:
            stage_inputs[stage] = hidden
            peer, (hidden, kept) = await self._forward(stage, index, hidden, keep=True)
            kept_by[stage] = peer if kept else None
            self.activations.record(stage, stage_inputs[stage], hidden)  # in the order the stage ran them
        loss, grad = await self._compute(self._head_backward, hidden, targets)
        for stage in reversed(route):
            hidden_in = stage_inputs[stage]
            done = self._backwards_in_flight[stage][index] = asyncio.Event()
            ride: asyncio.Future[tuple[str, StepReply | None]] | None = None
            try:
                step_group = await self._step_rides_on(stage, index)
                if step_group is not None:  # the step has begun: a stop from now on lets it finish (_finish_step)
                    ride = asyncio.get_running_loop().create_future()
                    self._stage_steps[stage] = asyncio.ensure_future(self._step_stage(stage, ride))
                peer, (grad_in, stepped) = await self._backward(stage, index, hidden_in, grad, kept_by[stage],
                                                                step_group)
            except BaseException:
                if ride is not None:
                    ride.cancel()  # the stage's gradients are incomplete: its step must not be applied
                raise
            finally:
                done.set()
            self.book[stage].sent[index] = SentBackward(peer, hidden_in, grad)
            if ride is not None:
                ride.set_result((peer, stepped))
            self._backward_done(stage)
            grad = grad_in
        await self._compute(lambda: embedded.backward(grad.to(self.device)))
        return loss

    async def _forward(self, stage: int, microbatch: int, hidden: torch.Tensor,
                       keep: bool = False) -> tuple[str, tuple[torch.Tensor, bool]]:
        """(peer, (output, whether that peer kept the activations)) of a forward on some peer of the stage."""
        request = ForwardRequest(stage, self.step, microbatch, hidden, keep)

        async def call(peer: str) -> tuple[torch.Tensor, bool]:
            reply = await self.client.forward(peer, request, self.config.request_timeout)
            return self._check_reply(reply.output, hidden.shape, "output", stage), reply.kept

        return await self._call(stage, "forward", call)

    async def _backward(self, stage: int, microbatch: int, hidden: torch.Tensor, grad_output: torch.Tensor,
                        kept_by: str | None = None, step_group: list[str] | None = None,
                        avoid: set[str] = frozenset()) -> tuple[str, tuple[torch.Tensor, StepReply | None]]:
        """(peer, (input gradient, the step it applied along with the backward, if asked to in step_group)).
        The peer that kept this microbatch's forward activations gets only the gradient. Any other peer (a retry
        elsewhere, a replay), or one that has dropped them since, gets the input to recompute from. `avoid`: replicas
        not to send it to (tainted ones, for a replay)."""
        session = self.book.session(stage)
        ledger = {step_group[0]: list(range(self.config.microbatches))} if step_group else None
        with_input = BackwardRequest(stage, self.step, microbatch, hidden, grad_output, session, step_group, ledger,
                                     self._step_proof)
        without_input = BackwardRequest(stage, self.step, microbatch, None, grad_output, session, step_group, ledger,
                                        self._step_proof)

        async def call(peer: str) -> tuple[torch.Tensor, StepReply | None]:
            self.book.tried(stage, microbatch, peer)  # from now on the peer may hold this gradient
            if peer == kept_by:
                try:
                    reply = await self.client.backward(peer, without_input, self.config.request_timeout)
                except RemoteError as e:
                    if e.code != NO_ACTIVATIONS:
                        raise
                    reply = await self.client.backward(peer, with_input, self.config.request_timeout)
            else:
                reply = await self.client.backward(peer, with_input, self.config.request_timeout)
            if reply.step_refused is not None:
                logger.debug(f"stage {stage} peer {peer} did not apply the step with its backward: "
                             f"{reply.step_refused}")
            return self._check_reply(reply.grad_input, hidden.shape, "input gradient", stage), reply.stepped

        return await self._call(stage, "backward", call, avoid)

    def _check_reply(self, tensor: torch.Tensor, shape: torch.Size, what: str, stage: int) -> torch.Tensor:
        """A reply with the wrong shape or NaN / Inf is a failure of that peer: the call moves to another."""
        checked = validate_hidden(tensor, self.spec, f"stage {stage} {what}")
        if checked.shape != shape:
            raise ProtocolError(f"stage {stage} {what} has shape {tuple(checked.shape)}, expected {tuple(shape)}")
        return checked

    def _check_authorised(self) -> None:
        """Stage peers take training calls only from the trainers the signed run spec names: fail fast, and say how
        to fix it, rather than have every call refused."""
        if not is_trainer(self.spec, self.p2p_peer_id) or self.identity is None:
            raise TrainerError(
                f"this trainer ({self.p2p_peer_id}) is not one the run {self.spec.run_id!r} authorises. Start it with "
                "--identity FILE, naming the identity file the bootstrap was given with --trainer FILE")

    # --- copies of the embedding and head at the edge stages ----------------------------------------------

    def _edge_peers(self) -> list[tuple[int, str]]:
        edges = sorted({1, self.spec.num_stages})
        return [(stage, p.peer_id) for stage in edges for p in self.router.usable(stage)]

    async def _copy_head_to_edges(self) -> None:
        """Leave the embedding, final norm and head (with their optimiser state) with the peers of stages 1 and S,
        so a trainer that starts after this one dies continues from them instead of from scratch."""
        state = await self._compute(snapshot, 0, self.step, self.grad_norms.get(0), self.head, self.optimizer)
        peers = self._edge_peers()
        results = await asyncio.gather(*[self.client.put_copy(peer, state, self.config.request_timeout)
                                         for _, peer in peers], return_exceptions=True)
        stored = [f"{stage}:{peer}" for (stage, peer), r in zip(peers, results) if not isinstance(r, BaseException)]
        for (stage, peer), result in zip(peers, results):
            if isinstance(result, BaseException):
                logger.warning(f"copying the head to stage {stage} peer {peer} failed: {describe_error(result)}")
        self.events.emit("head_copied", step=self.step, peers=stored)

    # --- cached activations, for refits ----------------------------------------------------------------------

    def cache_bytes_estimate(self, config: TrainConfig) -> int:
        """The activation cache at its fullest: K pairs of two (B/M, T, C) float32 tensors for each stage."""
        per_microbatch = config.batch_size // config.microbatches * self.spec.seq_len * self.spec.hidden_size * 4
        return self.spec.num_stages * self.spec.refit_cache * 2 * per_microbatch

    async def _announce_forever(self) -> None:
        """Tell newcomers where the cached activations are (a signed record under the run's trainer key, when the
        spec caches some) and how far the run has come (its progress, with this trainer's proof)."""
        while True:
            try:
                if self.spec.refit_cache:
                    record = TrainerAnnouncement(self.p2p_peer_id, self.step, self.spec.refit_cache,
                                                 round(get_dht_time(), 3))
                    await self.dht.store(trainer_key(self.spec.run_id), record.to_wire(),
                                         get_dht_time() + self.spec.announce_ttl, subkey=self.identity.owner_subkey,
                                         return_future=True)
                await self._publish_progress()
            except Exception as e:  # the DHT may hiccup; the next round retries
                logger.warning(f"announcing the trainer failed: {e}")
            await asyncio.sleep(self.spec.announce_ttl / 4)

    async def _publish_progress(self) -> None:
        """The run's progress: once it trained, newcomers must never take a view without stages as a new run."""
        if self.step > 0 and self.identity is not None:
            progress = RunProgress(self.step, sign_step(self.identity, self.spec.run_id, self.step),
                                   round(get_dht_time(), 3))
            await self.dht.store(progress_key(self.spec.run_id), progress.to_wire(), get_dht_time() + PROGRESS_TTL,
                                 subkey=self.identity.owner_subkey, return_future=True)

    async def export_activations(self, request: StageRequest) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        if not 1 <= request.stage <= self.spec.num_stages:
            raise RequestRefused(BAD_REQUEST, f"stage {request.stage} does not exist")
        return self.step, self.activations.pairs(request.stage)

    async def _finish_step(self) -> None:
        """Stopped mid-step. Before any stage applied it, drop the step: nothing changed yet. After, let it finish
        (bounded), so the saved state is consistent."""
        if self._stepping is None or self._stepping.done():
            return
        if not self._stage_steps:
            self._stepping.cancel()
            await asyncio.gather(self._stepping, return_exceptions=True)
            return
        logger.info("finishing the step being applied before stopping")
        try:
            await asyncio.wait_for(asyncio.shield(self._stepping), 2 * self.config.request_timeout)
        except Exception as e:
            logger.warning(f"the step did not finish: {type(e).__name__}: {e}")

    async def _save_own_state(self) -> None:
        if self.config.state_path is None:
            return
        state = await self._compute(snapshot, 0, self.step, self.grad_norms.get(0), self.head, self.optimizer)
        await self._compute(save_state_file, state, self.config.state_path, self.spec)

    async def _restore_head(self) -> None:
        """Continue from the newest copy of the embedding and head: this trainer's own state file or the copies
        the edge stages hold. Copies from beyond the swarm's step (it lost progress since) come last."""
        peers = self._edge_peers()
        results = await asyncio.gather(*[self.client.get_copy(peer, 0, self.config.request_timeout)
                                         for _, peer in peers], return_exceptions=True)
        copies = [(r, f"{stage}:{peer}") for (stage, peer), r in zip(peers, results)
                  if not isinstance(r, BaseException)]
        if self.config.state_path is not None and os.path.exists(self.config.state_path):
            try:
                copies.append((load_state_file(self.config.state_path, self.spec.run_id), "own state file"))
            except ProtocolError as e:
                logger.warning(f"ignoring the trainer state file: {e}")
        for state, source in sorted(copies, key=lambda c: (c[0].step > self.step, -c[0].step)):
            try:
                await self._compute(load_snapshot, state, self.head, self.optimizer)
            except ProtocolError as e:
                logger.warning(f"head copy from {source} does not fit this run: {e}")
                continue
            logger.info(f"restored the embedding and head from {source} (copied at step {state.step}; "
                        f"the swarm is at step {self.step})")
            self.events.emit("head_restored", step=self.step + 1, source=source, copied_at=state.step)
            return
        if self.spec.init_digests:
            logger.warning(f"the swarm is at step {self.step} but no edge stage holds a copy of the embedding and "
                           "head; starting them from the checkpoint the run started from")
            await self._start_head_from_checkpoint()
            return
        logger.warning(f"the swarm is at step {self.step} but no edge stage holds a copy of the embedding and head; "
                       "starting them from the run spec's seed")

    async def _start_head_from_checkpoint(self) -> None:
        state = await self._compute(initial_state, self.spec, 0, self.config.init_from)
        await self._compute(self.head.load_state_dict, state)

    # --- local compute (one worker thread: the head's autograd is not shared between threads) --------------

    async def _compute(self, fn: Callable[..., T], *args) -> T:
        submitted = time.perf_counter()
        result, started, finished = await asyncio.get_running_loop().run_in_executor(self._worker, run_timed, fn,
                                                                                     *args)
        add_time("head_queue", started - submitted)
        add_time("head_compute", finished - started)
        return result

    def _embed(self, tokens: torch.Tensor, with_grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(with_grad):
            return self.head.embed(tokens.to(self.device))

    def _head_backward(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
        hidden = hidden.to(self.device).requires_grad_(True)
        loss = self.head.loss(hidden, targets.to(self.device))
        (loss / self.config.microbatches).backward()
        return float(loss.detach()), hidden.grad.cpu()

    def _loss_only(self, hidden: torch.Tensor, targets: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self.head.loss(hidden.to(self.device), targets.to(self.device)))

    def _step_head(self) -> None:
        norm = torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.spec.grad_clip)
        self.grad_norms[0] = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_split(timing: dict[str, float]) -> dict[str, float]:
    """A step's call time by where it went, in seconds summed over all calls (concurrent calls overlap, so the
    sum exceeds the step's wall time): compute at the stages and at the trainer's head, the wait for a stage's
    compute worker, (de)serialisation on both sides, and the rest of each call's round trip: the transfer
    (both p2p daemons, the network, the reply's encoding at the stage and each side's event loop). Then, in wall
    time, `apply_step`: from the end of the last microbatch until the step is applied at every stage and the head
    (a stage starts applying it once its own last backward is in, often while the microbatches still run)."""
    stage_side = sum(timing.get(f"stage_{kind}", 0.0) for kind in ("decode", "queue", "compute"))
    local_side = timing.get("encode", 0.0) + timing.get("decode", 0.0)
    split = dict(stage_compute=timing.get("stage_compute", 0.0), head_compute=timing.get("head_compute", 0.0),
                 stage_queue=timing.get("stage_queue", 0.0),
                 serialization=local_side + timing.get("stage_decode", 0.0),
                 transfer=max(0.0, timing.get("call", 0.0) - stage_side - local_side),
                 calls=timing.get("call", 0.0), apply_step=timing.get("apply_step", 0.0))
    return {kind: round(seconds, 4) for kind, seconds in split.items()}


def load_dataset(config: TrainConfig, spec: RunSpec) -> TextDataset:
    """The trainer's data with the run's tokenizer: a tokenizer file that is not the one the spec pins, or prepared
    tokens made with another tokenizer, are refused (DataError) before any training."""
    tokenizer = load_run_tokenizer(spec, config.tokenizer_path)
    return load_run_dataset(spec, tokenizer, config.data_path)


async def run_train(config: TrainConfig) -> dict:
    from cfnode.node.runtime import connect
    from cfnode.node.swarm_map import read_spec

    async with connect(config.network) as (dht, p2p, identity):
        spec = await read_spec(dht, config.network)
        dataset = load_dataset(config, spec)
        trainer = Trainer(config, spec, dht, p2p, dataset, identity)
        service = TrainerService(trainer)
        if spec.refit_cache:
            await service.add_p2p_handlers(p2p)
            logger.info(f"keeping the last {spec.refit_cache} activation pairs of each stage for refits "
                        f"(about {trainer.cache_bytes_estimate(config) / 2**20:.1f} MiB)")
        with serving(trainer.metrics.registry, config.network.host, config.metrics_port):
            summary = await trainer.run()
        if not math.isfinite(summary["loss"]):
            raise TrainerError("training produced a non-finite loss")
        return summary

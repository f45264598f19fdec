"""A stage peer: one replica of a body stage. It serves the stage's forward, backward and step over RPC
(serving.py), obtains its weights on joining (joining.py), hands its state over on a clean leave (leaving.py)
and announces itself on the DHT (here). This module holds the state all of them share.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import hivemind
import torch
from hivemind.utils import get_dht_time
from hivemind.utils.logging import get_logger

from cfnode.config import RunSpec
from cfnode.model import build_body_stage
from cfnode.node.joining import Joining
from cfnode.node.leaving import Leaving
from cfnode.node.serving import Serving
from cfnode.node.stage_state import make_optimizer, save_state_file, snapshot
from cfnode.node.trace import ComputeTrace
from cfnode.protocol.identity import Identity
from cfnode.protocol.keys import stage_key
from cfnode.protocol.limits import max_copy_bytes
from cfnode.protocol.messages import (
    StateSnapshot,
    StepReply,
)
from cfnode.protocol.records import PeerState, StageAnnouncement
from cfnode.protocol.service import StageClient

logger = get_logger(__name__)
T = TypeVar("T")



class ThroughputMeter:
    """Tokens per second of compute time, smoothed: the peer's capacity, for stage choice and routing."""

    def __init__(self, smoothing: float = 0.9):
        self.smoothing = smoothing
        self.value = 0.0

    def record(self, tokens: int, seconds: float) -> None:
        rate = tokens / max(seconds, 1e-6)
        self.value = rate if self.value == 0 else self.smoothing * self.value + (1 - self.smoothing) * rate


def dialable_maddrs(dht: hivemind.DHT, peer_id: str, limit: int = 8) -> list[str]:
    """The multiaddrs other peers can dial this one at, each ending in /p2p/<peer id> (hivemind 1.1.12 appends it;
    added here where missing), at most `limit` (what a stage announcement carries). Asked once: the DHT process
    answers from the p2p daemon's listen and announce addresses, which do not change while it runs."""
    try:
        found = [str(m) for m in dht.get_visible_maddrs()]
    except Exception as e:  # no address (a client-mode DHT) or a DHT hiccup: the peer works, it just lists none
        logger.warning(f"could not read this peer's addresses, announcing none: {e}")
        return []
    suffix = f"/p2p/{peer_id}"
    full = [m if m.endswith(suffix) else m.rstrip("/") + suffix for m in found]
    return [m for m in dict.fromkeys(full) if len(m) <= 256][:limit]


class StagePeer(Joining, Serving, Leaving):
    """One replica of body stage `stage`: the StageBackend behind StageService."""

    def __init__(self, spec: RunSpec, stage: int, identity: Identity, dht: hivemind.DHT, client: StageClient,
                 device: str = "cpu", request_timeout: float = 30.0, keep_activations: int = 16,
                 trace: ComputeTrace | None = None, init_from: str | None = None, state_path: str | None = None,
                 state_every: int = 10):
        self.spec, self.stage, self.identity = spec, stage, identity
        self.init_from = init_from  # a local copy of the checkpoint the run started from, if it did
        self.state_path, self.state_every = state_path, state_every  # this replica's saved state, for exports
        self.peer_id = identity.peer_id.to_base58()
        self.dht, self.client = dht, client
        self.maddrs = dialable_maddrs(dht, self.peer_id)  # announced: newcomers may join the swarm through this peer
        self.device = torch.device(device)
        self.request_timeout = request_timeout
        self.trace = trace  # compute calls with their wall-clock times, for pipeline timelines
        self.max_request_bytes = spec.max_message_bytes
        self.model = build_body_stage(spec, stage).to(self.device)
        self.optimizer = make_optimizer(self.model, spec)
        self.max_copy_bytes = max_copy_bytes(spec)  # a head's or a stage's state (protocol/limits.py)
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
        # (step, gradients summed over this peer's microbatches, those microbatches): its share of a group's step
        self._grads_cache: tuple[int, list[torch.Tensor], list[int]] | None = None
        # microbatch -> its backward, from the moment it starts until its gradient is recorded in _input_grads
        self._running: dict[int, asyncio.Future[torch.Tensor]] = {}
        self._buffer_epoch = 0  # bumped whenever the step's gradients are dropped; a backward finishing later is void
        self._applied_reply: StepReply | None = None  # the last applied step's reply, for a retried step call
        self.step_proof = ""  # the trainer's signature of current_step (protocol/trust.py)
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
        self.claimed_at = 0.0  # DHT time of this newcomer's join claim (join.py sets it): its place in the queue
        self.unanswered: set[str] = set()  # peers that did not answer this peer's looks at the swarm while it joined


    def _reset_step_buffers(self) -> None:
        self._buffer_epoch += 1
        self._running.clear()
        self._input_grads.clear()
        self._applied_grads.clear()
        self._kept.clear()
        self._grads_cache = None

    async def _compute(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)


    # --- announcing ----------------------------------------------------------------------------------------

    def announcement(self) -> StageAnnouncement:
        return StageAnnouncement(
            peer_id=self.peer_id, stage=self.stage, state=self.state, step=self.current_step,
            throughput=round(self.throughput.value, 3), load=self.load, grad_norm=self.grad_norm,
            source=self.source, recovered_from=list(self.recovered_from), announced_at=round(get_dht_time(), 3),
            kept=sorted(self.kept), refit=dict(self.refit_report), step_proof=self.step_proof,
            maddrs=list(self.maddrs), claimed_at=self.claimed_at,
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
        """Refresh the announcement well within its TTL, so a live peer never drops off the map; and while this
        peer serves untrained weights, check that the run has not trained without it (`check_in_the_run`)."""
        while True:
            try:
                await self.announce()
                await self.check_in_the_run()
            except Exception as e:  # the DHT may hiccup; the next round retries
                logger.warning(f"stage {self.stage}: announcing failed: {e}")
            await asyncio.sleep(self.spec.announce_ttl / 4)

    def _spawn(self, coroutine) -> asyncio.Task:
        """A background task that is kept referenced until it finishes (the loop holds only weak references)."""
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def save_state(self) -> None:
        """Write this replica's exact state (weights, optimiser, step) to its state file (`cfnode join --state`), so
        `cfnode export` can rebuild the model once the swarm is gone. Taken under the state lock: one step's state."""
        if self.state_path is None:
            return
        async with self._state_lock:
            state = await self._compute(snapshot, self.stage, self.current_step, self.grad_norm, self.model,
                                        self.optimizer, False, self.step_proof)
        try:
            await self._compute(save_state_file, state, self.state_path, self.spec)
        except OSError as e:
            logger.warning(f"stage {self.stage}: could not save the state to {self.state_path}: {e}")

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        if self.trace is not None:
            self.trace.close()

"""The trainer's calls to the stages: each goes to a usable replica of its stage, a failed one moves to another,
and while a stage has no usable peer the call waits for one (`--stage-timeout`), saying why; the trainer's events
record every failure, loss and recovery. Apart from the step bookkeeping (stepping.py, step_book.py), so that the
routing of one call can be read on its own."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from hivemind.utils.logging import get_logger

from cfnode.node.routing import Backoff, StageUnavailable
from cfnode.node.swarm_map import online
from cfnode.protocol.messages import (
    BAD_REQUEST,
    NOT_READY,
    STALE,
    TRUNCATED,
    UNAUTHORISED,
    RemoteError,
    TruncatedStream,
)

logger = get_logger(__name__)
T = TypeVar("T")

REFUSAL_BAN_SECONDS = 1.0  # a stale or joining peer is usable again once it has caught up
STILL_WAITING_EVERY = 30.0  # seconds between log lines while a lost stage is awaited
SLOW_PEER_PROBE_SECONDS = 5.0
SLOW_PEER_RETRIES = 2  # a banned peer that still answers is retried at once this many failures in a row


class TrainerError(RuntimeError):
    pass


class StageCalls:
    """The call-routing half of Trainer (its state, the router, events and lost-stage clocks, lives there)."""

    # --- calls with retries --------------------------------------------------------------------------------

    async def _call(self, stage: int, what: str, fn: Callable[[str], Awaitable[T]],
                    avoid: set[str] = frozenset()) -> tuple[str, T]:
        """Run fn on a usable peer of the stage (not in `avoid`); on failure ban it and try another; wait while none
        is left."""
        backoff = Backoff(0.1, 0.5)  # a lost stage is polled often: resuming promptly matters more than DHT load
        while True:
            peer = self.router.pick(stage, avoid)
            if peer is None:
                await self.router.refresh(max_age=0.25)
                peer = self.router.pick(stage, avoid)
            if peer is None:
                await self._wait_for_stage(stage, backoff)
                continue
            self.router.started(peer)
            try:
                result = await self.metrics.timed(what, _retry_cut_streams(fn, peer))
            except RemoteError as e:
                if e.code in (BAD_REQUEST, UNAUTHORISED):
                    raise TrainerError(f"stage {stage} peer {peer} refused a {what} request: {e.message}") from None
                if e.code in (STALE, NOT_READY):
                    self.router.ban(peer, REFUSAL_BAN_SECONDS)
                    logger.debug(f"stage {stage} peer {peer} refused {what}: {e}")
                else:
                    self._peer_failed(stage, peer, f"{what}: {e}")
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._peer_failed(stage, peer, f"{what}: {describe_error(e)}")
                continue
            finally:
                self.router.finished(peer)
            self.router.succeeded(peer)
            self._stage_available(stage, peer)
            return peer, result

    def _peer_failed(self, stage: int, peer: str, reason: str) -> None:
        if not self.router.is_banned(peer):
            self.events.emit("peer_failed", stage=stage, peer=peer, step=self.step + 1, reason=reason)
        self.router.ban(peer)

    async def _slow_not_gone(self, stage: int) -> bool:
        """Whether a banned peer of the stage still answers: a live peer that missed a deadline on a loaded machine
        is slow, not gone, and the stage is not lost. It is retried at once, unless it keeps failing."""
        suspects = [p.peer_id for p in online(self.router.stage_map.get(stage, []))
                    if self.router.is_banned(p.peer_id) and self.router.strikes(p.peer_id) <= SLOW_PEER_RETRIES]

        async def answers(peer: str) -> bool:
            try:
                # Short: a host cut off the network never answers, and its stage should be found lost promptly.
                await self.client.info(peer, stage, min(self.config.request_timeout, SLOW_PEER_PROBE_SECONDS))
                return True
            except Exception:
                return False

        alive = [peer for peer, ok in zip(suspects, await asyncio.gather(*map(answers, suspects))) if ok]
        for peer in alive:
            self.router.unban(peer)
            logger.info(f"stage {stage} peer {peer} failed a call but answers: retrying it")
        return bool(alive)

    async def _wait_for_stage(self, stage: int, backoff: Backoff) -> None:
        if stage not in self._lost_since and await self._slow_not_gone(stage):
            return
        now = time.monotonic()
        if stage not in self._lost_since:
            self._lost_since[stage] = self._lost_logged[stage] = now
            self.events.emit("stage_lost", stage=stage, step=self.step + 1)
            logger.warning(f"stage {stage} has no usable peer; waiting {self._patience()} for one to join")
        waited = now - self._lost_since[stage]
        if waited > self.config.stage_timeout:
            raise StageUnavailable(f"stage {stage} had no usable peer for {self.config.stage_timeout:.0f} s")
        if now - self._lost_logged[stage] >= STILL_WAITING_EVERY:  # a long wait keeps saying why it waits
            self._lost_logged[stage] = now
            announced = self.router.stage_map.get(stage, [])
            states = ", ".join(f"{p.peer_id[-6:]} {p.state.value}" + (" (banned)" if self.router.is_banned(p.peer_id)
                                                                      else "") for p in announced) or "none"
            logger.warning(f"stage {stage} still has no usable peer after {waited:.0f} s (waiting {self._patience()}); "
                           f"announced peers: {states}")
        await asyncio.sleep(backoff.next_delay())

    def _patience(self) -> str:
        timeout = self.config.stage_timeout
        return "as long as it takes" if math.isinf(timeout) else f"up to {timeout:.0f} s"

    def _stage_available(self, stage: int, peer: str) -> None:
        """A call to a lost stage succeeded again: report how long it was down and where its weights came from."""
        lost_since = self._lost_since.pop(stage, None)
        if lost_since is not None:
            record = next((p for p in self.router.stage_map.get(stage, []) if p.peer_id == peer), None)
            self.events.emit("stage_recovered", stage=stage, step=self.step + 1, peer=peer,
                             source=record.source if record else "unknown",
                             recovered_from=record.recovered_from if record else [],
                             refit=record.refit if record else {},
                             downtime=round(time.monotonic() - lost_since, 3))

    async def _wait_for_all_stages(self) -> None:
        backoff = Backoff(0.5, 3.0)
        deadline = time.monotonic() + self.config.stage_timeout
        while True:
            await self.router.refresh()
            missing = [s for s in range(1, self.spec.num_stages + 1) if not self.router.usable(s)]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise StageUnavailable(f"stages {missing} have no online peer after {self.config.stage_timeout:.0f} s")
            logger.info(f"waiting for stages {missing} to come online ({self._patience()})")
            await asyncio.sleep(backoff.next_delay())


async def _retry_cut_streams(fn: Callable[[str], Awaitable[T]], peer: str, attempts: int = 3) -> T:
    """The p2p daemon now and then cuts the tail off a stream; the same call again usually goes through.
    Retrying the same peer is safe: a stage accumulates each microbatch's backward only once per step."""
    for attempt in range(attempts):
        try:
            return await fn(peer)
        except (TruncatedStream, RemoteError) as e:
            cut = isinstance(e, TruncatedStream) or e.code == TRUNCATED
            if not cut or attempt == attempts - 1:
                raise
            logger.debug(f"stream to {peer} was cut short ({e}); sending it again")
    raise AssertionError("unreachable")


def describe_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

"""How the trainer applies a step at each stage: the step group, replays of a lost replica's share, the riding
step, and the ledger check that every microbatch was summed exactly once (protocol/ledger.py).

A part of Trainer (trainer.py holds its state); `step_book.py` holds the books these methods read.
"""

from __future__ import annotations

import asyncio

from hivemind.utils.logging import get_logger

from cfnode.node.routing import Backoff
from cfnode.node.stage_calls import describe_error
from cfnode.node.step_book import SentBackward
from cfnode.protocol.ledger import ledger_diff, ledger_digest
from cfnode.protocol.messages import GROUP_FAILED, LEDGER_MISMATCH, RemoteError, StepReply, StepRequest

logger = get_logger(__name__)


class Stepping:
    """The stepping half of Trainer."""

    def _backward_done(self, stage: int) -> None:
        """A stage's last backward of the step is in: it applies the step while the stages before it still work
        on theirs (the last microbatch's backward passes through them after it)."""
        if self.book.complete(stage) and stage not in self._stage_steps:
            self._stage_steps[stage] = asyncio.ensure_future(self._step_stage(stage))

    async def _step_rides_on(self, stage: int, microbatch: int) -> list[str] | None:
        """The step group to send with this backward, if it is the stage's last of the step and one peer is the whole
        group: that peer applies the step right after it, and no step call waits a round trip for the reply.
        If the stage's other backwards are all sent but some are still running, this waits for them: they are ahead
        of this one in the peer's queue anyway, and only once they are in is the group known."""
        others = [event for mb, event in self._backwards_in_flight[stage].items() if mb != microbatch]
        if len(others) != self.config.microbatches - 1:
            return None  # some microbatch has not reached this stage's backward yet: its own will be the last
        await asyncio.gather(*[event.wait() for event in others])
        sent = self.book[stage].sent
        if stage in self._stage_steps or microbatch in sent or len(sent) != self.config.microbatches - 1:
            return None
        group = self._step_group(stage)
        if len(group) != 1 or any(record.peer not in group for record in sent.values()):
            return None
        return sorted(group)

    async def _step_stage(self, stage: int,
                          ride: asyncio.Future[tuple[str, StepReply | None]] | None = None) -> None:
        """Apply this step's gradients on every replica of a stage, replaying any lost replica's share. With `ride`,
        the stage's last backward carried the step: only if its peer did not apply it does the step call follow."""
        if ride is not None:
            peer, stepped = await ride
            if stepped is not None:
                self._known_step[peer] = stepped.step
                self.grad_norms[stage] = stepped.grad_norm
                self._check_ledger(stage, peer, stepped)
                return
        backoff = Backoff(0.1, 2.0)
        while True:
            book = self.book[stage]
            group = self._step_group(stage)
            orphaned = book.orphaned(group)
            if orphaned:
                await self._replay(stage, orphaned)
                continue
            if not group:  # every replica is behind this step or tainted; they resync when called
                await self._replay(stage, [])
                await asyncio.sleep(backoff.next_delay())
                continue
            request = StepRequest(stage, self.step, sorted(group), book.session, book.assignment(), self._step_proof)
            replies = await asyncio.gather(
                *[self.metrics.timed("step", self.client.step(p, request, self.config.request_timeout))
                  for p in request.group],
                return_exceptions=True,
            )
            applied = {p: r for p, r in zip(request.group, replies) if isinstance(r, StepReply)}
            for peer, reply in zip(request.group, replies):
                if isinstance(reply, StepReply):
                    self._known_step[peer] = reply.step
                    self._check_ledger(stage, peer, reply)
                elif isinstance(reply, RemoteError) and reply.code == LEDGER_MISMATCH:
                    self._ledger_refused(stage, peer, reply)
                elif isinstance(reply, RemoteError) and reply.code == GROUP_FAILED:
                    for failed in reply.peers:
                        self._peer_failed(stage, failed, f"unreachable during the step: {reply.message}")
                else:
                    self._peer_failed(stage, peer, f"step failed: {describe_error(reply)}")
            if applied:
                # Replicas that did not apply are now behind; their next request finds them stale and they resync.
                self.grad_norms[stage] = next(iter(applied.values())).grad_norm
                return
            await asyncio.sleep(backoff.next_delay())

    def _step_group(self, stage: int) -> set[str]:
        """Replicas known to be at this step and clean: the ones that worked on it, and usable ones announcing it,
        less any that may hold a microbatch another replica holds (step_book.py)."""
        book = self.book[stage]
        group = {record.peer for record in book.sent.values() if record.peer and not self.router.is_banned(record.peer)}
        for peer in self.router.usable(stage):
            if max(peer.step, self._known_step.get(peer.peer_id, 0)) == self.step:
                group.add(peer.peer_id)
        tainted = book.tainted()
        for peer in sorted((group & tainted) - book.left_out):
            book.left_out.add(peer)
            self.events.emit("replica_left_out", stage=stage, step=self.step + 1, peer=peer,
                             reason="its record of the step was wrong" if peer in book.excluded else
                             "it may hold a microbatch another replica holds")
        return group - tainted

    async def _replay(self, stage: int, microbatches: list[int]) -> None:
        """Resend accepted backward calls whose replica is gone or tainted, so their gradients reach a clean one."""
        if not microbatches:
            await self._call(stage, "wait", lambda p: asyncio.sleep(0))  # waits until the stage has a peer
            return
        book = self.book[stage]
        if not [p for p in self.router.usable(stage) if p.peer_id not in book.tainted()] \
                and any(p.peer_id in book.tainted() for p in self.router.usable(stage)):
            # Every live replica may hold part of the step twice: they drop it and the stage's share starts over.
            microbatches = self.book.restart_stage(stage)
            self.events.emit("stage_step_restarted", stage=stage, step=self.step + 1, microbatches=len(microbatches))
        for mb in microbatches:
            record = self.book[stage].sent[mb]
            peer, _ = await self._backward(stage, mb, record.hidden, record.grad_output,
                                           avoid=self.book[stage].tainted())
            self.events.emit("microbatch_replayed", stage=stage, step=self.step + 1, microbatch=mb,
                             lost_peer=record.peer or None, peer=peer)
            self.book[stage].sent[mb] = SentBackward(peer, record.hidden, record.grad_output)

    def _check_ledger(self, stage: int, peer: str, reply: StepReply) -> None:
        """The replica's account of what the applied update summed, against every microbatch sent to the stage."""
        session = self.book.session(stage)
        expected = range(self.config.microbatches)
        if reply.count == len(expected) and reply.digest == ledger_digest(session, expected):
            self.ledger_checks += 1
            return
        diff = ledger_diff(expected, reply.microbatches)
        self.events.emit("step_mismatch", stage=stage, step=self.step + 1, peer=peer, count=reply.count,
                         expected=len(expected), missing=list(diff.missing), doubled=list(diff.extra))

    def _ledger_refused(self, stage: int, peer: str, error: RemoteError) -> None:
        """The group refused the step before applying it: the named replicas' records are off. They leave the group
        for this step, and their share is replayed on the others."""
        book = self.book[stage]
        offenders = set(error.peers) or {peer}
        if offenders <= book.excluded:
            return  # every replica of the group reports the same replicas
        book.excluded |= offenders
        self.events.emit("ledger_refused", stage=stage, step=self.step + 1, peers=sorted(offenders),
                         reason=error.message[:300])

"""The trainer's books for one step: which replica holds each microbatch's gradient, at every stage.

Pure bookkeeping, no network: `stepping.py` asks it whom to put in a stage's step group, which microbatches to
replay, and what each replica must have summed (the ledger the replicas check, protocol/ledger.py).

A replica that was sent a microbatch's backward may have added its gradient even if the call failed (it timed out,
its stream broke after the autograd ran). If that microbatch then ends up on another replica, the first one's sum
holds it too: it is *tainted* for this step. A tainted replica never joins the step group; its other microbatches
are replayed on a clean one, and it resynchronises after the step. That is what keeps a slow replica that comes off
its ban before the step from summing a replayed microbatch a second time.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


@dataclass
class SentBackward:
    """A backward call that a stage accepted this step: enough to replay it on another replica."""

    peer: str  # the replica that holds its gradient; "" once none does (it must be replayed)
    hidden: torch.Tensor
    grad_output: torch.Tensor


@dataclass
class StageBook:
    """One stage's part of the step."""

    session: str  # the trainer session its calls carry this step (a new one drops what replicas accumulated)
    sent: dict[int, SentBackward] = field(default_factory=dict)  # microbatch -> who holds it
    tried: dict[int, set[str]] = field(default_factory=dict)  # microbatch -> every replica it was sent to
    excluded: set[str] = field(default_factory=set)  # replicas whose record of the step was found wrong
    left_out: set[str] = field(default_factory=set)  # tainted replicas already reported as kept out of the group

    def tainted(self) -> set[str]:
        """Replicas that may hold a gradient that another replica holds: kept out of the step group."""
        holders = {mb: record.peer for mb, record in self.sent.items()}
        spoiled = {peer for mb, peers in self.tried.items() for peer in peers
                   if mb in holders and peer != holders[mb]}
        return spoiled | self.excluded

    def assignment(self) -> dict[str, list[int]]:
        """The microbatches each replica must have summed: the ledger sent with the step."""
        ledger: dict[str, list[int]] = {}
        for mb, record in sorted(self.sent.items()):
            ledger.setdefault(record.peer, []).append(mb)
        return ledger

    def orphaned(self, group: set[str]) -> list[int]:
        """Microbatches whose gradient no member of the group holds: they must be replayed before the step."""
        return sorted(mb for mb, record in self.sent.items() if record.peer not in group)


class StepBook:
    """Every stage's book for the step in progress. `base_session` identifies the trainer run."""

    def __init__(self, base_session: str, num_stages: int, microbatches: int):
        self.base_session = base_session
        self.num_stages, self.microbatches = num_stages, microbatches
        self.stages: dict[int, StageBook] = {}
        self._sessions = {s: base_session for s in range(1, num_stages + 1)}

    def start(self) -> None:
        """A new step: every stage's book is empty; sessions carry over."""
        self.stages = {s: StageBook(self._sessions[s]) for s in range(1, self.num_stages + 1)}

    def __getitem__(self, stage: int) -> StageBook:
        return self.stages[stage]

    def session(self, stage: int) -> str:
        return self._sessions[stage]

    def tried(self, stage: int, microbatch: int, peer: str) -> None:
        self.stages[stage].tried.setdefault(microbatch, set()).add(peer)

    def complete(self, stage: int) -> bool:
        """Whether every microbatch's backward of the step is in at this stage."""
        return len(self.stages[stage].sent) == self.microbatches

    def restart_stage(self, stage: int) -> list[int]:
        """Every usable replica is tainted: start the stage's share of the step over under a new session (each
        replica drops what it accumulated on its next call) and replay every microbatch. Returns them."""
        book = self.stages[stage]
        self._sessions[stage] = f"{self.base_session}.{secrets.token_hex(4)}"
        restarted = StageBook(self._sessions[stage])
        for mb, record in book.sent.items():
            restarted.sent[mb] = SentBackward("", record.hidden, record.grad_output)
        self.stages[stage] = restarted
        return sorted(restarted.sent)

"""The step ledger: which microbatches a stage summed into a step, so that every one is counted exactly once.

Each stage peer records the (trainer session, microbatch) contributions it accumulated in a step. The trainer
sends, with the step, which microbatches it gave to which replica; every replica of the group checks every
replica's record against that before applying anything, so all of them apply the update or none does. The step
reply then carries the count and digest of what was summed, which the trainer checks against what it sent.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


def ledger_digest(session: str, microbatches: Iterable[int]) -> str:
    """A short digest of the contributions (session, microbatch) summed into a step; repeats change it."""
    text = ",".join(str(mb) for mb in sorted(microbatches))
    return hashlib.sha256(f"{session}|{text}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LedgerDiff:
    """How a record of contributions differs from what was expected: microbatches missing, and extra ones (given
    to another replica, never acknowledged, or summed twice)."""

    missing: tuple[int, ...] = ()
    extra: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing {list(self.missing)}")
        if self.extra:
            parts.append(f"extra {list(self.extra)}")
        return ", ".join(parts) or "as expected"


def ledger_diff(expected: Iterable[int], summed: Iterable[int]) -> LedgerDiff:
    """What `summed` (a multiset: a microbatch listed twice was summed twice) lacks or has beyond `expected`."""
    want, have = Counter(expected), Counter(summed)
    missing = sorted((want - have).elements())
    extra = sorted((have - want).elements())
    return LedgerDiff(tuple(missing), tuple(extra))


def group_mismatches(assignment: Mapping[str, Iterable[int]], records: Mapping[str, Iterable[int]]) -> dict[str,
                                                                                                           LedgerDiff]:
    """Per replica of a step group, how its record differs from the microbatches the trainer assigned it."""
    diffs = {peer: ledger_diff(assignment.get(peer, ()), summed) for peer, summed in records.items()}
    return {peer: diff for peer, diff in diffs.items() if diff}

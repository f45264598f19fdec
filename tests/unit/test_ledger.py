"""The step ledger's pure parts: digests, differences, and the trainer's books of who holds which gradient."""

import torch

from cfnode.node.step_book import SentBackward, StepBook
from cfnode.protocol.ledger import group_mismatches, ledger_diff, ledger_digest


def test_the_digest_depends_on_the_session_and_counts_repeats_but_not_order():
    assert ledger_digest("s", [2, 0, 1]) == ledger_digest("s", [0, 1, 2])
    assert ledger_digest("s", [0, 1, 2]) != ledger_digest("t", [0, 1, 2])
    assert ledger_digest("s", [0, 1, 1, 2]) != ledger_digest("s", [0, 1, 2])


def test_a_diff_names_missing_and_doubled_microbatches():
    assert not ledger_diff([0, 1, 2], [2, 1, 0])
    diff = ledger_diff([0, 1, 2, 3], [0, 1, 1, 2, 5])
    assert diff.missing == (3,) and diff.extra == (1, 5)
    assert "missing [3]" in diff.describe() and "extra [1, 5]" in diff.describe()


def test_group_mismatches_name_the_replicas_whose_record_is_off():
    assignment = {"a": [0, 1], "b": [2, 3]}
    assert group_mismatches(assignment, {"a": [0, 1], "b": [2, 3], "idle": []}) == {}
    mismatches = group_mismatches(assignment, {"a": [0, 1, 2], "b": [2, 3], "idle": [1]})
    assert sorted(mismatches) == ["a", "idle"]
    assert mismatches["a"].extra == (2,) and mismatches["idle"].extra == (1,)


def _sent(peer: str) -> SentBackward:
    return SentBackward(peer, torch.zeros(1), torch.zeros(1))


def test_a_replica_tried_for_a_microbatch_that_another_holds_is_tainted():
    book = StepBook("run", num_stages=2, microbatches=3)
    book.start()
    for mb, peer in ((0, "a"), (1, "a"), (2, "a")):
        book.tried(1, mb, peer)
    book.tried(1, 2, "b")  # mb 2 timed out on a, then went to b
    book[1].sent.update({0: _sent("a"), 1: _sent("a"), 2: _sent("b")})
    assert book[1].tainted() == {"a"}
    assert book[1].assignment() == {"a": [0, 1], "b": [2]}
    assert book[1].orphaned({"b"}) == [0, 1]  # a's share is replayed on b
    # A retry on the peer that then holds it taints nothing: the peer answers a retry with the gradient it has.
    book.tried(2, 0, "c")
    book.tried(2, 0, "c")
    book[2].sent[0] = _sent("c")
    assert book[2].tainted() == set()


def test_restarting_a_stage_gives_it_a_new_session_and_orphans_every_microbatch():
    book = StepBook("run", num_stages=1, microbatches=2)
    book.start()
    book.tried(1, 0, "a")
    book[1].sent.update({0: _sent("b"), 1: _sent("b")})
    assert book[1].tainted() == {"a"}
    assert book.restart_stage(1) == [0, 1]
    assert book.session(1) != "run" and book.session(1).startswith("run.")
    assert book[1].tainted() == set() and book[1].orphaned({"a", "b"}) == [0, 1]
    book.start()  # the new session carries over to the next step
    assert book[1].session == book.session(1)

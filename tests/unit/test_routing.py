import random
import time

import pytest

from cfnode.config import RunSpec
from cfnode.node import routing
from cfnode.node.routing import Backoff, Router
from cfnode.protocol.records import PeerState, StageAnnouncement

SPEC = RunSpec(num_stages=3, layers_per_stage=1, hidden_size=32, num_heads=2, seq_len=16)


def peer(peer_id: str, stage: int = 1, throughput: float = 100.0,
         state: PeerState = PeerState.ONLINE) -> StageAnnouncement:
    return StageAnnouncement(peer_id=peer_id, stage=stage, state=state, step=0, throughput=throughput, load=0,
                             grad_norm=None, source="fresh")


def make_router(ban_seconds: float = 15.0) -> Router:
    router = Router(None, SPEC, ban_seconds=ban_seconds)
    router.stage_map = {1: [], 2: [], 3: []}
    return router


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


# --- Backoff ------------------------------------------------------------------------------------------------------


def test_backoff_grows_and_is_capped(monkeypatch):
    monkeypatch.setattr(routing.random, "uniform", lambda a, b: 1.0)
    backoff = Backoff(min_delay=0.1, max_delay=1.0)
    delays = [backoff.next_delay() for _ in range(10)]
    assert delays[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert all(d == pytest.approx(1.0) for d in delays[4:])
    assert all(a <= b for a, b in zip(delays, delays[1:]))
    assert backoff.attempt == 10


def test_backoff_jitter_within_bounds():
    random.seed(1234)
    backoff = Backoff(min_delay=0.2, max_delay=5.0)
    for attempt in range(40):
        nominal = min(5.0, 0.2 * 2**attempt)
        delay = backoff.next_delay()
        assert 0.8 * nominal <= delay <= 1.2 * nominal
    assert delay <= 1.2 * 5.0


def test_backoff_many_attempts_do_not_overflow(monkeypatch):
    monkeypatch.setattr(routing.random, "uniform", lambda a, b: 1.0)
    backoff = Backoff(min_delay=0.2, max_delay=5.0)
    backoff.attempt = 5000  # 2**5000 overflows a float
    assert backoff.next_delay() == pytest.approx(5.0)


def test_backoff_defaults():
    backoff = Backoff()
    assert backoff.min_delay == 0.2 and backoff.max_delay == 5.0
    assert 0.16 <= backoff.next_delay() <= 0.24


# --- Router -------------------------------------------------------------------------------------------------------


def test_router_starts_with_empty_map():
    router = Router(None, SPEC, ban_seconds=1.0)
    assert router.stage_map == {1: [], 2: [], 3: []}
    assert router.pick(1) is None and router.usable(2) == []
    assert router.pick(99) is None


def test_pick_only_online():
    router = make_router()
    router.stage_map[1] = [peer("joining", state=PeerState.JOINING), peer("leaving", state=PeerState.LEAVING),
                           peer("online")]
    for _ in range(20):
        assert router.pick(1) == "online"
    router.stage_map[1] = [peer("joining", state=PeerState.JOINING), peer("leaving", state=PeerState.LEAVING)]
    assert router.pick(1) is None


def test_pick_skips_banned_and_excluded():
    router = make_router()
    router.stage_map[2] = [peer("a", 2), peer("b", 2), peer("c", 2)]
    router.ban("a")
    assert router.is_banned("a") and not router.is_banned("b")
    assert {p.peer_id for p in router.usable(2)} == {"b", "c"}
    for _ in range(20):
        assert router.pick(2) in {"b", "c"}
        assert router.pick(2, exclude={"b"}) == "c"
    assert router.pick(2, exclude={"b", "c"}) is None
    router.ban("b")
    router.ban("c")
    assert router.pick(2) is None
    router.ban("b", seconds=0.0)  # an explicit zero-length ban lifts it
    assert router.pick(2) == "b"


def test_bans_escalate_and_reset_on_success():
    router = make_router(ban_seconds=10.0)
    durations = [router.ban("a") for _ in range(6)]
    assert durations[0] == 1.0
    assert durations == sorted(durations) and durations[-1] == 10.0
    router.succeeded("a")
    assert router.ban("a") == 1.0


def test_pick_is_per_stage():
    router = make_router()
    router.stage_map[1] = [peer("a", 1)]
    router.stage_map[3] = [peer("c", 3)]
    assert router.pick(1) == "a" and router.pick(3) == "c" and router.pick(2) is None


def test_pick_prefers_fewer_inflight_calls():
    router = make_router()
    router.stage_map[1] = [peer("a", throughput=1000.0), peer("b", throughput=10.0)]
    assert router.pick(1) == "a"  # idle: the faster one
    router.started("a")
    assert router.pick(1) == "b"
    router.started("b")
    assert router.pick(1) == "a"  # 1 vs 1: the faster one again
    router.started("b")
    assert router.pick(1) == "a"
    router.started("a")
    router.started("a")
    assert router.pick(1) == "b"  # 3 vs 2
    router.finished("a")
    router.finished("a")
    router.finished("a")
    assert router.pick(1) == "a"  # 0 vs 2


def test_finished_never_goes_negative():
    router = make_router()
    router.stage_map[1] = [peer("a", throughput=1.0), peer("b", throughput=2.0)]
    for _ in range(3):
        router.finished("a")
    router.started("a")
    assert router.pick(1) == "b"  # a has one call in flight, not -2


def test_pick_spreads_over_equal_peers():
    random.seed(0)
    router = make_router()
    router.stage_map[1] = [peer("a"), peer("b"), peer("c")]
    assert {router.pick(1) for _ in range(100)} == {"a", "b", "c"}


def test_ban_expires():
    router = make_router(ban_seconds=0.05)
    router.stage_map[1] = [peer("a")]
    banned_at = time.monotonic()
    router.ban("a")
    assert router.is_banned("a") and router.pick(1) is None
    assert wait_until(lambda: router.pick(1) == "a")
    assert time.monotonic() - banned_at >= 0.05
    assert not router.is_banned("a")


def test_ban_with_explicit_seconds():
    router = make_router(ban_seconds=3600.0)
    router.stage_map[1] = [peer("a"), peer("b")]
    banned_at = time.monotonic()
    router.ban("a", seconds=0.05)
    router.ban("b")  # the router's own hour
    assert router.pick(1) is None
    assert wait_until(lambda: router.pick(1) == "a")
    assert time.monotonic() - banned_at >= 0.05
    assert router.is_banned("b")


def test_zero_ban_is_no_ban():
    router = make_router(ban_seconds=0.0)
    router.stage_map[1] = [peer("a")]
    router.ban("a")
    assert wait_until(lambda: router.pick(1) == "a", timeout=1.0)

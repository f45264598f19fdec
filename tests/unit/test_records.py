import math

import msgpack
import pytest

from cfnode.config import RunSpec
from cfnode.protocol.keys import spec_key, stage_key
from cfnode.protocol.records import (
    PROTOCOL_VERSION,
    WEIGHT_SOURCES,
    PeerState,
    RecordError,
    StageAnnouncement,
    spec_from_wire,
)


def make_announcement(**changes) -> StageAnnouncement:
    values = dict(peer_id="QmPeer", stage=2, state=PeerState.ONLINE, step=7, throughput=1234.5, load=1,
                  grad_norm=0.25, source="checkfree", recovered_from=["1:QmA", "3:QmB"], announced_at=100.5)
    values.update(changes)
    return StageAnnouncement(**values)


def wire(**changes) -> dict:
    data = make_announcement().to_wire()
    data.update(changes)
    return data


def test_round_trip():
    record = make_announcement()
    data = record.to_wire()
    assert data["state"] == "ONLINE" and type(data["state"]) is str
    assert data["version"] == PROTOCOL_VERSION
    assert StageAnnouncement.from_wire(data) == record


def test_round_trip_through_msgpack():
    record = make_announcement()
    data = msgpack.unpackb(msgpack.packb(record.to_wire(), use_bin_type=True), raw=False)
    assert StageAnnouncement.from_wire(data) == record


@pytest.mark.parametrize("state", list(PeerState))
@pytest.mark.parametrize("source", WEIGHT_SOURCES)
def test_round_trip_every_state_and_source(state, source):
    record = make_announcement(state=state, source=source)
    assert StageAnnouncement.from_wire(record.to_wire()) == record


def test_round_trip_without_grad_norm_and_defaults():
    record = StageAnnouncement(peer_id="p", stage=1, state=PeerState.JOINING, step=0, throughput=0.0, load=0,
                               grad_norm=None, source="fresh")
    assert StageAnnouncement.from_wire(record.to_wire()) == record


def test_optional_fields_may_be_missing():
    data = wire()
    for name in ("recovered_from", "announced_at", "version"):
        del data[name]
    record = StageAnnouncement.from_wire(data)
    assert record.recovered_from == [] and record.announced_at == 0.0 and record.version == PROTOCOL_VERSION


def test_unknown_fields_ignored():
    data = wire(future_field={"x": 1}, another=[1, 2])
    assert StageAnnouncement.from_wire(data) == make_announcement()


def test_ints_accepted_for_float_fields():
    record = StageAnnouncement.from_wire(wire(throughput=10, grad_norm=0, announced_at=5))
    assert record.throughput == 10 and record.grad_norm == 0


@pytest.mark.parametrize("missing", ["peer_id", "stage", "state", "step", "throughput", "load", "grad_norm", "source"])
def test_missing_field(missing):
    data = wire()
    del data[missing]
    with pytest.raises(RecordError, match=missing):
        StageAnnouncement.from_wire(data)


@pytest.mark.parametrize(
    "changes",
    [
        {"state": "BOGUS"},
        {"state": "online"},
        {"state": None},
        {"state": ["ONLINE"]},
        {"peer_id": ""},
        {"peer_id": 5},
        {"stage": -1},
        {"stage": 1.0},
        {"stage": True},
        {"step": -1},
        {"step": "3"},
        {"step": False},
        {"load": -2},
        {"load": True},
        {"version": -1},
        {"throughput": math.nan},
        {"throughput": math.inf},
        {"throughput": -1.0},
        {"throughput": True},
        {"throughput": "fast"},
        {"grad_norm": math.nan},
        {"grad_norm": -0.5},
        {"grad_norm": True},
        {"announced_at": math.inf},
        {"announced_at": -1},
        {"announced_at": None},
        {"source": "unknown"},
        {"source": None},
        {"recovered_from": "1:QmA"},
        {"recovered_from": [1, 2]},
        {"recovered_from": None},
    ],
)
def test_bad_values_refused(changes):
    with pytest.raises(RecordError):
        StageAnnouncement.from_wire(wire(**changes))


@pytest.mark.parametrize("data", [None, 5, "ONLINE", [("peer_id", "p")], b"bytes"])
def test_non_mapping_refused(data):
    with pytest.raises(RecordError, match="mapping"):
        StageAnnouncement.from_wire(data)


def test_spec_round_trip():
    spec = RunSpec(run_id="r1", num_stages=5, hidden_size=64, num_heads=2, lr=0.5, recovery="uniform")
    assert spec_from_wire(spec.to_dict()) == spec
    packed = msgpack.unpackb(msgpack.packb(spec.to_dict(), use_bin_type=True), raw=False)
    assert spec_from_wire(packed) == spec
    assert spec_from_wire({}) == RunSpec()


@pytest.mark.parametrize(
    "data",
    [
        None,
        [1, 2],
        "spec",
        {"bogus": 1},
        {"num_stages": 0},
        {"num_stages": "3"},
        {"recovery": "bogus"},
        {"hidden_size": 30, "num_heads": 4},
        {1: 2},
    ],
)
def test_spec_from_wire_refuses(data):
    with pytest.raises(RecordError):
        spec_from_wire(data)


def test_keys_are_namespaced_by_run_id():
    assert spec_key("a") != spec_key("b")
    assert stage_key("a", 1) != stage_key("b", 1)
    assert stage_key("a", 1) != stage_key("a", 2)
    assert spec_key("a") != stage_key("a", 1)
    for key in (spec_key("myrun"), stage_key("myrun", 3)):
        assert key.startswith("myrun.")
    assert stage_key("myrun", 3).endswith("3")
    # no run id's keys are a prefix-collision of another's: the separator follows the run id
    assert not stage_key("run1", 1).startswith("run" + ".")


def test_maddrs_round_trip_and_default_empty():
    maddrs = ["/ip4/10.0.0.2/tcp/4000/p2p/QmPeer", "/ip4/127.0.0.1/tcp/4000/p2p/QmPeer"]
    record = make_announcement(maddrs=maddrs)
    assert StageAnnouncement.from_wire(record.to_wire()) == record
    packed = msgpack.unpackb(msgpack.packb(record.to_wire(), use_bin_type=True), raw=False)
    assert StageAnnouncement.from_wire(packed).maddrs == maddrs
    data = wire()
    del data["maddrs"]  # an older peer's announcement has none
    assert StageAnnouncement.from_wire(data).maddrs == []
    assert list(record.to_wire())[-2:] == ["maddrs", "claimed_at"]  # last: positional constructions are unchanged


def test_claimed_at_round_trips_defaults_to_zero_and_is_checked():
    record = make_announcement(claimed_at=1234.5)
    assert StageAnnouncement.from_wire(record.to_wire()).claimed_at == 1234.5
    data = wire()
    del data["claimed_at"]  # an older peer's announcement has none: it counts as ahead of every claimant
    assert StageAnnouncement.from_wire(data).claimed_at == 0.0
    for bad in (-1.0, float("nan"), "soon"):
        with pytest.raises(RecordError, match="claimed_at"):
            StageAnnouncement.from_wire({**wire(), "claimed_at": bad})


@pytest.mark.parametrize("maddrs", ["/ip4/1.2.3.4/tcp/1/p2p/QmPeer", None, [1], [""], ["/ip4/" + "1" * 260],
                                    ["/ip4/1.2.3.4/tcp/1"] * 9, [b"/ip4/1.2.3.4/tcp/1"]])
def test_bad_maddrs_refused(maddrs):
    with pytest.raises(RecordError, match="maddrs"):
        StageAnnouncement.from_wire(wire(maddrs=maddrs))


def test_eight_maddrs_of_256_characters_accepted():
    maddrs = ["/" + "a" * 255] * 8
    assert StageAnnouncement.from_wire(wire(maddrs=maddrs)).maddrs == maddrs

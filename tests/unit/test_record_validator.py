"""Identities and the run's DHT record validator, exercised as hivemind applies them (sign on store, validate on
store and on read)."""

from __future__ import annotations

import dataclasses

import pytest
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer

from cfnode.config import RunSpec
from cfnode.protocol.identity import IdentityError, create_identity, load_identity, owner_peer_id
from cfnode.protocol.keys import claims_key, progress_key, spec_key, stage_key
from cfnode.protocol.record_validator import run_validators
from cfnode.protocol.records import JoinClaim, PeerState, RunProgress, StageAnnouncement


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ids")
    return create_identity(str(folder / "a.key")), create_identity(str(folder / "b.key"))


def record(key: str, subkey, value, validator: CompositeValidator) -> DHTRecord:
    raw = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey),
                    MSGPackSerializer.dumps(value), 1e12)
    return dataclasses.replace(raw, value=validator.sign_value(raw))


def announcement(peer_id: str, stage: int = 1) -> dict:
    return StageAnnouncement(peer_id=peer_id, stage=stage, state=PeerState.ONLINE, step=3, throughput=1.0, load=0,
                             grad_norm=0.5, source="fresh").to_wire()


def test_identity_round_trip(identities, tmp_path):
    a, _ = identities
    again = load_identity(a.path)
    assert again.peer_id == a.peer_id
    assert owner_peer_id(a.owner_subkey) == a.peer_id
    assert owner_peer_id(b"no key here") is None
    assert owner_peer_id(12) is None


def test_identity_files_that_cannot_sign_are_refused(tmp_path):
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"\x00\x01not a key")
    with pytest.raises(IdentityError):
        load_identity(str(garbage))
    ed25519 = tmp_path / "ed25519.key"
    ed25519.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=b"x" * 64).SerializeToString())
    with pytest.raises(IdentityError, match="RSA"):
        load_identity(str(ed25519))
    with pytest.raises(IdentityError, match="cannot read"):
        load_identity(str(tmp_path / "missing.key"))


def test_own_announcement_is_valid_and_others_are_not(identities):
    a, b = identities
    mine = CompositeValidator(run_validators("run", a))
    peer_a = a.peer_id.to_base58()
    assert mine.validate(record(stage_key("run", 1), a.owner_subkey, announcement(peer_a), mine))
    # Under b's subkey: a cannot sign it, so it carries no valid signature.
    assert not mine.validate(record(stage_key("run", 1), b.owner_subkey, announcement(peer_a), mine))
    # Signed by a, but claiming to be b.
    assert not mine.validate(record(stage_key("run", 1), a.owner_subkey, announcement(b.peer_id.to_base58()), mine))
    # Filed under another stage's key, without an owner, or as a plain value.
    assert not mine.validate(record(stage_key("run", 2), a.owner_subkey, announcement(peer_a), mine))
    assert not mine.validate(record(stage_key("run", 1), peer_a, announcement(peer_a), mine))
    plain = DHTRecord(DHTID.generate(source=stage_key("run", 1)).to_bytes(), DHTProtocol.IS_REGULAR_VALUE,
                      MSGPackSerializer.dumps(announcement(peer_a)), 1e12)
    assert not mine.validate(plain)


def test_tampered_signed_record_is_refused(identities):
    a, _ = identities
    mine = CompositeValidator(run_validators("run", a))
    signed = record(stage_key("run", 1), a.owner_subkey, announcement(a.peer_id.to_base58()), mine)
    tampered = dataclasses.replace(signed, value=signed.value.replace(b"ONLINE", b"JOININ"))
    assert not mine.validate(tampered)


@pytest.mark.parametrize("value", [{"peer_id": 3}, "a string", [1, 2], {}])
def test_wrong_shape_is_refused(identities, value):
    a, _ = identities
    mine = CompositeValidator(run_validators("run", a))
    assert not mine.validate(record(stage_key("run", 1), a.owner_subkey, value, mine))
    assert not mine.validate(record(spec_key("run"), a.owner_subkey, value, mine))


def test_run_spec_records(identities):
    a, _ = identities
    mine = CompositeValidator(run_validators("run", a))
    assert mine.validate(record(spec_key("run"), a.owner_subkey, RunSpec(run_id="run").to_dict(), mine))
    assert not mine.validate(record(spec_key("run"), a.owner_subkey, RunSpec(run_id="other").to_dict(), mine))
    assert not mine.validate(record(spec_key("run"), "bootstrap", RunSpec(run_id="run").to_dict(), mine))


def test_other_keys_pass_untouched(identities):
    a, _ = identities
    mine = CompositeValidator(run_validators("run", a))
    assert mine.validate(record("another-run.stage.1", "anything", {"x": 1}, mine))
    assert mine.validate(record(stage_key("other", 1), "anything", {"x": 1}, mine))


def test_join_claims_only_by_their_claimant(identities):
    a, b = identities
    validator = CompositeValidator(run_validators("run", a))
    claim = JoinClaim(peer_id=a.peer_id.to_base58(), claimed_at=10.0).to_wire()
    assert validator.validate(record(claims_key("run"), a.owner_subkey, claim, validator))
    forged = JoinClaim(peer_id=b.peer_id.to_base58(), claimed_at=10.0).to_wire()
    assert not validator.validate(record(claims_key("run"), a.owner_subkey, forged, validator))
    assert not validator.validate(record(claims_key("run"), a.owner_subkey, {"peer_id": 3}, validator))


def test_progress_records_must_parse(identities):
    a, _ = identities
    validator = CompositeValidator(run_validators("run", a))
    good = RunProgress(step=4, step_proof="sig").to_wire()
    assert validator.validate(record(progress_key("run"), a.owner_subkey, good, validator))
    assert not validator.validate(record(progress_key("run"), a.owner_subkey, {"step": -1, "step_proof": ""},
                                         validator))

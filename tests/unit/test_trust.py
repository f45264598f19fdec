"""Who a run trusts: trainer keys in the signed spec, step proofs they sign."""

import pytest

from cfnode.config import ConfigError, RunSpec
from cfnode.protocol.identity import create_identity
from cfnode.protocol.trust import (
    TrustError,
    is_trainer,
    public_key_line,
    read_trainer_key,
    sign_step,
    step_proven,
    trainer_ids,
)


def test_the_spec_names_trainers_by_public_key_and_readers_know_their_peer_ids(tmp_path):
    path = tmp_path / "trainer.key"
    line = read_trainer_key(str(path))  # creates the identity file for the trainer to use
    identity = create_identity(str(tmp_path / "other.key"))
    spec = RunSpec(trainer_keys=(line,))
    assert path.exists()
    assert read_trainer_key(str(path)) == line  # the same key when read again
    assert len(trainer_ids(spec)) == 1
    assert not is_trainer(spec, identity.peer_id.to_base58())
    pub = tmp_path / "trainer.pub"
    pub.write_text(public_key_line(identity) + "\n")
    assert is_trainer(RunSpec(trainer_keys=(read_trainer_key(str(pub)),)), identity.peer_id.to_base58())


def test_bad_trainer_keys_are_refused(tmp_path):
    junk = tmp_path / "junk"
    junk.write_text("not a key")
    with pytest.raises(TrustError):
        read_trainer_key(str(junk))
    for bad in ("ecdsa-sha2 AAAA", "ssh-rsa AAAA", "ssh-rsa " + "A" * 3000):
        with pytest.raises(ConfigError):
            RunSpec(trainer_keys=(bad,))
    line = read_trainer_key(str(tmp_path / "t.key"))
    assert RunSpec.from_dict({"trainer_keys": [line]}).trainer_keys == (line,)  # as JSON and msgpack give it


def test_a_step_proof_holds_for_its_run_and_step_only(tmp_path):
    trainer = create_identity(str(tmp_path / "t.key"))
    spec = RunSpec(trainer_keys=(public_key_line(trainer),))
    proof = sign_step(trainer, spec.run_id, 7)
    assert step_proven(spec, 7, proof)
    assert not step_proven(spec, 8, proof)
    assert not step_proven(spec.replace(run_id="other"), 7, proof)
    assert not step_proven(spec, 7, "")
    assert not step_proven(spec, 7, "x" * 5000)
    assert not step_proven(spec, 7, "é")
    assert step_proven(spec, 0, "")  # nothing trained needs no proof

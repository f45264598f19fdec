"""Who a run trusts: the trainers its signed spec names, and the step proofs they sign.

The rule: the run spec, signed by the bootstrap, lists the public keys of the trainers allowed to drive the run
(`RunSpec.trainer_keys`). From that follows everything else:
- a stage peer takes forward, backward and step calls, and head copies, only from a peer whose libp2p id is one of
  those keys (the caller's id is known on every call, and libp2p authenticates it);
- a newcomer reads only the trainer records (`<run_id>.trainer`) that such a trainer signed;
- a step claim counts only with a proof: the trainer signs "run R reached step N" with each step it applies, every
  stage peer keeps the proof of the step it is at (and hands it on with its state), and anyone that reads a peer's
  step (a starting trainer, a newcomer deciding whether the swarm ever trained) checks the proof first. A forged
  announcement can claim any step; it cannot sign it.
"""

from __future__ import annotations

import functools
import os

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.utils.crypto import RSAPublicKey

from cfnode.config import RunSpec
from cfnode.protocol.identity import Identity, IdentityError, create_identity, load_identity, peer_id_of
from cfnode.protocol.records import MAX_STEP_PROOF


class TrustError(ValueError):
    """A trainer key that cannot be used, or a trainer the run does not authorise."""


def public_key_line(identity: Identity) -> str:
    """The identity's public key as one OpenSSH line, the form the run spec lists trainers in."""
    return identity.private_key.get_public_key().to_bytes().decode()


def read_trainer_key(path: str) -> str:
    """A trainer's public key from its identity file (created there if it does not exist yet, for the trainer to
    use with --identity) or from a text file holding its public key line."""
    if not os.path.exists(path):
        return public_key_line(create_identity(path))
    try:
        return public_key_line(load_identity(path))
    except IdentityError:
        pass
    try:
        with open(path, encoding="utf-8") as f:
            line = f.read().strip()
    except (OSError, UnicodeDecodeError):
        raise TrustError(f"{path} is neither an identity file nor a public key file") from None
    _load_public_key(line, path)
    return line


@functools.lru_cache(maxsize=64)
def _keys_by_peer(keys: tuple[str, ...]) -> dict[str, RSAPublicKey]:
    return {peer_id_of(_load_public_key(k, "the run spec")).to_base58(): RSAPublicKey.from_bytes(k.encode())
            for k in keys}


def trainer_ids(spec: RunSpec) -> frozenset[str]:
    """The peer ids of the trainers this run authorises."""
    return frozenset(_keys_by_peer(spec.trainer_keys))


def is_trainer(spec: RunSpec, peer_id: str) -> bool:
    return peer_id in _keys_by_peer(spec.trainer_keys)


def _step_message(run_id: str, step: int) -> bytes:
    return f"cfnode step proof|{run_id}|{step}".encode()


def sign_step(identity: Identity, run_id: str, step: int) -> str:
    """The trainer's proof that run `run_id` reached `step` (the step after the one being applied): a base64
    signature."""
    return identity.private_key.sign(_step_message(run_id, step)).decode()


def step_proven(spec: RunSpec, step: int, proof: str) -> bool:
    """Whether `proof` shows that a trainer of this run signed `step`. Step 0 needs no proof: nothing trained."""
    if step == 0:
        return True
    if not isinstance(proof, str) or not proof or len(proof) > MAX_STEP_PROOF:
        return False
    return _verified(spec.trainer_keys, spec.run_id, step, proof)


@functools.lru_cache(maxsize=4096)
def _verified(keys: tuple[str, ...], run_id: str, step: int, proof: str) -> bool:
    # Cached: every read of the stage map checks every peer's proof, and they change once per step.
    message = _step_message(run_id, step)
    try:
        signature = proof.encode("ascii")
    except UnicodeEncodeError:
        return False
    return any(key.verify(message, signature) for key in _keys_by_peer(keys).values())


def _load_public_key(line: str, where: str) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_ssh_public_key(line.encode())
    except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm):
        raise TrustError(f"{where} holds no OpenSSH RSA public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise TrustError(f"{where} holds a non-RSA key: cfnode identities are RSA")
    return key

"""A node's identity: one RSA key that is both its libp2p identity (so its peer id) and the key that signs its DHT
records. Tying the two together lets any reader check that an announcement for peer X was written by X itself."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


class IdentityError(ValueError):
    """An identity file that cannot be used."""


@dataclass(frozen=True)
class Identity:
    path: str  # the libp2p private key file (protobuf PrivateKey), as p2pd reads it
    private_key: RSAPrivateKey
    peer_id: PeerID

    @property
    def owner_subkey(self) -> bytes:
        """The DHT subkey under which only this identity may write (hivemind's `[owner:<public key>]` marker)."""
        return RSASignatureValidator(self.private_key).local_public_key


def create_identity(path: str) -> Identity:
    """Generate a new RSA identity at `path` (which must not exist yet) and load it."""
    P2P.generate_identity(path)
    return load_identity(path)


def load_identity(path: str) -> Identity:
    """Load a libp2p identity file; only RSA keys can sign DHT records, so only they are accepted."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        message = crypto_pb2.PrivateKey.FromString(data)
    except OSError as e:
        raise IdentityError(f"cannot read identity {path}: {e.strerror or e}") from None
    except Exception:
        raise IdentityError(f"identity {path} is not a libp2p private key file") from None
    if message.key_type != crypto_pb2.KeyType.RSA:
        raise IdentityError(f"identity {path} holds a {crypto_pb2.KeyType.Name(message.key_type)} key; cfnode signs "
                            "its records with the identity key and needs RSA (let cfnode generate the file)")
    private_key = RSAPrivateKey.__new__(RSAPrivateKey)
    try:
        private_key.__setstate__({"_private_key": message.data})  # hivemind's picklable form is the DER key
    except ValueError:
        raise IdentityError(f"identity {path} holds a damaged RSA key") from None
    return Identity(path=os.fspath(path), private_key=private_key, peer_id=PeerID.from_identity(data))


def owner_peer_id(subkey: object) -> PeerID | None:
    """The peer id whose key a `[owner:...]` subkey names, or None if the subkey names no single RSA key."""
    if isinstance(subkey, str):
        subkey = subkey.encode()
    if not isinstance(subkey, bytes):
        return None
    keys = set(_OWNER_RE.findall(subkey))
    if len(keys) != 1:
        return None
    try:
        public_key = serialization.load_ssh_public_key(keys.pop())
    except (ValueError, TypeError):
        return None
    if not isinstance(public_key, rsa.RSAPublicKey):
        return None
    return peer_id_of(public_key)


def peer_id_of(public_key: rsa.RSAPublicKey) -> PeerID:
    """The libp2p peer id of an RSA public key (sha2-256 multihash of its protobuf form, as in the peer-id spec)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))

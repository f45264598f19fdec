"""The DHT validator for one run's records. hivemind runs it when a node is asked to store a record and when a
lookup returns one, so a record of the wrong shape or from the wrong writer is refused on the way in and dropped on
the way out.

Rules:
- a stage announcement lives under `stage_key(run, s)` with the `[owner:<key>]` subkey of the peer that wrote it;
  it must parse as a StageAnnouncement for stage s whose peer_id is the peer id of that key, so a peer can write
  only its own announcement (RSASignatureValidator checks the signature against the key in the subkey);
- the run spec lives under `spec_key(run)` with its writer's owner subkey and must parse as that run's RunSpec;
- the trainer's announcement lives under `trainer_key(run)`, its peer_id the peer id of the subkey's key;
- a newcomer's join claim lives under `claims_key(run)`, its peer_id the peer id of the subkey's key;
- the run's progress lives under `progress_key(run)` and must parse as RunProgress (its step counts for readers
  only with a trainer's proof, so any writer will do);
  which writer is trusted (the bootstrap) is the reader's choice, see `swarm_map.read_spec`.
Keys of other runs sharing the DHT, and hivemind's own, pass untouched.
"""

from __future__ import annotations

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from hivemind.utils.logging import get_logger

from cfnode.config import MAX_STAGES
from cfnode.protocol.identity import Identity, owner_peer_id
from cfnode.protocol.keys import claims_key, progress_key, spec_key, stage_key, trainer_key
from cfnode.protocol.records import (
    JoinClaim,
    RecordError,
    RunProgress,
    StageAnnouncement,
    TrainerAnnouncement,
    spec_from_wire,
)

logger = get_logger(__name__)


class RunRecordValidator(RecordValidatorBase):
    def __init__(self, run_id: str):
        self.run_id = run_id
        self._spec_key = DHTID.generate(source=spec_key(run_id)).to_bytes()
        self._trainer_key = DHTID.generate(source=trainer_key(run_id)).to_bytes()
        self._claims_key = DHTID.generate(source=claims_key(run_id)).to_bytes()
        self._progress_key = DHTID.generate(source=progress_key(run_id)).to_bytes()
        self._stage_keys = {DHTID.generate(source=stage_key(run_id, s)).to_bytes(): s
                            for s in range(1, MAX_STAGES + 1)}

    def validate(self, record: DHTRecord) -> bool:
        stage = self._stage_keys.get(record.key)
        if stage is None and record.key not in (self._spec_key, self._trainer_key, self._claims_key,
                                                self._progress_key):
            return True
        try:
            self._check(record, stage)
        except (RecordError, ValueError, TypeError) as e:
            logger.debug(f"refused a record of run {self.run_id!r}: {e}")
            return False
        return True

    def _check(self, record: DHTRecord, stage: int | None) -> None:
        owner = owner_peer_id(record.subkey)
        if owner is None:
            raise RecordError("the subkey must name its writer's key ([owner:...])")
        value = MSGPackSerializer.loads(record.value)
        if record.key == self._trainer_key:
            trainer = TrainerAnnouncement.from_wire(value)
            if trainer.peer_id != owner.to_base58():
                raise RecordError(f"peer {owner} announcing as trainer {trainer.peer_id}")
            return
        if record.key == self._claims_key:
            claim = JoinClaim.from_wire(value)
            if claim.peer_id != owner.to_base58():
                raise RecordError(f"peer {owner} claiming as {claim.peer_id}")
            return
        if record.key == self._progress_key:
            RunProgress.from_wire(value)
            return
        if stage is None:
            spec = spec_from_wire(value)
            if spec.run_id != self.run_id:
                raise RecordError(f"a spec for run {spec.run_id!r} under run {self.run_id!r}")
            return
        announcement = StageAnnouncement.from_wire(value)
        if announcement.stage != stage:
            raise RecordError(f"an announcement for stage {announcement.stage} under stage {stage}")
        if announcement.peer_id != owner.to_base58():
            raise RecordError(f"peer {owner} announcing as {announcement.peer_id}")

    @property
    def priority(self) -> int:
        return 0  # below RSASignatureValidator's: it checks and strips the signature before this parses the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, RunRecordValidator) and other.run_id == self.run_id


def run_validators(run_id: str, identity: Identity) -> list[RecordValidatorBase]:
    """The validators every node of a run installs: signatures by the identity key, then the run's schemas."""
    return [RSASignatureValidator(identity.private_key), RunRecordValidator(run_id)]

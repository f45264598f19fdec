"""`cfnode export`: the swarm's model as a Hugging Face Llama directory.

Every body stage's exact weights come from one of its live peers (or, offline, from state files the peers saved); the
embedding, final norm and LM head come from the trainer's state file or from the copies the edge stages keep. All
parts must be at one step: a model stitched from stages at different steps was never trained as a whole.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from hivemind.utils.logging import get_logger

from cfnode.config import NetworkConfig, RunSpec
from cfnode.data.tokenizer import load_run_tokenizer, write_hf_tokenizer
from cfnode.hf.checkpoint import write_hf_dir
from cfnode.node.stage_state import load_state_file, model_state, state_file_spec
from cfnode.protocol.messages import StateSnapshot
from cfnode.protocol.records import PeerState

logger = get_logger(__name__)

CONSISTENT_TRIES = 5  # reads of the swarm before giving up on finding every stage at one step (it may be mid-step)


class ExportError(RuntimeError):
    """The swarm or the state files do not make one whole model; the message says which part is missing or off."""


@dataclass
class ModelParts:
    """One whole model at one step: the head part (embedding, final norm, LM head) and every body stage's weights."""

    spec: RunSpec
    step: int
    head: dict[str, torch.Tensor]
    stages: list[dict[str, torch.Tensor]]  # stage 1..S
    sources: dict[int, str]  # part -> where it came from (a peer id, a file)


def check_steps(steps: dict[int, int]) -> int:
    """The one step every part is at; ExportError naming the parts if they differ."""
    if len(set(steps.values())) > 1:
        described = ", ".join(f"{'head' if part == 0 else f'stage {part}'} at step {step}"
                              for part, step in sorted(steps.items()))
        raise ExportError(f"the parts are at different steps ({described}); export when every stage has applied "
                          "the same step (for example after the trainer finished)")
    return next(iter(steps.values()))


def export_model(parts: ModelParts, out_dir: str | Path, tokenizer_path: str | None = None) -> Path:
    """Write parts as a Hugging Face Llama directory: config.json, model.safetensors, generation_config.json and
    the tokenizer files. Everything is checked first (finite weights, the run's own tokenizer) and written into a
    temporary folder, so a refused or failed export leaves nothing behind."""
    check_parts(parts)
    load_run_tokenizer(parts.spec, tokenizer_path)  # the run's own tokenizer, or a refusal saying what differs
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; name a new directory")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    last_logged = [time.monotonic()]

    def progress(done: int, total: int) -> None:  # a large model takes a while: say how far it is, now and then
        if done == total or time.monotonic() - last_logged[0] >= 5.0:
            last_logged[0] = time.monotonic()
            logger.info(f"writing weights: {done}/{total} tensors")

    try:
        write_hf_dir(partial, parts.spec, parts.head, parts.stages, progress=progress)
        write_hf_tokenizer(parts.spec, tokenizer_path, partial)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    params = sum(t.numel() for t in parts.head.values()) + sum(t.numel() for s in parts.stages for t in s.values())
    logger.info(f"exported step {parts.step} of run {parts.spec.run_id!r} ({params:,} parameters, "
                f"{parts.spec.num_stages} stages) to {out}")
    return out


# --- from a live swarm ---------------------------------------------------------------------------------------

async def collect_live(network: NetworkConfig, trainer_state: str | None = None,
                       timeout: float = 60.0) -> ModelParts:
    """Pull every stage's weights from live peers, and the head from `trainer_state` or an edge stage's copy."""
    from cfnode.node.discovery import live_stage_map
    from cfnode.node.runtime import connect
    from cfnode.node.swarm_map import online, read_spec
    from cfnode.protocol.service import StageClient

    async with connect(network) as (dht, p2p, _identity):
        spec = await read_spec(dht, network)
        client = StageClient(p2p, spec.max_message_bytes, spec.wire_dtype, spec=spec)
        try:
            own_head = _head_from_file(trainer_state, spec) if trainer_state else None
            for attempt in range(1, CONSISTENT_TRIES + 1):
                stage_map = await live_stage_map(dht, spec, client)
                lost = [s for s in range(1, spec.num_stages + 1) if not online(stage_map.get(s, []))]
                if lost:
                    raise ExportError(f"stage(s) {', '.join(map(str, lost))} of run {spec.run_id!r} have no live "
                                      "peer: the swarm holds no whole model now (wait for newcomers to fill them)")
                snapshots: dict[int, StateSnapshot] = {}
                sources: dict[int, str] = {}
                for stage in range(1, spec.num_stages + 1):
                    started = time.perf_counter()
                    peer, snapshots[stage] = await _download(client, stage, online(stage_map[stage]), timeout)
                    sources[stage] = peer
                    logger.info(f"stage {stage}/{spec.num_stages}: weights of step {snapshots[stage].step} from "
                                f"{peer} in {time.perf_counter() - started:.1f} s")
                if own_head is not None:
                    head, sources[0] = own_head, f"trainer state file {trainer_state}"
                else:
                    edges = [p for s in sorted({1, spec.num_stages}) for p in online(stage_map[s])]
                    head, sources[0] = await _head_copy(client, edges, timeout)
                steps = {0: head.step, **{s: snap.step for s, snap in snapshots.items()}}
                try:
                    step = check_steps(steps)
                except ExportError as e:
                    if attempt == CONSISTENT_TRIES or own_head is not None and head.step < max(steps.values()):
                        raise
                    logger.info(f"{e}; reading the swarm again ({attempt}/{CONSISTENT_TRIES})")
                    await asyncio.sleep(1.0)  # a step in flight lands at every stage within moments
                    continue
                return ModelParts(spec, step, model_state(head), [model_state(snapshots[s]) for s in
                                                                  range(1, spec.num_stages + 1)], sources)
            raise AssertionError("unreachable")
        finally:
            await client.close()


async def _download(client, stage: int, peers: list, timeout: float) -> tuple[str, StateSnapshot]:
    errors = []
    for peer in sorted(peers, key=lambda p: -p.step):
        if peer.state != PeerState.ONLINE:
            continue
        try:
            snap = await client.download_state(peer.peer_id, stage, timeout, weights_only=True)
        except Exception as e:
            errors.append(f"{peer.peer_id}: {type(e).__name__}: {e}")
            continue
        if snap.stage == stage:
            return peer.peer_id, snap
        errors.append(f"{peer.peer_id}: sent stage {snap.stage}")
    raise ExportError(f"no peer of stage {stage} gave its weights ({'; '.join(errors) or 'none online'})")


async def _head_copy(client, peers: list, timeout: float) -> tuple[StateSnapshot, str]:
    copies = []
    for peer in peers:
        if 0 not in peer.kept:
            continue
        try:
            copies.append((await client.get_copy(peer.peer_id, 0, timeout), f"stage {peer.stage} peer {peer.peer_id}"))
        except Exception as e:
            logger.warning(f"the head copy of stage {peer.stage} peer {peer.peer_id} did not come: {e}")
    if not copies:
        raise ExportError("no edge stage holds a copy of the embedding and head; pass the trainer's state file "
                          "(--trainer-state, the trainer's --state)")
    return max(copies, key=lambda c: c[0].step)


def _head_from_file(path: str, spec: RunSpec) -> StateSnapshot:
    state = load_state_file(path, spec.run_id)
    if state.stage != 0:
        raise ExportError(f"{path} is stage {state.stage}'s state file, not the trainer's")
    file_spec = state_file_spec(path)
    if file_spec is not None and file_spec != spec:
        raise ExportError(f"{path} was saved by a run with another spec than the swarm's")
    return state


# --- from saved state files ----------------------------------------------------------------------------------

def collect_offline(paths: Iterable[str]) -> ModelParts:
    """The model from state files: the trainer's (its --state) and one per body stage (a peer's --state)."""
    by_part: dict[int, tuple[StateSnapshot, str]] = {}
    specs: dict[str, RunSpec] = {}
    for path in paths:
        spec = state_file_spec(path)
        if spec is None:
            raise ExportError(f"{path} does not record its run spec (saved by an older cfnode); export from the live "
                              "swarm instead")
        specs[path] = spec
        state = load_state_file(path, spec.run_id)
        if state.stage in by_part:
            # Two replicas of one stage: the newer one is the model; at one step they are identical anyway.
            if state.step <= by_part[state.stage][0].step:
                continue
        by_part[state.stage] = (state, path)
    if not specs:
        raise ExportError("name the state files to export from")
    spec = next(iter(specs.values()))
    others = [p for p, s in specs.items() if s != spec]
    if others:
        raise ExportError(f"{others[0]} is from another run (or another spec) than {next(iter(specs))}")
    missing = [part for part in range(spec.num_stages + 1) if part not in by_part]
    if missing:
        names = ", ".join("the trainer's (head)" if p == 0 else f"stage {p}" for p in missing)
        raise ExportError(f"no state file for {names}; a whole model needs the head and all {spec.num_stages} stages")
    step = check_steps({part: state.step for part, (state, _) in by_part.items()})
    return ModelParts(spec, step, model_state(by_part[0][0]),
                      [model_state(by_part[s][0]) for s in range(1, spec.num_stages + 1)],
                      {part: path for part, (_, path) in by_part.items()})


def check_parts(parts: ModelParts) -> None:
    """Every part holds finite weights (an export of a diverged model is refused: it would load and say nothing)."""
    for part, state in [(0, parts.head), *enumerate(parts.stages, start=1)]:
        for name, tensor in state.items():
            if not torch.isfinite(tensor).all():
                raise ExportError(f"{'the head' if part == 0 else f'stage {part}'}'s {name} holds NaN or inf")

"""A live stage peer refuses bad requests with an error reply, before any compute, and keeps serving."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from cfnode.launcher import cfnode_command
from cfnode.node.runtime import connect
from cfnode.protocol.messages import BAD_REQUEST, BackwardRequest, ForwardRequest, RemoteError, StepRequest
from cfnode.protocol.service import StageClient, StageService
from tests.integration.harness import client_identity, network


def hidden(spec, batch=2, time_steps=None, dtype=torch.float32):
    return torch.randn(batch, time_steps or spec.seq_len, spec.hidden_size).to(dtype)


def bad_requests(spec):
    nan = hidden(spec)
    nan[0, 0, 0] = float("nan")
    inf = hidden(spec)
    inf[1, 2, 3] = float("inf")
    too_big = hidden(spec, batch=int(spec.max_message_bytes / (spec.seq_len * spec.hidden_size * 4)) + 4)
    return {
        "unknown stage": ForwardRequest(7, 0, 0, hidden(spec)),
        "wrong hidden size": ForwardRequest(1, 0, 0, torch.randn(2, 8, spec.hidden_size + 1)),
        "wrong rank": ForwardRequest(1, 0, 0, torch.randn(8, spec.hidden_size)),
        "too long": ForwardRequest(1, 0, 0, hidden(spec, time_steps=spec.seq_len + 1)),
        "integer dtype": ForwardRequest(1, 0, 0, torch.ones(2, 8, spec.hidden_size, dtype=torch.int64)),
        "nan": ForwardRequest(1, 0, 0, nan),
        "inf": ForwardRequest(1, 0, 0, inf),
        "oversized": ForwardRequest(1, 0, 0, too_big),
        "backward shape mismatch": BackwardRequest(1, 0, 0, hidden(spec), hidden(spec, batch=3)),
        "backward nan gradient": BackwardRequest(1, 0, 0, hidden(spec), nan),
    }


async def probe(maddr: str, spec) -> dict[str, str]:
    outcomes = {}
    async with connect(network(maddr, client_identity(maddr))) as (dht, p2p, _identity):
        from cfnode.node.swarm_map import read_stage_map

        (peer,) = (await read_stage_map(dht, spec))[1]
        client = StageClient(p2p, 2**28)
        for name, request in bad_requests(spec).items():
            call = client.forward if isinstance(request, ForwardRequest) else client.backward
            try:
                await call(peer.peer_id, request, timeout=30)
                outcomes[name] = "accepted"
            except RemoteError as e:
                outcomes[name] = e.code
            # After every bad request the peer still serves a good one.
            output = (await client.forward(peer.peer_id, ForwardRequest(1, 0, 0, hidden(spec)), timeout=30)).output
            assert output.shape == (2, spec.seq_len, spec.hidden_size) and torch.isfinite(output).all()

        # Garbage on the wire: undecodable metadata, and a step request of the wrong shape.
        stub = StageService.get_stub(p2p, PeerID.from_base58(peer.peer_id))
        reply = await stub.rpc_step(runtime_pb2.ExpertRequest(metadata=b"\xc1\xff garbage"), timeout=10)
        outcomes["garbage metadata"] = "error" if b"bad_request" in reply.metadata else "accepted"
        try:
            await client.step(peer.peer_id, StepRequest(1, 0, ["someone-else"], ledger={}), timeout=10)
            outcomes["step for another group"] = "accepted"
        except RemoteError as e:
            outcomes["step for another group"] = e.code
        info = await client.info(peer.peer_id, 1, timeout=10)
        outcomes["still online"] = info["state"]
    return outcomes


def test_bad_requests_get_error_replies_and_the_peer_keeps_serving(swarm):
    swarm.spec = swarm.spec.replace(num_stages=1, max_message_mb=1.0)
    swarm.start_bootstrap()
    peer = swarm.start_peer(1)
    swarm.wait_online({1: 1})
    outcomes = asyncio.run(probe(swarm.maddr, swarm.spec))
    expected = {name: BAD_REQUEST for name in bad_requests(swarm.spec)}
    expected.update({"garbage metadata": "error", "step for another group": BAD_REQUEST, "still online": "ONLINE"})
    assert outcomes == expected
    assert peer.process.poll() is None


@pytest.mark.parametrize("command", ["join", "train", "status"])
def test_unreachable_initial_peers_fail_fast_with_one_line(command, tmp_path):
    # A port nothing listens on: the daemon refuses at once; --connect-timeout bounds the wait otherwise.
    maddr = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWCdkevuiJgydjfehGAdoQrXKtk4ERA743agAcMXG8X8tQ"
    extra = ["--steps", "1"] if command == "train" else []
    started = time.monotonic()
    result = subprocess.run(cfnode_command(command, "--initial-peers", maddr, "--connect-timeout", "10", *extra),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - started < 40
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors and "cannot reach initial peers" in errors[-1], result.stderr
    assert "Traceback" not in result.stderr

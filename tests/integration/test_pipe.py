"""Forward and backward calls on a pipe (one long-lived stream per peer) against a live stage peer: concurrent calls
get their own replies, a refused call leaves the others alone, a broken pipe fails its calls at once, and the next
call opens a new one."""

from __future__ import annotations

import asyncio
import time

import msgpack
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from cfnode.node.runtime import connect
from cfnode.node.swarm_map import read_stage_map
from cfnode.protocol.messages import (
    BAD_REQUEST,
    BackwardReply,
    BackwardRequest,
    ForwardRequest,
    ProtocolError,
    RemoteError,
    TruncatedStream,
)
from cfnode.protocol.pipe import Pipe
from cfnode.protocol.service import MAX_PIPE_CALLS, StageClient, StageService
from tests.integration.harness import client_identity, network, wait_until


async def exercise(maddr: str, spec) -> dict:
    async with connect(network(maddr, client_identity(maddr))) as (dht, p2p, _identity):
        (record,) = (await read_stage_map(dht, spec))[1]
        peer = record.peer_id
        piped, streamed = StageClient(p2p, 2**26), StageClient(p2p, 2**26, pipe=False)
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randn(2, spec.seq_len, spec.hidden_size, generator=gen) for _ in range(6)]
        grad = torch.randn(2, spec.seq_len, spec.hidden_size, generator=gen)
        out: dict = {}

        # Six forwards at once on one pipe: each reply belongs to its own call.
        replies = await asyncio.gather(*[piped.forward(peer, ForwardRequest(1, 0, mb, x), 30)
                                         for mb, x in enumerate(inputs)])
        alone = [await streamed.forward(peer, ForwardRequest(1, 0, mb, x), 30) for mb, x in enumerate(inputs)]
        out["forwards match"] = all(torch.equal(p.output, s.output) for p, s in zip(replies, alone))
        out["one stream"] = len(piped._pipes) == 1
        # More calls than a pipe runs at once (MAX_PIPE_CALLS): the rest wait in the stream, and all are answered.
        many = await asyncio.gather(*[piped.forward(peer, ForwardRequest(1, 0, mb, inputs[mb % 6]), 60)
                                      for mb in range(3 * MAX_PIPE_CALLS)])
        out["past the limit"] = all(torch.equal(r.output, alone[mb % 6].output) for mb, r in enumerate(many))

        # A refused call among good ones: only it fails.
        wrong = torch.randn(2, spec.seq_len, spec.hidden_size + 1)
        results = await asyncio.gather(
            piped.backward(peer, BackwardRequest(1, 0, 0, inputs[0], grad), 30),
            piped.forward(peer, ForwardRequest(1, 0, 1, wrong), 30),
            piped.backward(peer, BackwardRequest(1, 0, 2, inputs[2], grad), 30),
            return_exceptions=True)
        out["refused alone"] = [r.code if isinstance(r, RemoteError) else type(r).__name__ for r in results]
        recomputed = await streamed.backward(peer, BackwardRequest(1, 0, 3, inputs[0], grad), 30)
        out["backward matches"] = torch.allclose(results[0].grad_input, recomputed.grad_input, atol=1e-6) \
            if isinstance(results[0], BackwardReply) else False

        # A message the peer cannot attribute to a call gets an error reply without a call number, and the caller
        # drops that pipe: its calls in flight fail, and the next call opens a new pipe and works.
        pipe = piped._pipes[peer]
        async with pipe._lock:
            await P2P.send_protobuf(runtime_pb2.ExpertRequest(metadata=msgpack.packb({"method": "forward"})),
                                    pipe._stream.writer)
        try:
            await asyncio.wait_for(pipe.call("forward", ForwardRequest(1, 0, 4, inputs[4]).envelope()), 30)
            out["call after it"] = "answered"  # its reply may come before the peer's refusal
        except (ProtocolError, TruncatedStream) as e:
            out["call after it"] = type(e).__name__
        except RemoteError as e:  # the refusal says why: the message named no call
            out["call after it"] = e.code
        await wait_for_async(lambda: pipe._stream is None or pipe._stream.closed, 30, "the refused pipe to close")
        reopened = await piped.forward(peer, ForwardRequest(1, 0, 5, inputs[5]), 30)
        out["reopened"] = torch.equal(reopened.output, alone[5].output)
        await piped.close()
        await streamed.close()
        return out


async def wait_for_async(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_pipe_calls_run_concurrently_and_fail_alone(swarm):
    swarm.spec = swarm.spec.replace(num_stages=1)
    swarm.start_bootstrap()
    swarm.start_peer(1)
    swarm.wait_online({1: 1})
    out = asyncio.run(exercise(swarm.maddr, swarm.spec))
    assert out["forwards match"]
    assert out["one stream"]
    assert out["past the limit"]
    assert out["refused alone"] == ["BackwardReply", BAD_REQUEST, "BackwardReply"]
    assert out["backward matches"]
    assert out["call after it"] in ("answered", BAD_REQUEST, "ProtocolError", "TruncatedStream")
    assert out["reopened"]


async def calls_fail_when_the_peer_dies(maddr: str, spec, kill) -> tuple[list[str], float]:
    async with connect(network(maddr, client_identity(maddr))) as (dht, p2p, _identity):
        (record,) = (await read_stage_map(dht, spec))[1]
        pipe = Pipe(p2p, record.peer_id, StageService._get_handle_name(None, "rpc_pipe"), 2**26)
        hidden = torch.randn(2, spec.seq_len, spec.hidden_size)
        await pipe.call("forward", ForwardRequest(1, 0, 0, hidden).envelope())  # the pipe is open
        # Many calls in flight while the peer is killed: those not answered yet must fail at once, as a cut stream
        # (worth sending again elsewhere), not by waiting out a deadline.
        calls = [asyncio.create_task(pipe.call("forward", ForwardRequest(1, 0, mb % 8, hidden).envelope()))
                 for mb in range(256)]
        await asyncio.sleep(0)
        killed = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, kill)
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)
        seconds = time.monotonic() - killed
        await pipe.close()
        return [type(r).__name__ for r in results if isinstance(r, BaseException)], seconds


def test_a_dead_peer_fails_the_calls_in_flight_at_once(swarm):
    swarm.spec = swarm.spec.replace(num_stages=1)
    swarm.start_bootstrap()
    child = swarm.start_peer(1)
    swarm.wait_online({1: 1})

    def kill() -> None:
        swarm.kill(child)
        wait_until(lambda: child.process.poll() is not None, 30, "the peer to exit")

    failures, seconds = asyncio.run(calls_fail_when_the_peer_dies(swarm.maddr, swarm.spec, kill))
    assert failures, "every call was answered before the kill: nothing was in flight"
    # A call still queued to send when the stream broke tries a new one, which the dead peer's side refuses.
    assert "TruncatedStream" in failures and "TimeoutError" not in failures, failures
    assert seconds < 30, f"the calls in flight took {seconds:.1f} s to fail"

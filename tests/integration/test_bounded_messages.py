"""A live stage peer reads no message longer than the run spec allows: a stream whose length prefix claims 3 GiB is
refused from the prefix alone, before the bytes behind it are read into memory, and the peer keeps serving."""

from __future__ import annotations

import asyncio

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from cfnode.node.runtime import connect
from cfnode.protocol.framing import read_message
from cfnode.protocol.messages import BAD_REQUEST, ForwardRequest, meta_only
from cfnode.protocol.service import StageClient, StageService
from tests.integration.harness import client_identity, network, wait_until

CLAIMED = 3 * 2**30  # what the length prefix announces
SENT = 384 * 2**20  # what the attack pushes behind it, unless the peer closes the stream first
BLOCK = 2**20
# Every handler that reads a stream: the pipe, two chunked request streams, and a server stream's single request.
HANDLERS = ("rpc_pipe", "rpc_forward", "rpc_put_copy", "rpc_download_state")


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def flood(p2p: P2P, peer_id: str, handle_name: str) -> dict:
    """Open a raw stream to a handler, send a prefix claiming CLAIMED bytes and then up to SENT bytes of zeros, while
    reading the replies (within 1 MiB each) until the peer closes the stream."""
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handle_name)
    writer.write(P2P.MESSAGE_MARKER + CLAIMED.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
    sent = 0

    async def send() -> None:
        nonlocal sent
        block = bytes(BLOCK)
        try:
            while sent < SENT:
                writer.write(block)
                await writer.drain()
                sent += BLOCK
        except ConnectionError:  # the peer closed the stream
            pass

    async def receive() -> list:
        replies = []
        while True:
            try:
                replies.append(await read_message(reader, runtime_pb2.ExpertResponse, 2**20))
            except (asyncio.IncompleteReadError, ConnectionError):  # the peer closed the stream
                return replies

    sending, receiving = asyncio.create_task(send()), asyncio.create_task(receive())
    try:
        await asyncio.wait({sending, receiving}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        # Either way, the other gets a moment: a peer that closed fails the sends still queued, and a peer that was
        # sent everything has had the time to answer or close.
        await asyncio.wait({sending, receiving}, timeout=10)
    finally:
        sending.cancel()
        receiving.cancel()
        writer.close()
    closed = receiving.done() and not receiving.cancelled()
    return {"sent": sent, "closed": closed, "replies": receiving.result() if closed else []}


async def attack(maddr: str, peer_id: str, pid: int, spec) -> dict:
    out: dict = {}
    async with connect(network(maddr, client_identity(maddr))) as (_dht, p2p, _identity):
        client = StageClient(p2p, spec.max_message_bytes, spec.wire_dtype, spec=spec)
        hidden = torch.randn(2, spec.seq_len, spec.hidden_size)

        async def serves() -> bool:
            reply = await client.forward(peer_id, ForwardRequest(1, 0, 0, hidden), 30)
            info = await client.info(peer_id, 1, 30)
            return reply.output.shape == hidden.shape and info["state"] == "ONLINE"

        assert await serves()  # warm: the compute's own peak memory is behind us before measuring
        for method in HANDLERS:
            before = peak_rss(pid)
            result = await flood(p2p, peer_id, StageService._get_handle_name(None, method))
            replies = result.pop("replies")
            result["codes"] = [meta_only(r).meta.get("error", {}).get("code") for r, _ in replies if r is not None]
            out[method] = {**result, "growth": peak_rss(pid) - before, "serves after": await serves()}
        await client.close()
    return out


def test_a_huge_length_prefix_is_refused_before_its_bytes_are_read(swarm):
    swarm.spec = swarm.spec.replace(num_stages=1)
    swarm.start_bootstrap()
    child = swarm.start_peer(1)
    swarm.wait_online({1: 1})
    (record,) = swarm.online_peers(1)
    out = asyncio.run(attack(swarm.maddr, record["peer_id"], child.process.pid, swarm.spec))
    for method, result in out.items():
        # (a) The peer's peak memory grew by a sliver of what was claimed and of what an unbounded reader would
        # have buffered (everything sent until the stream closed, up to SENT).
        assert result["growth"] < 48 * 2**20, (method, result)
        # (b) It refused: it closed the stream long before the attack was done, after an error reply if that reply
        # got through ahead of the reset.
        assert result["closed"] and result["sent"] < SENT, (method, result)
        assert all(code == BAD_REQUEST for code in result["codes"]), (method, result)
        # (c) And it serves the next caller as before.
        assert result["serves after"], (method, result)
    refused = f"refused a request: a message of {CLAIMED} bytes exceeds"
    wait_until(lambda: swarm.log(child).count(refused) >= len(HANDLERS), 30, "the peer to log each refusal")
    assert child.process.poll() is None

"""The bounded reader and the stream handler built on it, over a local socket in hivemind's framing (no daemon)."""

import asyncio
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.control import P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from cfnode.protocol.framing import (
    MAX_ERROR_BYTES,
    MessageTooLarge,
    bounded_stream_handler,
    call_stream,
    read_message,
)
from cfnode.protocol.messages import ProtocolError

Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse
HUGE = 3 * 2**30


def frame(message, marker: bytes = P2P.MESSAGE_MARKER) -> bytes:
    data = message.SerializeToString()
    return marker + len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data


def claim(length: int, marker: bytes = P2P.MESSAGE_MARKER) -> bytes:
    """A marker and a length prefix, without the message they announce."""
    return marker + length.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)


def reader_of(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def read(data: bytes, max_bytes: int = 2**20, eof: bool = True):
    async def main():
        # A short deadline: a reader that waited for the claimed bytes would hang, not fail.
        return await asyncio.wait_for(read_message(reader_of(data, eof), Request, max_bytes), 5)

    return asyncio.run(main())


def test_read_message_round_trip():
    message = Request(metadata=b"meta", tensors=[runtime_pb2.Tensor(buffer=b"\x01" * 100, dtype="float32")])
    assert read(frame(message)) == (message, None)
    assert read(frame(P2P.END_OF_STREAM, P2P.ERROR_MARKER)) == (None, RPCError())
    assert read(frame(RPCError(message="boom"), P2P.ERROR_MARKER))[1].message == "boom"


def test_read_message_accepts_exactly_the_limit():
    message = Request(metadata=b"x" * 1000)
    assert read(frame(message), max_bytes=message.ByteSize())[0] == message
    with pytest.raises(MessageTooLarge):
        read(frame(message), max_bytes=message.ByteSize() - 1)


def test_read_message_refuses_a_huge_claim_before_reading_it():
    # The stream stays open and holds only a few bytes of the 3 GiB it claims: refused from the prefix alone.
    with pytest.raises(MessageTooLarge, match=str(HUGE)):
        read(claim(HUGE) + b"\x00" * 1000, eof=False)
    with pytest.raises(MessageTooLarge):  # errors are bounded too, however large messages may be
        read(claim(MAX_ERROR_BYTES + 1, P2P.ERROR_MARKER), max_bytes=2**30, eof=False)


@pytest.mark.parametrize("data", [b"\x07" + claim(3)[1:] + b"abc", claim(3) + b"\xff\xff\xff"])
def test_read_message_refuses_bad_framing(data):
    with pytest.raises(ProtocolError):
        read(data)


def test_read_message_at_the_end_of_a_stream():
    with pytest.raises(asyncio.IncompleteReadError):
        read(b"")
    with pytest.raises(asyncio.IncompleteReadError):
        read(frame(Request(metadata=b"cut"))[:-1])


# --- the stream handler, served on a unix socket -------------------------------------------------------------------


async def serve(handler, stream_input: bool = True, max_request_bytes: int = 2**16):
    """Serve `handler` as the daemon would hand it a stream: returns the socket path and the server."""
    handle = bounded_stream_handler("Test.rpc_test", "local", handler, Request, max_request_bytes, stream_input,
                                    lambda e: Response(metadata=f"refused: {e}".encode()))
    path = str(Path(tempfile.mkdtemp()) / "handler.sock")
    caller = SimpleNamespace(peer_id="caller")
    server = await asyncio.start_unix_server(lambda r, w: handle(caller, r, w), path=path)
    return path, server


async def replies_to(path: str, data: bytes) -> list:
    """Send raw bytes on a stream and read every reply until the handler closes it."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    await writer.drain()
    replies = []
    try:
        while True:
            replies.append(await asyncio.wait_for(read_message(reader, Response, 2**20), 10))
    except asyncio.IncompleteReadError:
        pass
    writer.close()
    return replies


def run_handler(handler, data: bytes, stream_input: bool = True) -> list:
    async def main():
        path, server = await serve(handler, stream_input)
        async with server:
            return await replies_to(path, data)

    return asyncio.run(main())


def test_a_streaming_handler_reads_every_request_and_replies():
    async def handler(requests, context):
        assert context.remote_id == "caller" and context.handle_name == "Test.rpc_test"
        seen = [r.metadata async for r in requests]
        yield Response(metadata=b",".join(seen))

    data = b"".join(frame(Request(metadata=m)) for m in (b"a", b"b", b"c")) + frame(P2P.END_OF_STREAM, P2P.ERROR_MARKER)
    assert [reply.metadata for reply, _ in run_handler(handler, data)] == [b"a,b,c"]


def test_an_oversized_request_reaches_the_handler_as_an_error_and_the_stream_closes():
    refused = []

    async def handler(requests, context):
        try:
            async for _ in requests:
                pass
        except ProtocolError as e:
            refused.append(e)
            yield Response(metadata=b"error reply")

    # A good request, then a prefix claiming 3 GiB and some of its bytes; the stream is left open by the caller.
    data = frame(Request(metadata=b"ok")) + claim(HUGE) + b"\x00" * 2**16
    assert [reply.metadata for reply, _ in run_handler(handler, data)] == [b"error reply"]
    assert len(refused) == 1 and isinstance(refused[0], MessageTooLarge)


def test_a_single_request_handler_answers_a_refused_request_with_the_refusal():
    async def handler(request, context):
        raise AssertionError("never called")
        yield

    replies = run_handler(handler, claim(HUGE) + b"\x00" * 100, stream_input=False)
    assert len(replies) == 1 and replies[0][0].metadata.startswith(b"refused: a message of 3221225472 bytes")


def test_a_single_request_handler_gets_its_request():
    async def handler(request, context):
        yield Response(metadata=request.metadata + b"!")
        yield Response(metadata=b"more")

    data = frame(Request(metadata=b"hi")) + frame(P2P.END_OF_STREAM, P2P.ERROR_MARKER)
    assert [reply.metadata for reply, _ in run_handler(handler, data, stream_input=False)] == [b"hi!", b"more"]


def test_a_failing_handler_sends_an_rpc_error():
    async def handler(requests, context):
        async for _ in requests:
            raise RuntimeError("broken")
        yield

    replies = run_handler(handler, frame(Request(metadata=b"x")))
    assert len(replies) == 1 and replies[0][0] is None and "broken" in replies[0][1].message


def test_a_handler_that_is_done_closes_the_stream_without_reading_on():
    async def handler(requests, context):
        yield Response(metadata=b"done")  # answers at once, reads nothing

    # The caller keeps the stream open and never ends it: the handler's end alone closes it.
    assert [reply.metadata for reply, _ in run_handler(handler, frame(Request(metadata=b"x")))] == [b"done"]


# --- the caller's side ---------------------------------------------------------------------------------------------


class SocketP2P:
    """What call_stream needs of a P2P: a stream to a handler, here a unix socket."""

    def __init__(self, path: str):
        self.path = path

    async def call_binary_stream_handler(self, peer, name):
        reader, writer = await asyncio.open_unix_connection(self.path)
        return None, reader, writer


def call(handler, requests: list, max_reply_bytes: int = 2**20) -> list:
    async def main():
        path, server = await serve(handler)

        async def stream():
            for request in requests:
                yield request

        async with server:
            replies = await call_stream(SocketP2P(path), "peer", "Test.rpc_test", stream(), Response, max_reply_bytes)
            return [reply.metadata async for reply in replies]

    return asyncio.run(main())


def test_call_stream_sends_requests_and_reads_replies():
    async def handler(requests, context):
        async for request in requests:
            yield Response(metadata=request.metadata.upper())

    assert call(handler, [Request(metadata=b"a"), Request(metadata=b"b")]) == [b"A", b"B"]


def test_call_stream_refuses_an_oversized_reply():
    async def handler(requests, context):
        async for _ in requests:
            pass
        yield Response(metadata=b"x" * 5000)

    assert call(handler, [Request()], max_reply_bytes=5010) == [b"x" * 5000]
    with pytest.raises(MessageTooLarge):
        call(handler, [Request()], max_reply_bytes=4000)


def test_call_stream_raises_the_handlers_error():
    async def handler(requests, context):
        raise RuntimeError("kaput")
        yield

    with pytest.raises(P2PHandlerError, match="kaput"):
        call(handler, [Request()])

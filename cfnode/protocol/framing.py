"""Protobuf messages on a libp2p stream, read with a bound on their size.

hivemind frames each message of a stream as a marker byte (message or error), an 8-byte big-endian length and the
serialised protobuf. Its reader (`P2P.receive_protobuf`) then reads as many bytes as the length claims, so a peer that
announces a 4 GiB message makes the reader allocate 4 GiB. `read_message` refuses a length over its bound before it
reads a byte of the message. The framing stays hivemind's, so either end may still be plain hivemind.

`bounded_stream_handler` is hivemind's protobuf stream handler (`P2P._add_protobuf_stream_handler`) built on that
reader, `call_stream` its caller side (`P2P.iterate_protobuf_handler`), and `BoundedServicer` a ServicerBase whose
streamed RPCs are registered with them. Unary RPCs stay hivemind's: the p2p daemon itself reads those with a bound
(its persistentConnMaxMsgSize, hivemind's DEFAULT_MAX_MSG_SIZE of 4 MiB) before Python sees them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import closing, suppress
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.control import P2PHandlerError, StreamHandler
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto.p2pd_pb2 import RPCError
from hivemind.utils.logging import get_logger

from cfnode.protocol.messages import ProtocolError

logger = get_logger(__name__)
M = TypeVar("M", bound=Message)

MAX_ERROR_BYTES = 2**16  # an RPCError is one line of text; the end of a stream is an empty one
PREFETCH = 5  # requests read ahead of the handler, as in hivemind's stream handlers
REFUSAL_GRACE = 5.0  # seconds a handler has to send its error reply for a refused stream before the stream is closed
DISCARD_SECONDS = 1.0  # then, at most this long, the rest of a refused stream is read and dropped (see _part_ways)


class MessageTooLarge(ProtocolError):
    """A message whose length passes the reader's bound. Its bytes were left unread, so the stream cannot go on."""


async def read_message(reader: asyncio.StreamReader, message_type: type[M],
                       max_bytes: int) -> tuple[M | None, RPCError | None]:
    """The next message of a stream, or the RPCError in its place (hivemind sends an empty one to end a stream).
    Raises MessageTooLarge before reading a message longer than `max_bytes`, ProtocolError for bad framing, and
    asyncio.IncompleteReadError when the stream ends."""
    marker = await reader.readexactly(1)
    if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
        raise ProtocolError(f"invalid message marker {marker!r}")
    length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    is_error = marker == P2P.ERROR_MARKER
    limit = MAX_ERROR_BYTES if is_error else max_bytes
    if length > limit:
        raise MessageTooLarge(f"a message of {length} bytes exceeds the limit of {limit} bytes")
    data = await reader.readexactly(length)
    try:
        return (None, RPCError.FromString(data)) if is_error else (message_type.FromString(data), None)
    except DecodeError:
        raise ProtocolError(f"undecodable {'error' if is_error else message_type.__name__} message") from None


Handler = Callable[[Any, P2PContext], AsyncIterator[Message] | Awaitable[Message]]
Refusal = Callable[[ProtocolError], Message]


def bounded_stream_handler(handle_name: str, local_id: PeerID, handler: Handler, request_type: type[Message],
                           max_request_bytes: int, stream_input: bool, refusal: Refusal) -> StreamHandler:
    """A stream handler for the p2p daemon that runs `handler` like hivemind's protobuf stream handlers do, but reads
    each request with `read_message`. A request that cannot be read (too large, bad framing) reaches a streaming
    handler as a ProtocolError raised by its request iterator, so the handler answers with its own error reply; a
    single-request handler is answered with `refusal(error)` instead. The stream is closed after either (_part_ways)."""

    async def handle(stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=handle_name, local_id=local_id, remote_id=stream_info.peer_id)
        # Requests, then None at the end of the stream, or the ProtocolError that stopped reading it.
        requests: asyncio.Queue[Message | ProtocolError | None] = asyncio.Queue(PREFETCH)

        async def process() -> None:
            try:
                if stream_input:
                    output = handler(_from_queue(requests), context)
                else:
                    try:
                        request = await _single(_from_queue(requests))
                    except ProtocolError as e:
                        await P2P.send_protobuf(refusal(e), writer)
                        return
                    output = handler(request, context)
                await _send_all(output, writer)
            except Exception as e:  # as hivemind does: the caller learns of it as an RPCError
                logger.warning(f"{handle_name} failed: {type(e).__name__}: {e}")
                with suppress(Exception):
                    await P2P.send_protobuf(RPCError(message=str(e)), writer)

        with closing(writer):
            processing = asyncio.create_task(process())
            refused = False
            try:
                refused = await _receive(reader, request_type, max_request_bytes, requests, processing, handle_name)
            except Exception as e:  # a broken connection to the daemon: nothing more to read or to answer
                logger.debug(f"{handle_name}: receiving failed: {type(e).__name__}: {e}")
            finally:
                processing.cancel()
            if refused:
                await _part_ways(reader, writer, max_request_bytes)

    return handle


async def _receive(reader: asyncio.StreamReader, request_type: type[Message], max_bytes: int,
                   requests: asyncio.Queue, processing: asyncio.Task, handle_name: str) -> bool:
    """Read requests into the queue until the stream ends, the handler is done, or a request is refused (then
    True, once the handler has sent its error reply or REFUSAL_GRACE has passed)."""
    while True:
        receiving = asyncio.ensure_future(read_message(reader, request_type, max_bytes))
        if not await _before(processing, receiving):
            return False  # the handler has answered: what the caller still sends is not read
        try:
            request, _ = receiving.result()  # None for the RPCError that ends the stream
        except asyncio.IncompleteReadError:  # the caller closed the stream or died
            return False
        except ProtocolError as e:  # the rest of the stream cannot be framed: the handler sends its error reply
            logger.info(f"{handle_name}: refused a request: {e}")
            if await _before(processing, asyncio.ensure_future(requests.put(e))):
                await asyncio.wait({processing}, timeout=REFUSAL_GRACE)
            return True
        if not await _before(processing, asyncio.ensure_future(requests.put(request))):
            return False
        if request is None:  # the caller said all it will: the handler finishes on its own
            await asyncio.wait({processing})
            return False


async def _part_ways(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: int) -> None:
    """End a refused stream so that its error reply gets through. Closing on unread bytes resets the stream, and a
    reset can overtake the reply; so this side ends its writing (the caller sees the end after the reply, and its
    daemon closes the stream), then reads and drops what is still arriving, 64 KiB at a time, until the stream
    ends, `budget` bytes or DISCARD_SECONDS."""

    async def discard() -> None:
        left = budget
        while left > 0 and (data := await reader.read(min(2**16, left))):
            left -= len(data)

    with suppress(Exception):
        writer.write_eof()
        await asyncio.wait_for(discard(), DISCARD_SECONDS)


async def _before(processing: asyncio.Task, step: asyncio.Future) -> bool:
    """Wait for `step` unless the handler finishes first (then `step` is cancelled). True if `step` completed."""
    await asyncio.wait({processing, step}, return_when=asyncio.FIRST_COMPLETED)
    if step.done():
        return True
    step.cancel()
    return False


async def _from_queue(requests: asyncio.Queue) -> AsyncIterator[Message]:
    while (item := await requests.get()) is not None:
        if isinstance(item, ProtocolError):
            raise item
        yield item


async def _single(requests: AsyncIterator[Message]) -> Message:
    """The one request of a server-streaming call, once the caller has ended its side (as hivemind's asingle)."""
    found: list[Message] = []
    async for request in requests:
        found.append(request)
        if len(found) > 1:
            raise ProtocolError("a call that takes one request got more")
    if not found:
        raise ProtocolError("a call that takes one request got none")
    return found[0]


async def _send_all(output: AsyncIterator[Message] | Awaitable[Message], writer: asyncio.StreamWriter) -> None:
    replies = output if isinstance(output, AsyncIterable) else _once(output)
    async for reply in replies:
        try:
            await P2P.send_protobuf(reply, writer)
        except Exception as e:  # the caller closed the stream or it broke; the caller learns of it on its side
            logger.debug(f"sending a reply failed: {type(e).__name__}: {e}")
            return


async def _once(reply: Awaitable[Message]) -> AsyncIterator[Message]:
    yield await reply


async def call_stream(p2p: P2P, peer: PeerID, handle_name: str, requests: AsyncIterable[Message],
                      reply_type: type[M], max_reply_bytes: int) -> AsyncIterator[M]:
    """Call a streamed RPC: send `requests` (then the end of stream) while the replies are read, each refused
    with MessageTooLarge before it is read if it passes `max_reply_bytes`. An RPCError reply raises
    P2PHandlerError, as hivemind's callers do. Close the returned iterator (contextlib.aclosing) to drop the stream
    early."""
    _, reader, writer = await p2p.call_binary_stream_handler(peer, handle_name)

    async def write() -> None:
        async for request in requests:
            await P2P.send_protobuf(request, writer)
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)

    writing = asyncio.create_task(write())

    async def read() -> AsyncIterator[M]:
        with closing(writer):
            try:
                while True:
                    try:
                        reply, error = await read_message(reader, reply_type, max_reply_bytes)
                    except asyncio.IncompleteReadError:  # the handler ended the stream
                        break
                    if error is not None:
                        raise P2PHandlerError(f"{handle_name} at {peer} failed: {error.message}")
                    yield reply
                await writing  # a request that could not be sent fails the call, as with hivemind
            finally:
                writing.cancel()
                if writing.done() and not writing.cancelled():
                    writing.exception()  # seen here; the call's own outcome says what happened

    return read()


class BoundedServicer(ServicerBase):
    """A ServicerBase whose streamed RPCs read every request message with a bound (`stream_limit`), instead of
    hivemind's unbounded reader. Stubs, handle names and the framing on the wire stay hivemind's."""

    def stream_limit(self, method_name: str) -> int:
        """The largest request message the streamed RPC `method_name` reads."""
        raise NotImplementedError

    def refusal(self, error: ProtocolError) -> Message:
        """The reply to a server-streaming call whose one request was refused before it was read."""
        raise NotImplementedError

    async def add_p2p_handlers(self, p2p: P2P, wrapper: Any = None, *, namespace: str | None = None,
                               balanced: bool = False) -> None:
        self._collect_rpc_handlers()
        servicer = self if wrapper is None else wrapper

        async def add(rpc) -> None:
            name = self._get_handle_name(namespace, rpc.method_name)
            method = getattr(servicer, rpc.method_name)
            if not rpc.stream_input and not rpc.stream_output:  # unary: bounded by the daemon (see above)
                await p2p.add_protobuf_handler(name, method, rpc.request_type, balanced=balanced)
                return
            handler = bounded_stream_handler(name, p2p.peer_id, method, rpc.request_type,
                                             self.stream_limit(rpc.method_name), rpc.stream_input, self.refusal)
            await p2p.add_binary_stream_handler(name, handler, balanced=balanced)

        await asyncio.gather(*[add(rpc) for rpc in self._rpc_handlers])

"""A pipe: one long-lived stream to a stage peer that carries many forward and backward calls at once.

A call on its own stream pays for opening that stream: a round trip through both p2p daemons, a new socket on
each side and a handler task; on this daemon that is about half the CPU of a small call. A pipe opens its stream
once. Each call is one message tagged with a `call` number that its reply repeats, so calls run concurrently and
replies come back in the order they finish.

A broken stream fails every call in flight on it with `TruncatedStream` (worth sending again: the next call opens a
fresh stream). The peer's side is `StageService.rpc_pipe`.
"""

from __future__ import annotations

import asyncio
import itertools
from contextlib import suppress
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from cfnode.protocol.framing import read_message
from cfnode.protocol.limits import message_bytes
from cfnode.protocol.messages import (
    INTERNAL,
    Envelope,
    ProtocolError,
    RemoteError,
    TruncatedStream,
    decode_tensors,
    raise_for_error,
    to_message,
    unpack_meta,
)

Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse
PIPE_METHODS = ("forward", "backward")
# Seconds a failed send waits for the peer's reply already on its way (a refusal), before failing the call as broken.
REFUSAL_GRACE = 2.0


@dataclass
class _Stream:
    """One opened stream of a pipe, with the calls waiting on it for their replies."""

    writer: asyncio.StreamWriter
    # call number -> its reply's metadata and tensors, once they arrive
    pending: dict[int, asyncio.Future[tuple[dict, list[runtime_pb2.Tensor]]]] = field(default_factory=dict)
    reader: asyncio.Task | None = None
    closed: bool = False

    def close(self, error: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        self.writer.close()
        if self.reader is not None and self.reader is not asyncio.current_task():
            self.reader.cancel()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()


class Pipe:
    def __init__(self, p2p: P2P, peer_id: str, handle_name: str, max_reply_bytes: int):
        self.p2p, self.peer_id, self.handle_name = p2p, peer_id, handle_name
        self.max_reply_bytes = max_reply_bytes
        self._stream: _Stream | None = None
        self._numbers = itertools.count()
        self._lock = asyncio.Lock()  # one opener and one writer at a time: messages must not interleave

    async def call(self, method: str, envelope: Envelope, wire: torch.dtype | None = None) -> Envelope:
        """Send one call and wait for its reply (the caller bounds the wait). Raises RemoteError for an error reply,
        TruncatedStream when the stream broke first, and the transport's error when it cannot be opened."""
        number = next(self._numbers)
        message = to_message(Envelope({**envelope.meta, "call": number, "method": method}, envelope.tensors),
                             Request, wire)
        async with self._lock:
            stream = self._stream
            if stream is None or stream.closed:
                stream = self._stream = await self._open()
            reply = stream.pending[number] = asyncio.get_running_loop().create_future()
            try:
                await P2P.send_protobuf(message, stream.writer)
            except Exception as e:
                # A peer that refuses the stream (an unauthorised caller) answers why and ends it, maybe while this
                # message is still being sent: let the reader deliver that answer before calling it a break.
                if stream.reader is not None:
                    with suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(stream.reader), REFUSAL_GRACE)
                stream.close(TruncatedStream(f"the pipe broke while sending: {type(e).__name__}"))
        try:
            meta, tensors = await reply
        finally:
            stream.pending.pop(number, None)
        raise_for_error(Envelope(meta))
        return Envelope(meta, decode_tensors(tensors, self.max_reply_bytes))

    def reset(self, reason: str) -> None:
        """Drop the current stream (its calls fail); the next call opens a new one. For a peer that stopped
        answering: a stream the daemon has silently stalled would otherwise hold every later call too."""
        if self._stream is not None:
            self._stream.close(TruncatedStream(f"the pipe was reset: {reason}"))
            self._stream = None

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None or stream.closed:
            return
        with suppress(Exception):
            await P2P.send_protobuf(P2P.END_OF_STREAM, stream.writer)  # the peer finishes what it has, then ends
        stream.close(TruncatedStream("the pipe was closed"))

    async def _open(self) -> _Stream:
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(self.peer_id),
                                                                      self.handle_name)
        stream = _Stream(writer)
        stream.reader = asyncio.create_task(self._read(stream, reader))
        return stream

    async def _read(self, stream: _Stream, reader: asyncio.StreamReader) -> None:
        error: BaseException = TruncatedStream("the pipe's stream ended with calls in flight")
        try:
            while True:
                # Refused before it is read if it is longer than a reply could be: the stream then closes.
                response, rpc_error = await read_message(reader, Response, message_bytes(self.max_reply_bytes))
                if rpc_error is not None:  # the peer's handler itself failed: nothing more comes on this stream
                    error = RemoteError(INTERNAL, rpc_error.message)
                    break
                meta = unpack_meta(response.metadata)
                number = meta.pop("call", None)
                future = stream.pending.get(number) if isinstance(number, int) else None
                if future is not None and not future.done():
                    future.set_result((meta, list(response.tensors)))
                elif number is None:  # the peer could not tell which call this answers: it refused the stream
                    error = ProtocolError("the peer refused the pipe: a reply without a call number")
                    if isinstance(meta.get("error"), dict):  # and said why (an unauthorised caller, say)
                        try:
                            raise_for_error(Envelope(meta))
                        except RemoteError as refused:
                            error = refused
                    break
                # else: the reply to a call that already gave up waiting
        except asyncio.CancelledError:
            return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as e:  # undecodable framing or metadata
            error = ProtocolError(f"bad reply on the pipe: {type(e).__name__}: {e}")
        stream.close(error)

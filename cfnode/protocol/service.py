"""The stage peer's RPC surface (hivemind ServicerBase) and the client calls that match it.

Handler names derive from this class's name, so peers and trainers share it. Every handler decodes and
checks its request before handing it to the backend, and turns any refusal into an error reply: a bad
request never reaches compute and never takes the peer down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

# hivemind recognises streaming RPCs by typing.AsyncIterator annotations, not collections.abc ones.
from typing import AsyncIterator, Protocol  # noqa: UP035

import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.logging import get_logger

from cfnode.config import RunSpec
from cfnode.protocol.messages import (
    BAD_REQUEST,
    INTERNAL,
    MAX_METADATA_BYTES,
    STATE_CHUNK_BYTES,
    TRUNCATED,
    BackwardReply,
    BackwardRequest,
    Envelope,
    ForwardReply,
    ForwardRequest,
    ProtocolError,
    StageRequest,
    StateSnapshot,
    StepReply,
    StepRequest,
    TruncatedStream,
    decode_tensors,
    error_envelope,
    from_chunks,
    from_message,
    raise_for_error,
    to_chunks,
    to_message,
    unpack_meta,
    wire_dtype,
)
from cfnode.protocol.pipe import PIPE_METHODS, Pipe
from cfnode.protocol.timing import add_time, collecting, timed

logger = get_logger(__name__)

# Calls a pipe holds at once; more wait in the stream. One compute worker runs them one by one anyway, so this only
# bounds the memory a caller can pin with calls it sends faster than the peer computes.
MAX_PIPE_CALLS = 64
MAX_STATE_BYTES = 2**36  # weights and optimiser state of a stage; bounded by memory, not by policy

Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse


class RequestRefused(Exception):
    """Raised by a backend to refuse a request with an error code (see messages.py) and a reason."""

    def __init__(self, code: str, message: str, peers: list[str] | None = None):
        super().__init__(message)
        self.code = code
        self.peers = peers


class StageBackend(Protocol):
    """What a stage peer implements; the service does the wire work around it."""

    spec: RunSpec
    peer_id: str
    max_request_bytes: int  # activations and gradients
    max_copy_bytes: int  # a state copy to keep (put_copy)

    async def forward(self, request: ForwardRequest) -> ForwardReply: ...

    async def backward(self, request: BackwardRequest) -> torch.Tensor: ...

    async def apply_step(self, request: StepRequest) -> StepReply: ...

    async def describe(self) -> dict: ...

    async def export_state(self, request: StageRequest) -> StateSnapshot: ...

    async def export_grads(self, request: StageRequest) -> list[torch.Tensor]: ...

    async def keep_copy(self, state: StateSnapshot) -> None: ...

    async def export_copy(self, request: StageRequest) -> StateSnapshot: ...


class StageService(ServicerBase):
    def __init__(self, backend: StageBackend):
        self.backend = backend
        self.wire_dtype = wire_dtype(backend.spec.wire_dtype)  # of forward outputs and input gradients

    async def rpc_forward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async def handle() -> Envelope:
            return await self._serve("forward", lambda: from_chunks(requests, self.backend.max_request_bytes))

        reply = await _guarded(handle, "forward", requests, self.backend.max_request_bytes)
        for message in to_chunks(reply, Response, self.wire_dtype):
            yield message

    async def rpc_backward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async def handle() -> Envelope:
            return await self._serve("backward", lambda: from_chunks(requests, self.backend.max_request_bytes))

        reply = await _guarded(handle, "backward", requests, self.backend.max_request_bytes)
        for message in to_chunks(reply, Response, self.wire_dtype):
            yield message

    async def rpc_pipe(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        """Many forward and backward calls on one stream (see pipe.py): each request is one whole call whose
        metadata adds a `call` number and a `method`; the calls run concurrently and each reply repeats its call
        number. A call refused gets its own error reply; the stream stays open for the others."""
        replies: asyncio.Queue[Envelope | None] = asyncio.Queue()
        calls: set[asyncio.Task] = set()
        # Calls in flight or waiting to be sent back. At the limit the peer stops reading, so a caller that sends
        # without end is slowed down by the stream, not answered by a pile of tasks and tensors.
        slots = asyncio.Semaphore(MAX_PIPE_CALLS)

        async def serve(message: Request) -> None:
            replies.put_nowait(await self._pipe_call(message))

        async def read() -> None:
            try:
                async for message in requests:
                    await slots.acquire()
                    task = asyncio.create_task(serve(message))
                    calls.add(task)
                    task.add_done_callback(calls.discard)
                while calls:  # the caller has said all it will: answer what is in flight, then end
                    await asyncio.wait(set(calls))
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield to_message(reply, Response, self.wire_dtype)
                slots.release()
        finally:  # the caller went away or the stream broke: nobody is left to answer
            reader.cancel()
            for task in list(calls):
                task.cancel()

    async def _pipe_call(self, message: Request) -> Envelope:
        number = None

        async def handle() -> Envelope:
            nonlocal number
            meta = unpack_meta(message.metadata)
            number = meta.get("call")
            if not isinstance(number, int) or isinstance(number, bool):
                number = None
                raise ProtocolError("a call on a pipe needs an integer `call` number")
            method = meta.get("method")
            if method not in PIPE_METHODS:
                raise ProtocolError(f"unknown pipe method {method!r}, expected one of {PIPE_METHODS}")

            async def decode() -> Envelope:
                return Envelope(meta, decode_tensors(message.tensors, self.backend.max_request_bytes))

            return await self._serve(method, decode)

        reply = await _reply_or_error(handle, "pipe call")
        if number is not None:
            reply.meta["call"] = number
        return reply

    async def _serve(self, method: str, decode: Callable[[], Awaitable[Envelope]]) -> Envelope:
        """Decode and run one forward or backward; the reply says where the call's time went on this side."""
        with collecting({}) as timing:
            envelope = await decode()
            if method == "forward":
                reply = (await self.backend.forward(ForwardRequest.parse(envelope))).envelope()
            else:
                reply = (await self._backward(BackwardRequest.parse(envelope))).envelope()
        reply.meta["timing"] = _rounded(timing)
        return reply

    async def _backward(self, request: BackwardRequest) -> BackwardReply:
        reply = BackwardReply(await self.backend.backward(request))
        if request.step_group is not None and self.backend.peer_id in request.step_group:
            # The step rides on the stage's last backward (see BackwardRequest.step_group). A refusal here fails
            # only the step: the gradient is good, and the caller sends the step call, as it would have anyway.
            try:
                reply.stepped = await self.backend.apply_step(
                    StepRequest(request.stage, request.step, request.step_group, request.session))
            except RequestRefused as e:
                reply.step_refused = f"{e.code}: {e}"
        return reply

    async def rpc_step(self, request: Request, context: P2PContext) -> Response:
        async def handle() -> Envelope:
            return (await self.backend.apply_step(StepRequest.parse(from_message(request)))).envelope()

        return to_message(await _guarded(handle, "step"), Response)

    async def rpc_info(self, request: Request, context: P2PContext) -> Response:
        async def handle() -> Envelope:
            return Envelope(await self.backend.describe())

        return to_message(await _guarded(handle, "info"), Response)

    async def rpc_download_state(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        async def handle() -> Envelope:
            return (await self.backend.export_state(StageRequest.parse(from_message(request)))).envelope()

        for message in to_chunks(await _guarded(handle, "download_state"), Response, chunk_bytes=STATE_CHUNK_BYTES):
            yield message

    async def rpc_fetch_grads(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        async def handle() -> Envelope:
            parsed = StageRequest.parse(from_message(request))
            return Envelope({"step": parsed.step}, await self.backend.export_grads(parsed))

        for message in to_chunks(await _guarded(handle, "fetch_grads"), Response, chunk_bytes=STATE_CHUNK_BYTES):
            yield message

    async def rpc_put_copy(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        """A state for this peer to keep for others: the trainer's embedding and head (stage 0), or the exact state
        of a neighbouring stage whose last peer is leaving."""
        async def handle() -> Envelope:
            await self.backend.keep_copy(StateSnapshot.parse(await from_chunks(requests, self.backend.max_copy_bytes)))
            return Envelope({})

        reply = await _guarded(handle, "put_copy", requests, self.backend.max_copy_bytes)
        for message in to_chunks(reply, Response):
            yield message

    async def rpc_get_copy(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        async def handle() -> Envelope:
            return (await self.backend.export_copy(StageRequest.parse(from_message(request)))).envelope()

        for message in to_chunks(await _guarded(handle, "get_copy"), Response, chunk_bytes=STATE_CHUNK_BYTES):
            yield message


def drain_limit(max_bytes: int) -> int:
    """How much of a refused request stream a peer still reads: twice the largest valid request."""
    return 2 * (max_bytes + MAX_METADATA_BYTES)


class TrainerBackend(Protocol):
    async def export_activations(self, request: StageRequest) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        ...


class TrainerService(ServicerBase):
    """What the trainer serves: each stage's recently cached (input, output) activations, for refits."""

    def __init__(self, backend: TrainerBackend):
        self.backend = backend

    async def rpc_activations(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        async def handle() -> Envelope:
            parsed = StageRequest.parse(from_message(request))
            step, pairs = await self.backend.export_activations(parsed)
            return Envelope({"stage": parsed.stage, "step": step, "pairs": len(pairs)},
                            [t for pair in pairs for t in pair])

        for message in to_chunks(await _guarded(handle, "activations"), Response, chunk_bytes=STATE_CHUNK_BYTES):
            yield message


async def _guarded(handle, name: str, requests: AsyncIterator[Request] | None = None, max_bytes: int = 0) -> Envelope:
    """The handler's reply, or an error reply. A refused request stream is read to its end (within
    `drain_limit`), so the caller, still sending, gets the error reply rather than a reset stream."""
    reply = await _reply_or_error(handle, name)
    if requests is not None and "error" in reply.meta:
        await _drain(requests, drain_limit(max_bytes))
    return reply


async def _drain(requests: AsyncIterator[Request], limit: int) -> None:
    seen = 0
    try:
        async for message in requests:
            seen += message.ByteSize()
            if seen > limit:
                return
    except asyncio.CancelledError:
        raise
    except Exception:  # the caller gave up or the stream broke: nothing left to read
        return


async def _reply_or_error(handle, name: str) -> Envelope:
    try:
        return await handle()
    except TruncatedStream as e:
        return error_envelope(TRUNCATED, str(e))
    except ProtocolError as e:
        return error_envelope(BAD_REQUEST, str(e))
    except RequestRefused as e:
        return error_envelope(e.code, str(e), e.peers)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.exception(f"{name} failed")
        return error_envelope(INTERNAL, f"{type(e).__name__}: {e}")


class StageClient:
    """Calls a stage peer's RPCs. Every call has a deadline; failures raise RemoteError or the transport's error.

    Forward and backward calls travel on one pipe per peer (`pipe.py`); with `pipe=False`, each on its own stream.
    """

    def __init__(self, p2p: P2P, max_reply_bytes: int, wire_dtype_name: str = "float32", pipe: bool = True):
        self.p2p = p2p
        self.max_reply_bytes = max_reply_bytes
        self.wire_dtype = wire_dtype(wire_dtype_name)  # of the activations and gradients this client sends
        self.pipe = pipe
        self._pipes: dict[str, Pipe] = {}

    async def close(self) -> None:
        pipes, self._pipes = self._pipes, {}
        await asyncio.gather(*[pipe.close() for pipe in pipes.values()])

    def _stub(self, peer_id: str, service: type[ServicerBase] = StageService):
        return service.get_stub(self.p2p, PeerID.from_base58(peer_id))

    async def _compute_call(self, method: str, peer_id: str, envelope: Envelope, timeout: float) -> Envelope:
        """A forward or backward, on the peer's pipe or on a stream of its own."""
        with timed("call"):
            if self.pipe:
                pipe = self._pipes.get(peer_id)
                if pipe is None:
                    handle_name = StageService._get_handle_name(None, "rpc_pipe")
                    pipe = self._pipes[peer_id] = Pipe(self.p2p, peer_id, handle_name, self.max_reply_bytes)
                try:
                    reply = await asyncio.wait_for(pipe.call(method, envelope, self.wire_dtype), timeout)
                except asyncio.TimeoutError:
                    pipe.reset(f"a {method} got no reply in {timeout:.0f} s")
                    raise
            else:
                reply = await self._stream(f"rpc_{method}", peer_id, envelope, timeout, self.wire_dtype)
        remote = reply.meta.get("timing")
        if isinstance(remote, dict):  # the peer's own account of the call; informative only, never trusted
            for kind, seconds in remote.items():
                if kind in REMOTE_TIMES and isinstance(seconds, (int, float)) and 0 <= seconds < timeout:
                    add_time(f"stage_{kind}", float(seconds))
        return reply

    async def _stream(self, method: str, peer_id: str, envelope: Envelope, timeout: float,
                      wire: torch.dtype | None = None) -> Envelope:
        async def call() -> Envelope:
            stub = self._stub(peer_id)
            chunks = list(to_chunks(envelope, Request, wire))  # encode errors surface here, not mid-stream

            async def requests() -> AsyncIterator[Request]:
                for chunk in chunks:
                    yield chunk

            replies = await getattr(stub, method)(requests())
            return raise_for_error(await from_chunks(replies, self.max_reply_bytes))

        return await asyncio.wait_for(call(), timeout)

    async def _server_stream(self, method: str, peer_id: str, envelope: Envelope, timeout: float,
                             service: type[ServicerBase] = StageService) -> Envelope:
        async def call() -> Envelope:
            replies = await getattr(self._stub(peer_id, service), method)(to_message(envelope, Request))
            return raise_for_error(await from_chunks(replies, MAX_STATE_BYTES))

        return await asyncio.wait_for(call(), timeout)

    async def _unary(self, method: str, peer_id: str, envelope: Envelope, timeout: float) -> Envelope:
        reply = await getattr(self._stub(peer_id), method)(to_message(envelope, Request), timeout=timeout)
        return raise_for_error(from_message(reply))

    async def forward(self, peer_id: str, request: ForwardRequest, timeout: float) -> ForwardReply:
        return ForwardReply.parse(await self._compute_call("forward", peer_id, request.envelope(), timeout))

    async def backward(self, peer_id: str, request: BackwardRequest, timeout: float) -> BackwardReply:
        return BackwardReply.parse(await self._compute_call("backward", peer_id, request.envelope(), timeout))

    async def step(self, peer_id: str, request: StepRequest, timeout: float) -> StepReply:
        return StepReply.parse(await self._unary("rpc_step", peer_id, request.envelope(), timeout))

    async def info(self, peer_id: str, stage: int, timeout: float) -> dict:
        return (await self._unary("rpc_info", peer_id, StageRequest(stage).envelope(), timeout)).meta

    async def download_state(self, peer_id: str, stage: int, timeout: float,
                             weights_only: bool = False) -> StateSnapshot:
        envelope = StageRequest(stage, weights_only=weights_only).envelope()
        return StateSnapshot.parse(await self._server_stream("rpc_download_state", peer_id, envelope, timeout))

    async def fetch_grads(self, peer_id: str, stage: int, step: int, timeout: float,
                          session: str = "") -> list[torch.Tensor]:
        envelope = StageRequest(stage, step, session=session).envelope()
        return (await self._server_stream("rpc_fetch_grads", peer_id, envelope, timeout)).tensors

    async def put_copy(self, peer_id: str, state: StateSnapshot, timeout: float) -> None:
        await self._stream("rpc_put_copy", peer_id, state.envelope(), timeout)

    async def activations(self, peer_id: str, stage: int, timeout: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The trainer's cached (input, output) pairs of a stage, oldest first."""
        envelope = await self._server_stream("rpc_activations", peer_id, StageRequest(stage).envelope(), timeout,
                                             service=TrainerService)
        tensors = envelope.tensors
        if envelope.meta.get("pairs") != len(tensors) // 2 or len(tensors) % 2:
            raise ProtocolError("activations reply does not hold whole (input, output) pairs")
        return list(zip(tensors[0::2], tensors[1::2]))

    async def get_copy(self, peer_id: str, stage: int, timeout: float) -> StateSnapshot:
        envelope = StageRequest(stage).envelope()
        return StateSnapshot.parse(await self._server_stream("rpc_get_copy", peer_id, envelope, timeout))


REMOTE_TIMES = ("decode", "queue", "compute")  # what a stage reports of a forward or backward call


def _rounded(timing: dict[str, float]) -> dict[str, float]:
    return {kind: round(seconds, 6) for kind, seconds in timing.items()}

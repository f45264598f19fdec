"""The stage peer's RPC surface (hivemind ServicerBase) and the client calls that match it.

Handler names derive from this class's name, so peers and trainers share it. Every handler decodes and
checks its request before handing it to the backend, and turns any refusal into an error reply: a bad
request never reaches compute and never takes the peer down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import aclosing, suppress

# hivemind recognises streaming RPCs by typing.AsyncIterator annotations, not collections.abc ones.
from typing import AsyncIterator, Protocol  # noqa: UP035

import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter
from hivemind.utils.logging import get_logger

from cfnode.config import RunSpec
from cfnode.faults import CURRENT_PIPE_CUT
from cfnode.protocol.framing import BoundedServicer, call_stream
from cfnode.protocol.limits import ReplyLimits, message_bytes, part_message_bytes
from cfnode.protocol.messages import (
    BAD_REQUEST,
    INTERNAL,
    MAX_METADATA_BYTES,
    STATE_CHUNK_BYTES,
    TRUNCATED,
    UNAUTHORISED,
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
    meta_only,
    raise_for_error,
    to_chunks,
    to_message,
    unpack_meta,
    wire_dtype,
)
from cfnode.protocol.pipe import PIPE_METHODS, Pipe
from cfnode.protocol.timing import add_time, collecting, timed
from cfnode.protocol.trust import trainer_ids

logger = get_logger(__name__)

# Calls a pipe holds at once; more wait in the stream. One compute worker runs them one by one anyway, so this only
# bounds the memory a caller can pin with calls it sends faster than the peer computes.
MAX_PIPE_CALLS = 64

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

    async def export_grads(self, request: StageRequest) -> tuple[list[torch.Tensor], list[int]]: ...

    async def keep_copy(self, state: StateSnapshot, sender: str) -> None: ...

    async def export_copy(self, request: StageRequest) -> StateSnapshot: ...


class StageService(BoundedServicer):
    def __init__(self, backend: StageBackend):
        self.backend = backend
        self.wire_dtype = wire_dtype(backend.spec.wire_dtype)  # of forward outputs and input gradients
        # Training calls change the weights, so only the trainers the signed run spec names may make them. libp2p
        # authenticates the caller's peer id on every call (protocol/trust.py).
        self.trainers = trainer_ids(backend.spec)

    def _authorise(self, context: P2PContext, what: str) -> None:
        """Refuse (UNAUTHORISED) a caller that is not one of the run's trainers; checked before any decoding."""
        caller = context.remote_id.to_base58()
        if caller not in self.trainers:
            logger.warning(f"refused a {what} call from {caller}: not a trainer of this run")
            raise RequestRefused(UNAUTHORISED, f"{caller} is not a trainer of this run: only the trainers its run "
                                               "spec names may make training calls")

    def stream_limit(self, method_name: str) -> int:
        """The largest request message each streamed RPC reads (framing.py, limits.py): a whole call on the pipe, one
        part on the chunked streams, metadata alone in the one request of a state, gradient or copy download."""
        if method_name == "rpc_pipe":
            return message_bytes(self.backend.max_request_bytes)
        if method_name in ("rpc_forward", "rpc_backward"):
            return part_message_bytes(self.backend.max_request_bytes)
        if method_name == "rpc_put_copy":
            return part_message_bytes(self.backend.max_copy_bytes)
        return message_bytes(0)

    def refusal(self, error: ProtocolError) -> Response:
        return _refused(error)

    async def rpc_forward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async def handle() -> Envelope:
            self._authorise(context, "forward")  # refused before its tensors are read; the stream is drained
            return await self._serve("forward", lambda: from_chunks(requests, self.backend.max_request_bytes))

        reply = await _guarded(handle, "forward", requests, self.backend.max_request_bytes)
        for message in to_chunks(reply, Response, self.wire_dtype):
            yield message

    async def rpc_backward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async def handle() -> Envelope:
            self._authorise(context, "backward")  # refused before its tensors are read; the stream is drained
            return await self._serve("backward", lambda: from_chunks(requests, self.backend.max_request_bytes))

        reply = await _guarded(handle, "backward", requests, self.backend.max_request_bytes)
        for message in to_chunks(reply, Response, self.wire_dtype):
            yield message

    async def rpc_pipe(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        """Many forward and backward calls on one stream (see pipe.py): each request is one whole call whose
        metadata adds a `call` number and a `method`; the calls run concurrently and each reply repeats its call
        number. A call refused gets its own error reply; the stream stays open for the others. A caller that is not
        one of the run's trainers gets one error reply without a call number, and the stream ends."""
        try:
            self._authorise(context, "pipe")
        except RequestRefused as e:
            yield to_message(error_envelope(e.code, str(e)), Response)
            # The caller may still be sending its first call: ending the stream now would reset it, and the reset
            # can overtake the refusal. Read on until the caller, told, drops the pipe (within the drain limit).
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_drain(requests, drain_limit(self.backend.max_request_bytes)),
                                       REFUSED_PIPE_DRAIN_SECONDS)
            return
        replies: asyncio.Queue[Envelope | None] = asyncio.Queue()
        calls: set[asyncio.Task] = set()
        # Calls in flight or waiting to be sent back. At the limit the peer stops reading, so a caller that sends
        # without end is slowed down by the stream, not answered by a pile of tasks and tensors.
        slots = asyncio.Semaphore(MAX_PIPE_CALLS)

        def cut() -> None:
            """End this stream as a broken connection would: the calls on it are cancelled (faults.py)."""
            reader.cancel()
            for task in list(calls):
                task.cancel()
            replies.put_nowait(None)

        async def serve(message: Request) -> None:
            CURRENT_PIPE_CUT.set(cut)
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
            except ProtocolError as e:
                # A message too large or not framed (framing.py): its bytes are unread, so the stream cannot go on.
                # The error reply names no call, which tells the caller to drop this pipe.
                replies.put_nowait(error_envelope(BAD_REQUEST, str(e)))
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
        step = request.step_request()
        if step is not None and self.backend.peer_id in step.group:
            # The step rides on the stage's last backward (see BackwardRequest.step_group). A refusal here fails
            # only the step: the gradient is good, and the caller sends the step call, as it would have anyway.
            try:
                reply.stepped = await self.backend.apply_step(step)
            except RequestRefused as e:
                reply.step_refused = f"{e.code}: {e}"
        return reply

    async def rpc_step(self, request: Request, context: P2PContext) -> Response:
        async def handle() -> Envelope:
            self._authorise(context, "step")
            return (await self.backend.apply_step(StepRequest.parse(meta_only(request)))).envelope()

        return to_message(await _guarded(handle, "step"), Response)

    async def rpc_info(self, request: Request, context: P2PContext) -> Response:
        async def handle() -> Envelope:
            meta_only(request)  # the request's content is ignored, but one with tensors is refused undecoded
            return Envelope(await self.backend.describe())

        return to_message(await _guarded(handle, "info"), Response)

    async def rpc_download_state(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        async def handle() -> Envelope:
            return (await self.backend.export_state(StageRequest.parse(meta_only(request)))).envelope()

        for message in to_chunks(await _guarded(handle, "download_state"), Response, chunk_bytes=STATE_CHUNK_BYTES):
            yield message

    async def rpc_fetch_grads(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        async def handle() -> Envelope:
            parsed = StageRequest.parse(meta_only(request))
            grads, microbatches = await self.backend.export_grads(parsed)
            return Envelope({"step": parsed.step, "microbatches": microbatches}, grads)

        for message in to_chunks(await _guarded(handle, "fetch_grads"), Response, chunk_bytes=STATE_CHUNK_BYTES):
            yield message

    async def rpc_put_copy(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        """A state for this peer to keep for others: the trainer's embedding and head (stage 0), or the exact state
        of a neighbouring stage whose last peer is leaving."""
        async def handle() -> Envelope:
            state = StateSnapshot.parse(await from_chunks(requests, self.backend.max_copy_bytes))
            await self.backend.keep_copy(state, context.remote_id.to_base58())
            return Envelope({})

        reply = await _guarded(handle, "put_copy", requests, self.backend.max_copy_bytes)
        for message in to_chunks(reply, Response):
            yield message

    async def rpc_get_copy(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        async def handle() -> Envelope:
            return (await self.backend.export_copy(StageRequest.parse(meta_only(request)))).envelope()

        for message in to_chunks(await _guarded(handle, "get_copy"), Response, chunk_bytes=STATE_CHUNK_BYTES):
            yield message


# Seconds a refused pipe is still read, for the refusal to reach a caller that was sending (rpc_pipe).
REFUSED_PIPE_DRAIN_SECONDS = 10.0


def drain_limit(max_bytes: int) -> int:
    """How much of a refused request stream a peer still reads: twice the largest valid request."""
    return 2 * (max_bytes + MAX_METADATA_BYTES)


class TrainerBackend(Protocol):
    async def export_activations(self, request: StageRequest) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        ...


class TrainerService(BoundedServicer):
    """What the trainer serves: each stage's recently cached (input, output) activations, for refits."""

    def __init__(self, backend: TrainerBackend):
        self.backend = backend

    def stream_limit(self, method_name: str) -> int:
        return message_bytes(0)  # rpc_activations: one request of metadata alone

    def refusal(self, error: ProtocolError) -> Response:
        return _refused(error)

    async def rpc_activations(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        async def handle() -> Envelope:
            parsed = StageRequest.parse(meta_only(request))
            step, pairs = await self.backend.export_activations(parsed)
            return Envelope({"stage": parsed.stage, "step": step, "pairs": len(pairs)},
                            [t for pair in pairs for t in pair])

        for message in to_chunks(await _guarded(handle, "activations"), Response, chunk_bytes=STATE_CHUNK_BYTES):
            yield message


def _refused(error: ProtocolError) -> Response:
    """The reply to a request refused before it was read (too large, not framed)."""
    return to_message(error_envelope(BAD_REQUEST, str(error)), Response)


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
    Every reply is read within a bound: `max_reply_bytes` for activations and gradients, and for states, gradient
    exchanges, copies and cached activations the sizes the run `spec` implies (limits.py); a client made without
    the spec cannot make those calls.
    """

    def __init__(self, p2p: P2P, max_reply_bytes: int, wire_dtype_name: str = "float32", pipe: bool = True,
                 spec: RunSpec | None = None):
        self.p2p = p2p
        self.max_reply_bytes = max_reply_bytes
        self._limits = ReplyLimits.of(spec) if spec is not None else None
        self.wire_dtype = wire_dtype(wire_dtype_name)  # of the activations and gradients this client sends
        self.pipe = pipe
        self._pipes: dict[str, Pipe] = {}

    async def close(self) -> None:
        pipes, self._pipes = self._pipes, {}
        await asyncio.gather(*[pipe.close() for pipe in pipes.values()])

    def _stub(self, peer_id: str, service: type[ServicerBase] = StageService):
        return service.get_stub(self.p2p, PeerID.from_base58(peer_id))

    @property
    def limits(self) -> ReplyLimits:
        if self._limits is None:
            raise ValueError("this StageClient was made without the run spec, which bounds state-sized replies")
        return self._limits

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
                      wire: torch.dtype | None = None, max_reply_bytes: int | None = None) -> Envelope:
        """A chunked request and its chunked reply, of at most `max_reply_bytes` of tensors (default: an
        activation's, `self.max_reply_bytes`)."""
        limit = self.max_reply_bytes if max_reply_bytes is None else max_reply_bytes

        async def call() -> Envelope:
            chunks = list(to_chunks(envelope, Request, wire))  # encode errors surface here, not mid-stream

            async def requests() -> AsyncIterator[Request]:
                for chunk in chunks:
                    yield chunk

            return raise_for_error(await self._read_reply(StageService, method, peer_id, requests(), limit))

        return await asyncio.wait_for(call(), timeout)

    async def _server_stream(self, method: str, peer_id: str, envelope: Envelope, timeout: float, max_bytes: int,
                             service: type[ServicerBase] = StageService) -> Envelope:
        """One request, and a chunked reply of at most `max_bytes` of tensors."""
        async def call() -> Envelope:
            requests = as_aiter(to_message(envelope, Request))
            return raise_for_error(await self._read_reply(service, method, peer_id, requests, max_bytes))

        return await asyncio.wait_for(call(), timeout)

    async def _read_reply(self, service: type[ServicerBase], method: str, peer_id: str,
                          requests: AsyncIterator[Request], max_bytes: int) -> Envelope:
        """Call a streamed RPC and decode its chunked reply: each message is refused before it is read if it passes
        one part's size (framing.py), and the whole once its tensors pass `max_bytes`."""
        replies = await call_stream(self.p2p, PeerID.from_base58(peer_id), service._get_handle_name(None, method),
                                    requests, Response, part_message_bytes(max_bytes))
        async with aclosing(replies):  # a reply refused halfway closes its stream now, not when collected
            return await from_chunks(replies, max_bytes)

    async def _unary(self, method: str, peer_id: str, envelope: Envelope, timeout: float) -> Envelope:
        # The daemon bounds a unary reply (framing.py); a step or info reply holds no tensors, so none is decoded.
        reply = await getattr(self._stub(peer_id), method)(to_message(envelope, Request), timeout=timeout)
        return raise_for_error(meta_only(reply))

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
        return StateSnapshot.parse(await self._server_stream("rpc_download_state", peer_id, envelope, timeout,
                                                             self.limits.state(weights_only)))

    async def fetch_grads(self, peer_id: str, stage: int, step: int, timeout: float,
                          session: str = "") -> tuple[list[torch.Tensor], list[int]]:
        """A replica's gradients of a step, and the microbatches it summed into them (its ledger)."""
        envelope = StageRequest(stage, step, session=session).envelope()
        reply = await self._server_stream("rpc_fetch_grads", peer_id, envelope, timeout, self.limits.grads)
        microbatches = reply.meta.get("microbatches")
        if not isinstance(microbatches, list) or not all(isinstance(mb, int) and not isinstance(mb, bool)
                                                         for mb in microbatches):
            raise ProtocolError("a gradient reply without the list of microbatches in it")
        return reply.tensors, microbatches

    async def put_copy(self, peer_id: str, state: StateSnapshot, timeout: float) -> None:
        await self._stream("rpc_put_copy", peer_id, state.envelope(), timeout, max_reply_bytes=0)  # the reply is {}

    async def activations(self, peer_id: str, stage: int, timeout: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The trainer's cached (input, output) pairs of a stage, oldest first."""
        envelope = await self._server_stream("rpc_activations", peer_id, StageRequest(stage).envelope(), timeout,
                                             self.limits.activations, service=TrainerService)
        tensors = envelope.tensors
        if envelope.meta.get("pairs") != len(tensors) // 2 or len(tensors) % 2:
            raise ProtocolError("activations reply does not hold whole (input, output) pairs")
        return list(zip(tensors[0::2], tensors[1::2]))

    async def get_copy(self, peer_id: str, stage: int, timeout: float) -> StateSnapshot:
        envelope = StageRequest(stage).envelope()
        return StateSnapshot.parse(await self._server_stream("rpc_get_copy", peer_id, envelope, timeout,
                                                             self.limits.copy(stage)))


REMOTE_TIMES = ("decode", "queue", "compute")  # what a stage reports of a forward or backward call


def _rounded(timing: dict[str, float]) -> dict[str, float]:
    return {kind: round(seconds, 6) for kind, seconds in timing.items()}

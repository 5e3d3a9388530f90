"""The gRPC servicer: proto in, session out.

It validates the first message, admits the call, hands the stream to a
`ChatSession` (which owns every task of it) or the request to
`service.oneshot`, and maps domain errors to status codes with
`errors.status_of`. Cleanup and the outcome log run in the handler's own
frame: `Converse` is a coroutine that writes through `context.write`, so a
client that goes away cancels this very task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from service import oneshot
from service.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    Undecodable,
    status_of,
)
from service.options import resolve_options
from service.session import CLIENT_GONE, ChatSession, Runtime
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_CONFIG_TIMEOUT_S = 10.0  # the first request (config) must arrive within this time
_ABORT_WAIT_S = 1.0  # longest wait to send an error status to a client that does not read


class Admission:
    """Counts calls holding the model; beyond the limit calls are refused at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.ready = False
        self.draining = False

    def acquire(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; reconnect to another instance")
        if not self.ready:
            raise Unavailable("the model is still loading; retry in a few seconds")
        if self.active >= self.limit:
            raise ResourceExhausted(f"the server is at its limit of {self.limit} concurrent sessions; retry later")
        self.active += 1

    def release(self) -> None:
        self.active -= 1


class VoiceChatServicer(pb_grpc.VoiceChatServiceServicer):
    def __init__(self, runtime: Runtime, admission: Admission) -> None:
        self.runtime = runtime
        self.admission = admission
        self.sessions: set[ChatSession] = set()
        self._calls = 0  # admitted calls of either kind still running
        self.all_closed = asyncio.Event()  # set while no call runs (drain waits on it)
        self.all_closed.set()
        self.draining = asyncio.Event()  # set by drain: streams still waiting for config end

    def _enter(self) -> None:
        self.admission.acquire()
        self._calls += 1
        self.all_closed.clear()

    def _leave(self) -> None:
        self.admission.release()
        self._calls -= 1
        if not self._calls:
            self.all_closed.set()

    def drain(self, grace_s: float) -> None:
        """Stop admitting calls and let every open session finish within `grace_s`."""
        self.admission.draining = True
        self.draining.set()
        for session in list(self.sessions):
            session.drain(grace_s)

    async def Converse(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ConverseRequest | Undecodable], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            self._enter()
        except ServiceError as exc:
            self.runtime.metrics.call_refused("Converse", exc.code)
            await context.abort(*status_of(exc))
        started = time.monotonic()
        session: ChatSession | None = None
        outcome = "client went away"
        code: grpc.StatusCode | None = grpc.StatusCode.CANCELLED
        try:
            session = await self._open(request_iterator, context)
            self.sessions.add(session)
            self.runtime.metrics.session_started()
            log.info("%s started peer=%s label=%r", session.id, context.peer(), session.options.client_label,
                     extra=session.log_extra)  # fmt: skip
            end = await session.run(request_iterator, context.write)
            code = end.code
            if end is CLIENT_GONE:
                return
            outcome = "ok" if end.code is None else f"{end.code.name}: {end.details}"
            if end.code is not None:
                # the status goes out after the send in flight; behind a send the client
                # never reads it cannot leave either: give up after a moment so the slot
                # is freed (the transport cancels the call)
                if session.writing is not None and not session.writing.done():
                    await asyncio.wait({session.writing}, timeout=_ABORT_WAIT_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(context.abort(end.code, end.details), _ABORT_WAIT_S)
        except _NoSession as exc:
            outcome = exc.outcome
            if exc.error is not None:
                await context.abort(*status_of(exc.error))
        finally:
            self._leave()
            if session is not None:
                self.sessions.discard(session)
                self.runtime.metrics.session_ended(code)
                log.info("%s ended after %.1f s, %d responses: %s", session.id, time.monotonic() - started,
                         session.response_count, outcome, extra=session.log_extra)  # fmt: skip

    async def _open(
        self, requests: AsyncIterator[pb.ConverseRequest | Undecodable], context: grpc.aio.ServicerContext
    ) -> ChatSession:
        settings = self.runtime.settings
        # a slot is held from the first byte: a client that never configures must not keep it
        timeout = min(settings.idle_timeout_seconds or _CONFIG_TIMEOUT_S, _CONFIG_TIMEOUT_S)
        first = await self._first_request(requests, timeout)
        if isinstance(first, Undecodable):
            raise _NoSession("undecodable first message", first.error())
        if first.WhichOneof("kind") != "config":
            raise _NoSession(
                "no config",
                FailedPrecondition("the first ConverseRequest must be `config` (a SessionConfig, may be empty)"),
            )
        metadata = dict(context.invocation_metadata() or ())
        trace = str(metadata.get("x-trace", "")).lower() in ("1", "true", "yes")
        backend = self.runtime.backend
        try:
            options = resolve_options(
                first.config,
                settings,
                backend.default_sampling(),
                settings.system_prompt or backend.default_system_prompt(),
                trace,
            )
        except ServiceError as exc:
            raise _NoSession("bad config", exc) from None
        return ChatSession(self.runtime, options, peer=context.peer())

    async def _first_request(
        self, requests: AsyncIterator[pb.ConverseRequest | Undecodable], limit_s: float
    ) -> pb.ConverseRequest | Undecodable:
        """The stream's first message, unless it ends, times out or the server drains first."""
        first = asyncio.ensure_future(anext(aiter(requests)))
        drain = asyncio.ensure_future(self.draining.wait())
        try:
            done, _ = await asyncio.wait({first, drain}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain.cancel()
            if not first.done():
                first.cancel()
        if first in done:
            try:
                return first.result()
            except StopAsyncIteration:
                raise _NoSession("closed before config", None) from None
        if drain in done:
            raise _NoSession("drained before config", Unavailable("the server is shutting down; reconnect"))
        raise _NoSession("no config", DeadlineExceeded(f"no config within {limit_s:g} s"))

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        if isinstance(request, Undecodable):
            await context.abort(*status_of(request.error()))
            raise AssertionError("unreachable")  # context.abort raises
        rt = self.runtime
        try:
            self._enter()
        except ServiceError as exc:
            rt.metrics.call_refused("Generate", exc.code)
            await context.abort(*status_of(exc))
        code: grpc.StatusCode | None = grpc.StatusCode.CANCELLED  # until it ends otherwise
        try:
            reply = await oneshot.generate(rt.engine, rt.settings, rt.decode_pool, request)
            code = None
            return reply
        except ServiceError as exc:
            code = exc.code
            await context.abort(*status_of(exc))
        finally:
            self._leave()
            rt.metrics.generate_ended(code)
        raise AssertionError("unreachable")  # context.abort raises


class _NoSession(Exception):
    """The stream ended before a session could start."""

    def __init__(self, outcome: str, error: ServiceError | None) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.error = error

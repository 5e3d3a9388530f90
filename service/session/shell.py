"""ChatSession: the shell of one Converse stream.

`ChatSession.run` owns every task of the stream in one TaskGroup:

- the reader takes client requests in order and hands each to the part that
  owns it: audio, text, commits and config updates to turn control
  (`turn_control`), cancels to the responder (`responder`), truncations to
  the playback ledger (`ledger`);
- the responder answers committed turns one at a time with a `ResponseRun`;
- the writer drains the session's `Outbox` into the call (the stream's only
  writer) until the in-band `StreamEnd`;
- the watchdog enforces the idle timeout and the session length, and ends a
  stream whose client stopped reading once its end has waited `_END_GRACE_S`
  behind unsent events;
- short-lived helpers (an input transcription, a truncation's answer).

The parts speak in domain events (`service.events`) through the stream's
`Wire`, the one module that knows the contract's messages. An unexpected
exception in any task ends the stream with INTERNAL (no internals in the
message) and one log line with the traceback. Errors the session survives
become in-stream `Error` events. All model state goes through the engine: the
session holds a `ConversationRef` only, and history edits (record a response,
truncate it, undo a speculative one) are engine operations applied in order
with generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

import service.session.wire as wire
from service.errors import (
    DeadlineExceeded,
    Internal,
    OutOfRange,
    ServiceError,
    Unavailable,
    Undecodable,
    status_of,
)
from service.events import GoAway, ResponseStatus, SessionStarted
from service.options import SessionOptions
from service.outbox import Outbox, StreamEnd
from service.pipeline import ResponseRun
from service.runtime import Runtime
from service.session.ledger import PlaybackLedger
from service.session.responder import Responder
from service.session.speculation import Speculator
from service.session.stream import Stream
from service.session.turn_control import TurnControl
from service.session.wire import ProtocolViolation

log = logging.getLogger(__name__)

_GO_AWAY_LEAD_S = 10.0  # GoAway this long before the session time limit
_END_GRACE_S = 2.0  # an end waits this long behind unsent events before the call is cut
_WATCHDOG_TICK_S = 0.25


class _Ended(Exception):
    """Raised inside the session's TaskGroup to stop every task: the stream is over."""


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a send's failure as seen: the writer that started it may be gone."""
    if not future.cancelled():
        future.exception()


#: how `run` reports a call whose transport failed under a write (the client went away)
CLIENT_GONE = StreamEnd(grpc.StatusCode.CANCELLED, "the client went away")


class ChatSession:
    def __init__(self, runtime: Runtime, options: SessionOptions, peer: str = "") -> None:
        self.id = "sess_" + uuid.uuid4().hex[:12]
        self.runtime = runtime
        self.outbox = Outbox(max_audio_ms=runtime.settings.max_pending_audio_ms)
        engine = runtime.engine
        self.stream = stream = Stream(
            id=self.id,
            peer=peer,
            runtime=runtime,
            options=options,
            outbox=self.outbox,
            events=wire.Wire(self.outbox, runtime.metrics),
            engine=engine,
            # the engine creates the model-side state on its own thread
            conversation=engine.open(options.system_prompt),
        )
        # the parts, each told only of those it calls; a trunk edit restarts a
        # speculation under turn control's rules (the one call back up)
        self.speculation = Speculator(restart=lambda audio: self.turns.speculate(audio, again=True))
        self.ledger = PlaybackLedger(stream, self.speculation)
        self.responder = Responder(stream, self.speculation, self.ledger, end=self.end)
        self.turns = TurnControl(stream, self.speculation, self.responder, self.ledger)
        self._started = time.monotonic()
        self._last_request = time.monotonic()
        self._going_away = False
        # how the stream ends is the outbox's (`outbox.end`: the session's own end or
        # the outbox's overflow end); these two outcomes never reach the outbox
        self._failure: StreamEnd | None = None  # a session task crashed
        self._client_gone = False  # a write failed: the peer is gone
        self._end_deadline = 0.0  # when an end still not written cuts the call
        self.writing: asyncio.Future[None] | None = None  # the send in flight, if any

    @property
    def options(self) -> SessionOptions:
        return self.stream.options

    @property
    def log_extra(self) -> dict[str, str]:
        return self.stream.log_extra

    @property
    def current(self) -> ResponseRun | None:
        """The response being generated and sent, if any."""
        return self.responder.current

    @property
    def response_count(self) -> int:
        return self.responder.count

    # -- lifecycle ------------------------------------------------------------
    async def run(
        self,
        requests: AsyncIterator[wire.Request | Undecodable],
        write: Callable[[wire.Message], Awaitable[None]],
    ) -> StreamEnd:
        """Serve the stream until it ends; return how it ended.

        Every task of the session runs here and is finished when this returns,
        also when the caller is cancelled (the client went away)."""
        backend = self.runtime.backend
        self.stream.events.put(
            SessionStarted(
                session_id=self.id,
                options=self.options,
                settings=self.runtime.settings,
                model=f"{backend.name}:{backend.model_id}",
                output_sample_rate_hz=24_000,
            )
        )
        try:
            async with asyncio.TaskGroup() as group:
                self.stream.group = group
                group.create_task(self._read(requests), name=f"{self.id}-reader")
                group.create_task(self.responder.run(), name=f"{self.id}-responder")
                group.create_task(self._watchdog(), name=f"{self.id}-watchdog")
                group.create_task(self._write(write), name=f"{self.id}-writer")
        except* _Ended:
            pass
        except* Exception as crash:  # noqa: BLE001 - any crash of a session task ends the stream, logged once
            log.error("%s: a session task failed", self.id, exc_info=crash.exceptions[0], extra=self.log_extra)
            self._failure = StreamEnd(*status_of(Internal("internal server error; the session was ended")))
        finally:
            self.stream.group = None
            self._shutdown()
        if self._client_gone:
            return CLIENT_GONE
        return self._failure or self.outbox.end or StreamEnd(None)

    def _shutdown(self) -> None:
        """Synchronous cleanup: nothing here can be skipped by a second cancel."""
        self.outbox.closed = True
        self.turns.close()
        spec = self.speculation.current
        for run in (self.responder.current, spec.run if spec else None):
            if run is not None:
                run.stop(ResponseStatus.CANCELLED, "stream closed")
        self.stream.engine.release(self.stream.conversation)

    def go_away(self, time_left_s: float, reason: str) -> None:
        """Warn the client that the stream ends in `time_left_s`."""
        if not self._going_away:
            self._going_away = True
            self.stream.events.put(GoAway(time_left_ms=int(time_left_s * 1000), reason=reason))

    def drain(self, grace_s: float) -> None:
        """Server shutdown: finish the response in flight, then end the stream."""
        self.go_away(grace_s, "draining")
        self.stream.draining = True
        self.speculation.discard()
        if self.responder.current is None and self.responder.waiting == 0:
            self.end(Unavailable("the server is shutting down; reconnect"))

    def end(self, error: ServiceError | None) -> None:
        """End the stream (with OK when `error` is None) once the events queued
        before it are written, or after `_END_GRACE_S` if the client does not read."""
        if self.outbox.end is not None:
            return
        self._end_deadline = time.monotonic() + _END_GRACE_S
        if self.responder.current is not None and error is not None:
            self.responder.current.stop(ResponseStatus.CANCELLED, error.message)
        self.speculation.discard()
        self.outbox.put(StreamEnd(None) if error is None else StreamEnd(*status_of(error)))

    # -- writer -----------------------------------------------------------------
    async def _write(self, write: Callable[[wire.Message], Awaitable[None]]) -> None:
        while True:
            item = await self.outbox.get()
            if isinstance(item, StreamEnd):
                raise _Ended
            self.runtime.metrics.event_written(item)
            # a send cannot be taken back once started: cancelling the writer leaves it
            # running, and the call's status can go out only after it (`writing`)
            self.writing = asyncio.ensure_future(write(item))
            self.writing.add_done_callback(_retrieve)
            try:
                await asyncio.shield(self.writing)
            except Exception as exc:  # noqa: BLE001 - any transport failure means the peer is gone
                log.debug("%s: write failed: %r", self.id, exc, extra=self.log_extra)
                self._client_gone = True
                raise _Ended from None
            self.outbox.written()  # the client took it: what follows is not merged for a prompt reader

    # -- reader -----------------------------------------------------------------
    async def _read(self, requests: AsyncIterator[wire.Request | Undecodable]) -> None:
        async for request in requests:
            self._last_request = time.monotonic()
            if self.outbox.end is not None:
                continue  # the stream is ending: read on so the client is not blocked, ignore
            if isinstance(request, Undecodable):
                self.end(request.error())
                continue
            try:
                await self._handle(wire.from_proto(request))
            except ProtocolViolation as exc:
                self.end(exc)
            except ServiceError as exc:
                self.stream.error(exc)
        await self.turns.end_of_input()

    async def _handle(self, request: wire.ClientRequest) -> None:
        if isinstance(request, wire.AudioIn):
            await self.turns.on_audio(request.pcm16)
            return
        await self.turns.settle()  # requests apply after the audio sent before them
        match request:
            case wire.TextIn(text, defer_response):
                self.turns.on_text(text, defer_response)
            case wire.CommitTurn():
                self.turns.on_commit()
            case wire.CancelResponse(response_id):
                self.responder.cancel(response_id)
            case wire.TruncateResponse(response_id, audio_played_ms):
                self.ledger.truncate(response_id, audio_played_ms)
            case wire.UpdateConfig(apply):
                self.turns.on_update(apply(self.options, self.runtime.settings))
            case wire.BadRequest(error):
                raise error

    # -- watchdog ------------------------------------------------------------
    async def _watchdog(self) -> None:
        settings = self.runtime.settings
        while True:
            await asyncio.sleep(_WATCHDOG_TICK_S)
            now = time.monotonic()
            ending = self.outbox.end
            if ending is not None:
                if not self._end_deadline:
                    # the outbox ended the stream itself (too many events wait for a client that does not read)
                    self._end_deadline = now + _END_GRACE_S
                    if self.responder.current is not None:
                        self.responder.current.stop(ResponseStatus.CANCELLED, ending.details)
                if now >= self._end_deadline:
                    raise _Ended  # the client does not read its end: cut the call
                continue
            if settings.max_session_seconds:
                left = settings.max_session_seconds - (now - self._started)
                if left <= 0:
                    self.end(OutOfRange(f"session reached its maximum duration of {settings.max_session_seconds} s"))
                    continue
                if left <= _GO_AWAY_LEAD_S:
                    self.go_away(left, "max_session_duration")
            idle = settings.idle_timeout_seconds
            if idle and self.responder.current is None and now - self._last_request > idle:
                self.end(DeadlineExceeded(f"no request for {idle} s (idle timeout)"))

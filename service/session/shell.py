"""ChatSession: all the state of one Converse stream.

`ChatSession.run` owns every task of the stream in one TaskGroup:

- the reader applies client requests in order (audio through turn detection,
  text, commits, cancels, truncation, config updates);
- the responder answers committed turns one at a time with a `ResponseRun`;
- the writer drains the session's `Outbox` into the call (the stream's only
  writer) until the in-band `StreamEnd`;
- the watchdog enforces the idle timeout and the session length, and ends a
  stream whose client stopped reading once its end has waited `_END_GRACE_S`
  behind unsent events;
- short-lived helpers (an input transcription, a truncation's answer).

An unexpected exception in any of them ends the stream with INTERNAL (no
internals in the message) and one log line with the traceback. Errors the
session survives become in-stream `Error` events. All model state goes
through the engine: the session holds a `ConversationRef` only, and history
edits (record a response, truncate it, undo a speculative one) are engine
operations applied in order with generation.

Speculative responses: when turn detection sees the speech stop
(`SpeechPaused`) and the session is idle, the responder starts generating on
the turn so far, with its events held back (`HeldOutput`) and the engine
pausing it at its first audio. If the turn is committed with that very audio,
the response is promoted: `turn_committed`, `response_started` and the held
events go out at once. If the user speaks again first, the run is aborted, the
history restored to its snapshot, and nothing of it was ever sent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from service.backends.base import FRAME_MS, AssistantTurn, Backend, Conversation
from service.clock import now_ms
from service.config import Settings
from service.engine.api import ConversationRef, Engine
from service.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    OutOfRange,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    Undecodable,
    status_of,
)
from service.events import (
    CommitReason,
    GoAway,
    InputTranscription,
    PlaybackInterrupted,
    ResponseEnded,
    ResponseStarted,
    ResponseStatus,
    ResponseSummary,
    ResponseTruncated,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    TurnCommitted,
)
from service.metrics import ServiceMetrics
from service.oneshot import transcribe
from service.options import SessionOptions
from service.outbox import Outbox, StreamEnd
from service.pipeline import SAMPLES_PER_MS, OutputPolicy, ResponseResult, ResponseRun, UserInput
from service.session import wire
from service.session.wire import ProtocolViolation
from service.turn_pool import TurnPool
from service.turns import (
    InterruptSpeech,
    SpeechPaused,
    SpeechResumed,
    TurnEvent,
    TurnMode,
    TurnReady,
    TurnTracker,
)
from service.turns import SpeechStarted as SpeechBegan
from service.turns import SpeechStopped as SpeechEnded

log = logging.getLogger(__name__)

_MAX_QUEUED_TURNS = 4  # committed turns waiting for the running response
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


@dataclass
class Runtime:
    """What every session of a server shares. The engine exists once the
    backend has loaded (no session is admitted before)."""

    settings: Settings
    backend: Backend
    decode_pool: Executor  # audio decoding
    turn_pool: TurnPool  # voice activity and end-of-turn detection, shared fairly
    loaded_engine: Engine | None = None
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)

    @property
    def engine(self) -> Engine:
        if self.loaded_engine is None:
            raise RuntimeError("the model engine is not running yet")
        return self.loaded_engine


@dataclass
class _Speculation:
    """A response started on the turn so far, before the turn was committed."""

    audio: np.ndarray
    run: ResponseRun | None = None
    user: UserInput | None = None  # set when the turn is committed
    discarded: bool = False
    decided: asyncio.Event = field(default_factory=asyncio.Event)  # committed or discarded
    # history edits the client asked for meanwhile (a truncation), applied once
    # the speculative response is undone, so that the undo cannot revert them
    after_undo: list[Callable[[], None]] = field(default_factory=list)


class _Cut:
    """A truncation queued in the engine; later cuts of the same response replace its frame count."""

    def __init__(self, response_id: str, kept_frames: int, required: bool) -> None:
        self.response_id, self.kept_frames, self.required = response_id, kept_frames, required
        self.future: concurrent.futures.Future[AssistantTurn | None] = concurrent.futures.Future()

    def apply(self, conversation: Conversation) -> AssistantTurn | None:  # on the engine thread
        return conversation.truncate_response(self.kept_frames)


@dataclass
class _Playback:
    """The latest response as the client plays it (estimated in real time)."""

    response_id: str = ""
    start: float = 0.0
    end: float = 0.0
    pending_truncate: tuple[str, int] | None = None  # a truncate for the response still running
    cut: _Cut | None = None  # the latest truncation sent to the engine


def output_policy(options: SessionOptions, settings: Settings) -> OutputPolicy:
    if settings.pipeline == "baseline":
        return OutputPolicy(chunk_samples=None, first_frames=16, max_stride=16, adaptive=False)
    return OutputPolicy(
        chunk_samples=options.chunk_ms * SAMPLES_PER_MS,
        first_frames=options.first_chunk_frames,
        max_stride=options.max_stride_frames,
    )


class ChatSession:
    def __init__(self, runtime: Runtime, options: SessionOptions, peer: str = "") -> None:
        self.id = "sess_" + uuid.uuid4().hex[:12]
        self.runtime = runtime
        self.options = options
        self.peer = peer
        self.outbox = Outbox(max_audio_ms=runtime.settings.max_pending_audio_ms)
        self.events = wire.Wire(self.outbox, runtime.metrics)  # every event goes out through it
        self.engine = runtime.engine
        # the engine creates the model-side state on its own thread
        self.conversation: ConversationRef = self.engine.open(options.system_prompt)
        self.tracker = TurnTracker(options.turn, options.input_sample_rate_hz)
        self._turn_feed = runtime.turn_pool.feed(self.tracker, self._on_turn_events)
        self._turns: asyncio.Queue[UserInput | _Speculation | None] = asyncio.Queue(_MAX_QUEUED_TURNS + 1)
        self._group: asyncio.TaskGroup | None = None
        self._pending_text: list[str] = []
        self._turn_count = 0
        self.response_count = 0
        self.current: ResponseRun | None = None
        self._speculative: _Speculation | None = None
        # the latest speculation whose effect on the history is not settled yet
        # (neither committed nor undone): history edits wait behind its undo
        self._unsettled: _Speculation | None = None
        self.speculative_starts = 0
        self.speculative_discards = 0
        self._playback = _Playback()
        self._speech_end_ts = 0.0
        self._started = time.monotonic()
        self._last_request = time.monotonic()
        self._going_away = False
        self._draining = False
        # how the stream ends is the outbox's (`outbox.end`: the session's own end or
        # the outbox's overflow end); these two outcomes never reach the outbox
        self._failure: StreamEnd | None = None  # a session task crashed
        self._client_gone = False  # a write failed: the peer is gone
        self._end_deadline = 0.0  # when an end still not written cuts the call
        self._can_speculate = True
        self.writing: asyncio.Future[None] | None = None  # the send in flight, if any
        self._transcriptions: set[asyncio.Task[None]] = set()  # owned by the TaskGroup; waited for at the end

    @property
    def log_extra(self) -> dict[str, str]:
        return {"session_id": self.id, "peer": self.peer}

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
        self.events.put(
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
                self._group = group
                group.create_task(self._read(requests), name=f"{self.id}-reader")
                group.create_task(self._respond_loop(), name=f"{self.id}-responder")
                group.create_task(self._watchdog(), name=f"{self.id}-watchdog")
                group.create_task(self._write(write), name=f"{self.id}-writer")
        except* _Ended:
            pass
        except* Exception as crash:  # noqa: BLE001 - any crash of a session task ends the stream, logged once
            log.error("%s: a session task failed", self.id, exc_info=crash.exceptions[0], extra=self.log_extra)
            self._failure = StreamEnd(*status_of(Internal("internal server error; the session was ended")))
        finally:
            self._group = None
            self._shutdown()
        if self._client_gone:
            return CLIENT_GONE
        return self._failure or self.outbox.end or StreamEnd(None)

    def _shutdown(self) -> None:
        """Synchronous cleanup: nothing here can be skipped by a second cancel."""
        self.outbox.closed = True
        self._turn_feed.close()
        for run in (self.current, self._speculative.run if self._speculative else None):
            if run is not None:
                run.stop(ResponseStatus.CANCELLED, "stream closed")
        self.engine.release(self.conversation)

    def go_away(self, time_left_s: float, reason: str) -> None:
        """Warn the client that the stream ends in `time_left_s`."""
        if not self._going_away:
            self._going_away = True
            self.events.put(GoAway(time_left_ms=int(time_left_s * 1000), reason=reason))

    def drain(self, grace_s: float) -> None:
        """Server shutdown: finish the response in flight, then end the stream."""
        self.go_away(grace_s, "draining")
        self._draining = True
        self._discard_speculation()
        if self.current is None and self._turns.empty():
            self.end(Unavailable("the server is shutting down; reconnect"))

    def end(self, error: ServiceError | None) -> None:
        """End the stream (with OK when `error` is None) once the events queued
        before it are written, or after `_END_GRACE_S` if the client does not read."""
        if self.outbox.end is not None:
            return
        self._end_deadline = time.monotonic() + _END_GRACE_S
        if self.current is not None and error is not None:
            self.current.stop(ResponseStatus.CANCELLED, error.message)
        self._discard_speculation()
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
                self._error(exc)
        await self._end_of_input()

    def _error(self, exc: ServiceError) -> None:
        self.runtime.metrics.error(exc.code_name)
        self.events.put(wire.error_event(exc))

    async def _handle(self, request: wire.ClientRequest) -> None:
        if isinstance(request, wire.AudioIn):
            await self._on_audio(request.pcm16)
            return
        await self._turn_feed.settle()  # requests apply after the audio sent before them
        match request:
            case wire.TextIn():
                self._on_text(request)
            case wire.CommitTurn():
                self._commit(self._client_commit(), CommitReason.CLIENT_COMMIT, required=True)
            case wire.CancelResponse():
                self._on_cancel(request.response_id)
            case wire.TruncateResponse():
                self._on_truncate(request)
            case wire.UpdateConfig():
                self._on_update(request)
            case wire.BadRequest():
                raise request.error

    async def _on_audio(self, data: bytes) -> None:
        if len(data) % 2:
            raise InvalidArgument(
                f"audio.pcm16 must hold whole 16-bit samples (an even number of bytes), got {len(data)} bytes",
                "audio.pcm16",
            )
        if self.options.turn.mode is TurnMode.MANUAL:
            self._dispatch(self.tracker.push(data))
        else:
            # voice and end-of-turn detection run models in the shared turn pool; their
            # events come back through _on_turn_events
            await self._turn_feed.put(data)

    def _on_turn_events(self, events: list[TurnEvent]) -> None:
        if self.outbox.end is not None:
            return  # the stream is ending: as a request would be, ignored
        try:
            self._dispatch(events)
        except ServiceError as exc:
            self._error(exc)

    def _dispatch(self, events: list[TurnEvent]) -> None:
        for event in events:
            if isinstance(event, SpeechBegan):
                self._discard_speculation()
                self.events.put(SpeechStarted(audio_start_ms=int(event.audio_start_ms)))
            elif isinstance(event, InterruptSpeech):
                self._barge_in(int(event.audio_start_ms))
            elif isinstance(event, SpeechPaused):
                self._speculate(event.audio)
            elif isinstance(event, SpeechResumed):
                self._discard_speculation()
            elif isinstance(event, SpeechEnded):
                # the detector confirms the end only after some silence: date the end
                # of speech back by the audio received since (input arrives in real time)
                self._speech_end_ts = self._turn_feed.heard_ts(event.audio_end_ms)
                self.events.put(SpeechStopped(audio_end_ms=int(event.audio_end_ms)))
            elif isinstance(event, TurnReady):
                reason = CommitReason.SERVER_VAD
                if event.reason == "max_turn_length":
                    reason = CommitReason.MAX_TURN_LENGTH
                self._commit(event, reason)

    def _on_text(self, msg: wire.TextIn) -> None:
        limit = self.runtime.settings.max_text_chars
        if len(msg.text) > limit:
            raise InvalidArgument(f"text.text is longer than {limit} characters ({len(msg.text)})", "text.text")
        if not msg.text.strip():
            raise InvalidArgument("text.text is empty", "text.text")
        if sum(map(len, self._pending_text)) + len(msg.text) > limit:
            raise InvalidArgument(
                f"the pending turn's text would exceed {limit} characters; commit it first", "text.text"
            )
        self._discard_speculation()  # the turn now holds text the speculation did not see
        self._pending_text.append(msg.text)
        if not msg.defer_response:
            self._commit(self._client_commit(), CommitReason.TEXT_INPUT)

    def _client_commit(self) -> TurnReady | None:
        """The pending audio turn, closing a speech segment still open."""
        in_speech = self.tracker.in_speech
        ready = self.tracker.commit("client_commit")
        if in_speech and ready is not None:
            self.events.put(SpeechStopped(audio_end_ms=int(ready.audio_end_ms)))
        return ready

    def _commit(self, ready: TurnReady | None, reason: CommitReason, required: bool = False) -> None:
        text = "\n".join(self._pending_text)
        if ready is None and not text:
            if required:
                raise FailedPrecondition("commit_turn with nothing to commit: send audio or text first", "commit_turn")
            return
        if self._draining:
            raise Unavailable("the server is shutting down: no new turns; reconnect", "commit_turn")
        spec = self._speculative
        promote = (
            spec is not None
            and ready is not None
            and not text
            and len(ready.audio) == len(spec.audio)
            and not (spec.run is not None and spec.run.stopping)
        )
        if not promote:
            self._discard_speculation()
            if self._turns.qsize() >= _MAX_QUEUED_TURNS:
                raise ResourceExhausted(
                    f"{_MAX_QUEUED_TURNS} turns already wait for an answer; cancel the response or wait", "commit_turn"
                )
        self._pending_text = []
        self._turn_count += 1
        turn_id = f"turn_{self._turn_count}"
        user = UserInput(
            turn_id=turn_id,
            audio=ready.audio if ready is not None else None,
            text=text,
            commit_ts=now_ms(),
            speech_end_ts=self._speech_end_ts if reason is CommitReason.SERVER_VAD else 0.0,
            end_of_turn_probability=getattr(ready, "end_of_turn_probability", 0.0),
        )
        self._speech_end_ts = 0.0
        self.runtime.metrics.turn_committed(reason)
        self.events.put(
            TurnCommitted(
                turn_id=turn_id,
                audio_duration_ms=int(ready.duration_ms) if ready is not None else 0,
                text_chars=len(text),
                reason=reason,
            )
        )
        if ready is not None and self.options.input_transcription:
            task = self._spawn(self._transcribe(turn_id, ready.audio), f"{self.id}-transcribe-{turn_id}")
            if task is not None:
                self._transcriptions.add(task)
                task.add_done_callback(self._transcriptions.discard)
        if promote:
            assert spec is not None
            self._speculative = None  # committed: no longer something to discard
            spec.user = user
            spec.decided.set()
            self._settle(spec)  # its history is the conversation's now
            if spec.run is not None:
                self._promote(spec)
        else:
            self._turns.put_nowait(user)

    def _barge_in(self, audio_start_ms: int) -> None:
        if not self.options.turn.interrupt_response:
            return
        run = self.current
        if run is not None and not run.stopping:
            run.stop(ResponseStatus.INTERRUPTED, "the user started speaking")
            self.events.put(PlaybackInterrupted(response_id=run.response_id, audio_start_ms=audio_start_ms))
        elif run is None and now_ms() < self._playback.end:
            # generation is over but the client is still playing: flush it and
            # keep in the history only what was played so far (real-time playback
            # since the first chunk was sent; a TruncateResponse refines it)
            played_ms = max(0, int(now_ms() - self._playback.start))
            response_id = self._playback.response_id
            self.events.put(PlaybackInterrupted(response_id=response_id, audio_start_ms=audio_start_ms))
            self._playback.end = 0.0
            self._truncate(response_id, played_ms, required=False)

    def _on_cancel(self, response_id: str) -> None:
        run = self.current
        if run is not None and response_id in ("", run.response_id):
            run.stop(ResponseStatus.CANCELLED, "cancelled by the client")

    def _on_truncate(self, msg: wire.TruncateResponse) -> None:
        if not msg.response_id:
            raise InvalidArgument("truncate.response_id is required", "truncate.response_id")
        if self.current is not None and self.current.response_id == msg.response_id:
            self._playback.pending_truncate = (msg.response_id, msg.audio_played_ms)
            return
        if msg.response_id != self._playback.response_id:
            raise self._stale_truncate(msg.response_id)
        self._truncate(msg.response_id, msg.audio_played_ms, required=True)

    @staticmethod
    def _stale_truncate(response_id: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"truncate.response_id {response_id!r} is not the latest response, or a new turn already started after it",
            "truncate.response_id",
        )

    def _truncate(self, response_id: str, played_ms: int, required: bool) -> None:
        """Cut the latest response to what was heard, in the engine's order;
        acknowledge with ResponseTruncated (or an error when it is too late).

        A speculative response not committed yet was generated on the history
        before this cut: it is discarded (and started again on the cut
        history), and the cut waits until its undo is queued, as if the
        speculation had never happened."""
        spec = self._speculative
        self._discard_speculation()
        if self._unsettled is not None:
            self._unsettled.after_undo.append(lambda: self._cut(response_id, played_ms, required))
        else:
            self._cut(response_id, played_ms, required)
        if spec is not None:
            self._speculate(spec.audio, again=True)

    def _cut(self, response_id: str, played_ms: int, required: bool) -> None:
        cut = self._playback.cut
        if cut is not None and cut.response_id == response_id and not cut.future.done():
            # a cut of this response is queued and not applied yet: this one replaces it
            # (one engine edit and one acknowledgement, of what was applied, for a flood)
            cut.kept_frames, cut.required = -(-played_ms // FRAME_MS), cut.required or required
            return
        cut = _Cut(response_id, -(-played_ms // FRAME_MS), required)  # frames at least partly heard
        cut.future = self.engine.edit(self.conversation, cut.apply, coalesce=f"truncate:{response_id}")
        self._playback.cut = cut
        self._spawn(self._acknowledge_truncate(cut), f"{self.id}-truncate")

    async def _acknowledge_truncate(self, cut: _Cut) -> None:
        kept = await asyncio.wrap_future(cut.future)
        response_id, required = cut.response_id, cut.required
        if kept is None:
            if required:
                self._error(self._stale_truncate(response_id))
            return
        self.events.put(
            ResponseTruncated(response_id=response_id, audio_kept_ms=kept.audio_frames * FRAME_MS, heard_text=kept.text)
        )

    def _on_update(self, msg: wire.UpdateConfig) -> None:
        before, self.options = self.options, msg.apply(self.options, self.runtime.settings)
        spec, turn = self._speculative, self.options.turn
        answers_otherwise = (self.options.sampling, self.options.trace) != (before.sampling, before.trace)
        if spec is not None and (answers_otherwise or not turn.speculative or turn.mode is TurnMode.MANUAL):
            # the speculative response was started with the settings before: start
            # it again with these (if they still allow speculation), as a response
            # started at the commit would be
            self._discard_speculation()
            self._speculate(spec.audio, again=True)
        self._dispatch(self.tracker.update(self.options.turn))

    async def _end_of_input(self) -> None:
        """Half-close: answer what is pending, then end the stream cleanly."""
        await self._turn_feed.settle()
        with contextlib.suppress(ServiceError):
            self._commit(self.tracker.commit("end_of_input"), CommitReason.END_OF_INPUT)
        self._discard_speculation()
        await self._turns.put(None)

    # -- speculation ---------------------------------------------------------------
    def _speculate(self, audio: np.ndarray, again: bool = False) -> None:
        """Start answering the turn so far, if nothing else is going on.
        `again`: the speculation on this audio was just discarded and starts
        anew (it may still wait in the queue, where it is skipped)."""
        turn = self.options.turn
        if not (turn.speculative and self.runtime.settings.speculative and self._can_speculate):
            return
        if turn.mode is TurnMode.MANUAL:
            return
        if self._speculative or self.current or self._pending_text or not (again or self._turns.empty()):
            return
        if self._draining or self.outbox.end is not None or not len(audio):
            return
        if self.engine.stats.waiting:
            return  # the model is saturated: a speculative row would take a committed turn's place
        self._speculative = self._unsettled = spec = _Speculation(audio)
        self.speculative_starts += 1
        self._turns.put_nowait(spec)

    def _discard_speculation(self) -> None:
        spec, self._speculative = self._speculative, None
        if spec is None:
            return
        spec.discarded = True
        spec.decided.set()
        if spec.run is not None:
            spec.run.stop(ResponseStatus.CANCELLED, "speculation discarded")

    def _settle(self, spec: _Speculation) -> None:
        """The speculation was committed, or its undo is queued (or it never
        touched the history): the edits that waited for it go to the engine now."""
        if self._unsettled is spec:
            self._unsettled = None
        edits, spec.after_undo = spec.after_undo, []
        for edit in edits:
            edit()

    def _promote(self, spec: _Speculation) -> None:
        """The turn was committed with the speculation's audio: let it be seen."""
        run, user = spec.run, spec.user
        assert run is not None and user is not None
        self.response_count += 1
        self.events.put(ResponseStarted(response_id=run.response_id, turn_id=user.turn_id))
        self.current = run
        run.promote()

    async def _run_speculation(self, spec: _Speculation) -> None:
        if spec.discarded:
            self.speculative_discards += 1
            self._settle(spec)
            return
        try:
            snapshot = await asyncio.wrap_future(self.engine.edit(self.conversation, Conversation.snapshot))
        except NotImplementedError:
            # this backend cannot undo a response: answer committed turns only
            log.info("%s: speculation off (the backend cannot undo a response)", self.id, extra=self.log_extra)
            self._can_speculate = False
            if self._speculative is spec:
                self._speculative = None
            self._settle(spec)
            if spec.user is not None:
                await self._respond(spec.user)
            return
        run = self._new_run(f"resp_{self.response_count + 1}", speculative=True)
        spec.run = run
        if spec.discarded:
            run.stop(ResponseStatus.CANCELLED, "speculation discarded")
        elif spec.user is not None:
            self._promote(spec)
        try:
            result = await run.run(UserInput(turn_id="", audio=spec.audio))
            # a short answer can be complete before its turn is: wait for the verdict
            await spec.decided.wait()
        finally:
            if self.current is run:
                self.current = None
        if run.held:
            # never committed: undo it as if it had not happened
            self.speculative_discards += 1
            self._edit(lambda c: c.restore(snapshot), "undo a speculative response")
            self._settle(spec)
            return
        assert spec.user is not None
        self._finish_response(run, result, spec.user)

    # -- responder ---------------------------------------------------------------
    async def _respond_loop(self) -> None:
        while (item := await self._turns.get()) is not None:
            if isinstance(item, _Speculation):
                await self._run_speculation(item)
            else:
                await self._respond(item)
            if self._draining and self._turns.empty():
                self.end(Unavailable("the server is shutting down; reconnect"))
                return
        if self._transcriptions:  # the transcripts of the last turns are part of the answer
            await asyncio.wait(set(self._transcriptions))
        self.end(None)

    def _new_run(self, response_id: str, speculative: bool = False) -> ResponseRun:
        rt = self.runtime
        return ResponseRun(
            response_id=response_id,
            engine=self.engine,
            conversation=self.conversation,
            sampling=self.options.sampling,
            policy=output_policy(self.options, rt.settings),
            events=self.events,
            decode_pool=rt.decode_pool,
            trace=self.options.trace,
            speculative=speculative,
            owner=self.id,
        )

    async def _respond(self, user: UserInput) -> None:
        self.response_count += 1
        response_id = f"resp_{self.response_count}"
        self.events.put(ResponseStarted(response_id=response_id, turn_id=user.turn_id))
        run = self._new_run(response_id)
        self.current = run
        try:
            result = await run.run(user)
        finally:
            self.current = None
        self._finish_response(run, result, user)

    def _finish_response(self, run: ResponseRun, result: ResponseResult, user: UserInput) -> None:
        response_id = run.response_id
        turn, heard = result.turn, result.heard_frames
        self._edit(lambda c: c.record_response(turn, heard), "record a response")
        pending, self._playback.pending_truncate = self._playback.pending_truncate, None
        self._playback.response_id = response_id
        self._playback.start = run.stats.first_audio_ts or now_ms()
        self._playback.end = self._playback.start + result.audio_ms
        if pending and pending[0] == response_id:
            self._truncate(response_id, pending[1], required=True)
        if result.status is ResponseStatus.FAILED:
            log.warning("%s %s failed: %s", self.id, response_id, result.reason,
                        extra={**self.log_extra, "response_id": response_id})  # fmt: skip
        self.runtime.metrics.response_ended(result.status)
        self.events.put(
            ResponseEnded(
                response_id=response_id,
                status=result.status,
                reason=result.reason,
                text=result.text,
                text_tokens=result.text_tokens,
                audio_frames=result.audio_frames,
                audio_ms=result.audio_ms,
                heard_text=(turn if heard is None else turn.truncated(heard)).text,
                summary=lambda: run.metrics(user),
            )
        )
        if self.options.trace:
            starts, discards = self.speculative_starts, self.speculative_discards

            def summary() -> ResponseSummary:
                figures = run.metrics(user)
                figures = dataclasses.replace(figures, speculative_starts=starts, speculative_discards=discards)
                return ResponseSummary(response_id, figures)

            self.events.put(summary)

    # -- helpers ---------------------------------------------------------------------
    async def _transcribe(self, turn_id: str, audio: np.ndarray) -> None:
        try:
            text = await transcribe(self.engine, audio, owner=self.id)
        except ServiceError as exc:
            self._error(exc)
            return
        self.runtime.metrics.input_transcription()
        self.events.put(InputTranscription(turn_id=turn_id, text=text))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None] | None:
        """Run a short helper task owned by the session's TaskGroup."""
        if self._group is None:
            coro.close()
            return None
        return self._group.create_task(coro, name=name)

    def _edit(self, op: Callable[[Conversation], object], what: str) -> None:
        """A history edit nobody waits for; a failure is logged."""

        def check(future: concurrent.futures.Future[object]) -> None:
            if not future.cancelled() and (exc := future.exception()) is not None:
                log.error("%s: cannot %s", self.id, what, exc_info=exc, extra=self.log_extra)

        self.engine.edit(self.conversation, op).add_done_callback(check)

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
                    if self.current is not None:
                        self.current.stop(ResponseStatus.CANCELLED, ending.details)
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
            if idle and self.current is None and now - self._last_request > idle:
                self.end(DeadlineExceeded(f"no request for {idle} s (idle timeout)"))

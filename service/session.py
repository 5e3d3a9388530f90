"""ChatSession: all the state of one Converse stream.

A session owns three tasks: the reader (applies client requests in order:
audio through turn detection, text, commits, cancels, truncation, config
updates), the responder (answers committed turns one at a time with a
`ResponseRun`), and the watchdog (idle timeout and session length). Every
event leaves through the session's `Outbox`, which the servicer drains as the
stream's only writer. Errors the session survives become in-stream `Error`
events; errors that end the stream travel in-band as a `StreamEnd`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from service.backends.base import FRAME_MS, Backend, Conversation
from service.config import Settings
from service.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from service.options import SessionOptions, apply_update, limits_to_proto, options_to_proto
from service.outbox import Outbox, StreamEnd, now_ms
from service.pipeline import Executors, OutputPolicy, ResponseRun, UserInput
from service.turns import (
    InterruptSpeech,
    SpeechStarted,
    SpeechStopped,
    TurnEvent,
    TurnMode,
    TurnReady,
    TurnTracker,
)
from voicechat.v1 import voicechat_pb2 as pb

log = logging.getLogger(__name__)

_MAX_QUEUED_TURNS = 4  # committed turns waiting for the running response
_GO_AWAY_LEAD_S = 10.0  # GoAway this long before the session time limit


class ProtocolViolation(FailedPrecondition):
    """A request that breaks the stream's protocol; ends the stream."""


@dataclass
class Runtime:
    """What every session of a server shares."""

    settings: Settings
    backend: Backend
    executors: Executors


def output_policy(options: SessionOptions, settings: Settings) -> OutputPolicy:
    if settings.pipeline == "baseline":
        return OutputPolicy(chunk_samples=None, first_frames=16, max_stride=16, adaptive=False)
    return OutputPolicy(
        chunk_samples=options.chunk_ms * 24,
        first_frames=options.first_chunk_frames,
        max_stride=options.max_stride_frames,
    )


class ChatSession:
    def __init__(self, runtime: Runtime, options: SessionOptions) -> None:
        self.id = "sess_" + uuid.uuid4().hex[:12]
        self.runtime = runtime
        self.options = options
        settings = runtime.settings
        self.outbox = Outbox(max_audio_ms=settings.max_pending_audio_ms)
        self.conversation: Conversation | None = None
        self.tracker = TurnTracker(options.turn, options.input_sample_rate_hz)
        self._turns: asyncio.Queue[UserInput | None] = asyncio.Queue(_MAX_QUEUED_TURNS)
        self._tasks: list[asyncio.Task[None]] = []
        self._pending_text: list[str] = []
        self._turn_count = 0
        self.response_count = 0
        self.current: ResponseRun | None = None
        self._last_response_id = ""
        self._last_playback_start = 0.0
        self._last_playback_end = 0.0
        self._pending_truncate: tuple[str, int] | None = None
        self._speech_end_ts = 0.0
        self._started = time.monotonic()
        self._last_request = time.monotonic()
        self._going_away = False
        self._draining = False

    # -- lifecycle ------------------------------------------------------------
    async def start(self, requests: AsyncIterator[pb.ConverseRequest]) -> None:
        backend = self.runtime.backend
        self.conversation = backend.new_conversation(self.options.system_prompt)
        self.outbox.put(
            pb.ConverseResponse(
                session_started=pb.SessionStarted(
                    session_id=self.id,
                    config=options_to_proto(self.options),
                    limits=limits_to_proto(self.runtime.settings),
                    model=f"{backend.name}:{backend.model_id}",
                    output_sample_rate_hz=24_000,
                )
            )
        )
        self._tasks = [
            asyncio.create_task(self._read(requests), name=f"{self.id}-reader"),
            asyncio.create_task(self._respond_loop(), name=f"{self.id}-responder"),
            asyncio.create_task(self._watchdog(), name=f"{self.id}-watchdog"),
        ]

    async def close(self) -> None:
        """Stop everything the session started and wait for it."""
        self.outbox.closed = True
        if self.current is not None:
            self.current.stop(pb.RESPONSE_STATUS_CANCELLED, "stream closed")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def go_away(self, time_left_s: float, reason: str) -> None:
        """Warn the client that the stream ends in `time_left_s`."""
        if not self._going_away:
            self._going_away = True
            self.outbox.put(pb.ConverseResponse(go_away=pb.GoAway(time_left_ms=int(time_left_s * 1000), reason=reason)))

    def drain(self, grace_s: float) -> None:
        """Server shutdown: finish the response in flight, then end the stream."""
        self.go_away(grace_s, "draining")
        self._draining = True
        if self.current is None and self._turns.empty():
            self.end(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; reconnect")

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """End the stream with a status once queued events are written."""
        if self.current is not None:
            self.current.stop(pb.RESPONSE_STATUS_CANCELLED, details)
        self.outbox.put(StreamEnd(code, details))

    # -- reader -----------------------------------------------------------------
    async def _read(self, requests: AsyncIterator[pb.ConverseRequest]) -> None:
        async for request in requests:
            self._last_request = time.monotonic()
            try:
                await self._handle(request)
            except ProtocolViolation as exc:
                self.end(exc.code, exc.message)
                return
            except ServiceError as exc:
                self._error(exc)
        await self._end_of_input()

    def _error(self, exc: ServiceError) -> None:
        self.outbox.put(pb.ConverseResponse(error=pb.Error(code=exc.code_name, message=exc.message, field=exc.field)))

    async def _handle(self, request: pb.ConverseRequest) -> None:
        kind = request.WhichOneof("kind")
        if kind == "audio":
            await self._on_audio(request.audio.pcm16)
        elif kind == "text":
            self._on_text(request.text)
        elif kind == "commit_turn":
            self._commit(self._client_commit(), pb.COMMIT_REASON_CLIENT_COMMIT, required=True)
        elif kind == "cancel_response":
            self._on_cancel(request.cancel_response.response_id)
        elif kind == "truncate":
            self._on_truncate(request.truncate)
        elif kind == "update_config":
            self._on_update(request.update_config)
        elif kind == "config":
            raise ProtocolViolation("config is only allowed as the first message; use update_config", "config")
        else:
            raise InvalidArgument("empty ConverseRequest: set one of its fields", "kind")

    async def _on_audio(self, data: bytes) -> None:
        if len(data) % 2:
            raise InvalidArgument(
                f"audio.pcm16 must hold whole 16-bit samples (an even number of bytes), got {len(data)} bytes",
                "audio.pcm16",
            )
        if self.options.turn.mode is TurnMode.SERVER_VAD:
            # voice detection costs ~1 ms per 32 ms of audio: keep it off the event loop
            loop = asyncio.get_running_loop()
            events = await loop.run_in_executor(self.runtime.executors.decode, self.tracker.push, data)
        else:
            events = self.tracker.push(data)
        self._dispatch(events)

    def _dispatch(self, events: list[TurnEvent]) -> None:
        for event in events:
            if isinstance(event, SpeechStarted):
                self._put(speech_started=pb.SpeechStarted(audio_start_ms=int(event.audio_start_ms)))
            elif isinstance(event, InterruptSpeech):
                self._barge_in(int(event.audio_start_ms))
            elif isinstance(event, SpeechStopped):
                # the detector confirms the end only after `silence_duration_ms`: date the
                # end of speech back by the audio received since (input arrives in real time)
                self._speech_end_ts = now_ms() - (self.tracker.input_ms - event.audio_end_ms)
                self._put(speech_stopped=pb.SpeechStopped(audio_end_ms=int(event.audio_end_ms)))
            elif isinstance(event, TurnReady):
                reason = (
                    pb.COMMIT_REASON_MAX_TURN_LENGTH if event.reason == "max_turn_length" else pb.COMMIT_REASON_SERVER_VAD
                )
                self._commit(event, reason)

    def _on_text(self, msg: pb.InputText) -> None:
        limit = self.runtime.settings.max_text_chars
        if len(msg.text) > limit:
            raise InvalidArgument(f"text.text is longer than {limit} characters ({len(msg.text)})", "text.text")
        if not msg.text.strip():
            raise InvalidArgument("text.text is empty", "text.text")
        if sum(map(len, self._pending_text)) + len(msg.text) > limit:
            raise InvalidArgument(
                f"the pending turn's text would exceed {limit} characters; commit it first", "text.text"
            )
        self._pending_text.append(msg.text)
        if not msg.defer_response:
            self._commit(self._client_commit(), pb.COMMIT_REASON_TEXT_INPUT)

    def _client_commit(self) -> TurnReady | None:
        """The pending audio turn, closing a speech segment still open."""
        in_speech = self.tracker.in_speech
        ready = self.tracker.commit("client_commit")
        if in_speech and ready is not None:
            self._put(speech_stopped=pb.SpeechStopped(audio_end_ms=int(ready.audio_end_ms)))
        return ready

    def _commit(self, ready: TurnReady | None, reason: pb.CommitReason, required: bool = False) -> None:
        text = "\n".join(self._pending_text)
        if ready is None and not text:
            if required:
                raise FailedPrecondition("commit_turn with nothing to commit: send audio or text first", "commit_turn")
            return
        if self._draining:
            raise Unavailable("the server is shutting down: no new turns; reconnect", "commit_turn")
        if self._turns.full():
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
            speech_end_ts=self._speech_end_ts if reason == pb.COMMIT_REASON_SERVER_VAD else 0.0,
        )
        self._speech_end_ts = 0.0
        self._put(
            turn_committed=pb.TurnCommitted(
                turn_id=turn_id,
                audio_duration_ms=int(ready.duration_ms) if ready is not None else 0,
                text_chars=len(text),
                reason=reason,
            )
        )
        self._turns.put_nowait(user)

    def _barge_in(self, audio_start_ms: int) -> None:
        if not self.options.turn.interrupt_response:
            return
        run = self.current
        if run is not None and not run.stopping:
            run.stop(pb.RESPONSE_STATUS_INTERRUPTED, "the user started speaking")
            self._put(playback_interrupted=pb.PlaybackInterrupted(response_id=run.response_id, audio_start_ms=audio_start_ms))
        elif run is None and now_ms() < self._last_playback_end:
            # generation is over but the client is still playing: flush it and
            # keep in the history only what was played so far (real-time playback
            # since the first chunk was sent; a TruncateResponse refines it)
            played_ms = max(0, int(now_ms() - self._last_playback_start))
            self._put(
                playback_interrupted=pb.PlaybackInterrupted(
                    response_id=self._last_response_id, audio_start_ms=audio_start_ms
                )
            )
            self._last_playback_end = 0.0
            self._truncate(self._last_response_id, played_ms)

    def _on_cancel(self, response_id: str) -> None:
        run = self.current
        if run is not None and response_id in ("", run.response_id):
            run.stop(pb.RESPONSE_STATUS_CANCELLED, "cancelled by the client")

    def _on_truncate(self, msg: pb.TruncateResponse) -> None:
        if not msg.response_id:
            raise InvalidArgument("truncate.response_id is required", "truncate.response_id")
        if self.current is not None and self.current.response_id == msg.response_id:
            self._pending_truncate = (msg.response_id, msg.audio_played_ms)
            return
        if msg.response_id != self._last_response_id or not self._truncate(msg.response_id, msg.audio_played_ms):
            raise FailedPrecondition(
                f"truncate.response_id {msg.response_id!r} is not the latest response, or a new turn already "
                "started after it",
                "truncate.response_id",
            )

    def _truncate(self, response_id: str, played_ms: int) -> bool:
        assert self.conversation is not None
        kept = -(-played_ms // FRAME_MS)  # frames that were at least partly heard
        return self.conversation.truncate_response(kept)

    def _on_update(self, msg: pb.UpdateConfig) -> None:
        self.options = apply_update(self.options, msg, self.runtime.settings)
        self._dispatch(self.tracker.update(self.options.turn))

    async def _end_of_input(self) -> None:
        """Half-close: answer what is pending, then end the stream cleanly."""
        with contextlib.suppress(ServiceError):
            self._commit(self.tracker.commit("end_of_input"), pb.COMMIT_REASON_END_OF_INPUT)
        await self._turns.put(None)

    # -- responder ---------------------------------------------------------------
    async def _respond_loop(self) -> None:
        while (user := await self._turns.get()) is not None:
            await self._respond(user)
            if self._draining:
                self.end(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; reconnect")
                return
        self.outbox.put(StreamEnd(None))

    async def _respond(self, user: UserInput) -> None:
        assert self.conversation is not None
        rt = self.runtime
        self.response_count += 1
        response_id = f"resp_{self.response_count}"
        self._put(response_started=pb.ResponseStarted(response_id=response_id, turn_id=user.turn_id))
        run = ResponseRun(
            response_id=response_id,
            backend=rt.backend,
            conversation=self.conversation,
            sampling=self.options.sampling,
            policy=output_policy(self.options, rt.settings),
            outbox=self.outbox,
            executors=rt.executors,
            trace=self.options.trace,
        )
        self.current = run
        try:
            result = await run.run(user)
        finally:
            self.current = None
        self.conversation.record_response(result.turn)
        self._last_response_id = response_id
        if self._pending_truncate and self._pending_truncate[0] == response_id:
            self._truncate(response_id, self._pending_truncate[1])
        self._pending_truncate = None
        self._last_playback_start = run.stats.first_audio_ts or now_ms()
        self._last_playback_end = self._last_playback_start + result.audio_ms
        if result.status == pb.RESPONSE_STATUS_FAILED:
            log.warning("%s %s failed: %s", self.id, response_id, result.reason)
        self._put(
            response_ended=pb.ResponseEnded(
                response_id=response_id,
                status=result.status,  # type: ignore[arg-type]
                reason=result.reason,
                text=result.text,
                text_tokens=result.text_tokens,
                audio_frames=result.audio_frames,
                audio_ms=result.audio_ms,
            )
        )
        if self.options.trace:
            self.outbox.put(
                lambda: pb.ConverseResponse(metrics=pb.Metrics(response_id=response_id, response=run.metrics(user)))
            )

    # -- watchdog ------------------------------------------------------------
    async def _watchdog(self) -> None:
        settings = self.runtime.settings
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if settings.max_session_seconds:
                left = settings.max_session_seconds - (now - self._started)
                if left <= 0:
                    self.end(
                        grpc.StatusCode.OUT_OF_RANGE, f"session reached its maximum duration of {settings.max_session_seconds} s"
                    )
                    return
                if left <= _GO_AWAY_LEAD_S:
                    self.go_away(left, "max_session_duration")
            idle = settings.idle_timeout_seconds
            if idle and self.current is None and now - self._last_request > idle:
                self.end(grpc.StatusCode.DEADLINE_EXCEEDED, f"no request for {idle} s (idle timeout)")
                return

    def _put(self, **event: object) -> None:
        self.outbox.put(pb.ConverseResponse(**event))  # type: ignore[arg-type]


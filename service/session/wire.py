"""The session's one mapping to and from the contract (`voicechat_pb2`).

Out: the domain events of `service.events` become `ConverseResponse`
messages in the stream's `Outbox` (`Wire`, the `EventSink` every part of the
session and every response writes through). In: a `ConverseRequest` becomes
one of the requests below, which the stream shell hands to the part that owns
it. No other module of the session or the pipeline imports the proto.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from service.config import Settings
from service.errors import FailedPrecondition, InvalidArgument, ServiceError
from service.events import (
    AudioChunk,
    CommitReason,
    DecodeBatch,
    Error,
    Event,
    GoAway,
    InputTranscription,
    Later,
    PlaybackInterrupted,
    ResponseEnded,
    ResponseMetrics,
    ResponseStarted,
    ResponseStatus,
    ResponseSummary,
    ResponseTruncated,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    TextDelta,
    TurnCommitted,
)
from service.metrics import ServiceMetrics
from service.options import SessionOptions, apply_update, limits_to_proto, options_to_proto
from service.outbox import Outbox, WriteStats
from voicechat.v1 import voicechat_pb2 as pb

type Message = pb.ConverseResponse  # what the stream's writer writes
type Request = pb.ConverseRequest  # what the stream's reader reads


class ProtocolViolation(FailedPrecondition):
    """A request that breaks the stream's protocol; ends the stream."""


# -- out ---------------------------------------------------------------------------
def status_to_proto(status: ResponseStatus) -> pb.ResponseStatus:
    return pb.ResponseStatus.Value(f"RESPONSE_STATUS_{status.name}")


def reason_to_proto(reason: CommitReason) -> pb.CommitReason:
    return pb.CommitReason.Value(f"COMMIT_REASON_{reason.name}")


def metrics_to_proto(metrics: ResponseMetrics) -> pb.ResponseMetrics:
    return pb.ResponseMetrics(**dataclasses.asdict(metrics))


def to_proto(event: Event) -> pb.ConverseResponse:
    """The contract's message for `event`."""
    match event:
        case TextDelta(response_id, text, source_ts_ms, ready_ts_ms):
            delta = pb.TextDelta(response_id=response_id, text=text, source_ts_ms=source_ts_ms, ready_ts_ms=ready_ts_ms)
            return pb.ConverseResponse(text_delta=delta)
        case AudioChunk():
            chunk = pb.AudioChunk(
                response_id=event.response_id,
                pcm16=event.pcm16,
                sample_rate_hz=event.sample_rate_hz,
                duration_ms=event.duration_ms,
                offset_ms=event.offset_ms,
                source_ts_ms=event.source_ts_ms,
                ready_ts_ms=event.ready_ts_ms,
            )
            return pb.ConverseResponse(audio_chunk=chunk)
        case SessionStarted():
            started = pb.SessionStarted(
                session_id=event.session_id,
                config=options_to_proto(event.options),
                limits=limits_to_proto(event.settings),
                model=event.model,
                output_sample_rate_hz=event.output_sample_rate_hz,
            )
            return pb.ConverseResponse(session_started=started)
        case GoAway(time_left_ms, reason):
            return pb.ConverseResponse(go_away=pb.GoAway(time_left_ms=time_left_ms, reason=reason))
        case SpeechStarted(audio_start_ms):
            return pb.ConverseResponse(speech_started=pb.SpeechStarted(audio_start_ms=audio_start_ms))
        case SpeechStopped(audio_end_ms):
            return pb.ConverseResponse(speech_stopped=pb.SpeechStopped(audio_end_ms=audio_end_ms))
        case TurnCommitted(turn_id, audio_duration_ms, text_chars, reason):
            committed = pb.TurnCommitted(
                turn_id=turn_id,
                audio_duration_ms=audio_duration_ms,
                text_chars=text_chars,
                reason=reason_to_proto(reason),
            )
            return pb.ConverseResponse(turn_committed=committed)
        case InputTranscription(turn_id, text):
            return pb.ConverseResponse(input_transcription=pb.InputTranscription(turn_id=turn_id, text=text))
        case ResponseStarted(response_id, turn_id):
            return pb.ConverseResponse(response_started=pb.ResponseStarted(response_id=response_id, turn_id=turn_id))
        case PlaybackInterrupted(response_id, audio_start_ms):
            interrupted = pb.PlaybackInterrupted(response_id=response_id, audio_start_ms=audio_start_ms)
            return pb.ConverseResponse(playback_interrupted=interrupted)
        case ResponseTruncated(response_id, audio_kept_ms, heard_text):
            truncated = pb.ResponseTruncated(
                response_id=response_id, audio_kept_ms=audio_kept_ms, heard_text=heard_text
            )
            return pb.ConverseResponse(response_truncated=truncated)
        case ResponseEnded():
            ended = pb.ResponseEnded(
                response_id=event.response_id,
                status=status_to_proto(event.status),
                reason=event.reason,
                text=event.text,
                text_tokens=event.text_tokens,
                audio_frames=event.audio_frames,
                audio_ms=event.audio_ms,
                heard_text=event.heard_text,
            )
            return pb.ConverseResponse(response_ended=ended)
        case ResponseSummary(response_id, metrics):
            return pb.ConverseResponse(metrics=pb.Metrics(response_id=response_id, response=metrics_to_proto(metrics)))
        case DecodeBatch(response_id, frames, decode_ms, backlog_frames):
            batch = pb.DecodeBatchMetrics(frames=frames, decode_ms=decode_ms, backlog_frames=backlog_frames)
            return pb.ConverseResponse(metrics=pb.Metrics(response_id=response_id, decode_batch=batch))
        case Error(code, message, field):
            return pb.ConverseResponse(error=pb.Error(code=code, message=message, field=field))
    raise TypeError(f"not an event: {event!r}")


def error_event(exc: ServiceError) -> Error:
    return Error(code=exc.code_name, message=exc.message, field=exc.field)


class Wire:
    """The session's `EventSink`: maps each event to its message and queues
    it in the outbox, the stream's one ordered queue to its writer."""

    def __init__(self, outbox: Outbox, metrics: ServiceMetrics) -> None:
        self._outbox = outbox
        self._metrics = metrics

    @property
    def high_water(self) -> int:
        return self._outbox.high_water

    def put(self, event: Event | Later, stats: WriteStats | None = None) -> None:
        if callable(event):
            build = event
            self._outbox.put(lambda: to_proto(build()), stats)
            return
        message = to_proto(event)
        if isinstance(event, ResponseEnded) and event.summary is not None:
            summary = event.summary
            self._outbox.put(self._metrics.when_written(message, lambda: metrics_to_proto(summary())))
        elif isinstance(event, TextDelta | AudioChunk):
            self._outbox.put(message, stats, event.response_id)
        else:
            self._outbox.put(message, stats)

    def purge(self, response_id: str) -> int:
        return self._outbox.purge(response_id)


# -- in ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AudioIn:
    pcm16: bytes


@dataclass(frozen=True, slots=True)
class TextIn:
    text: str
    defer_response: bool


@dataclass(frozen=True, slots=True)
class CommitTurn:
    pass


@dataclass(frozen=True, slots=True)
class CancelResponse:
    response_id: str  # "" for whatever is generating


@dataclass(frozen=True, slots=True)
class TruncateResponse:
    response_id: str
    audio_played_ms: int


@dataclass(frozen=True, slots=True)
class UpdateConfig:
    apply: Callable[[SessionOptions, Settings], SessionOptions]  # raises InvalidArgument


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request the session refuses; raised where a request is handled, in order."""

    error: ServiceError


ClientRequest = AudioIn | TextIn | CommitTurn | CancelResponse | TruncateResponse | UpdateConfig | BadRequest


def from_proto(request: pb.ConverseRequest) -> ClientRequest:
    """The session's request for a `ConverseRequest` after the first."""
    kind = request.WhichOneof("kind")
    if kind == "audio":
        return AudioIn(request.audio.pcm16)
    if kind == "text":
        return TextIn(request.text.text, request.text.defer_response)
    if kind == "commit_turn":
        return CommitTurn()
    if kind == "cancel_response":
        return CancelResponse(request.cancel_response.response_id)
    if kind == "truncate":
        return TruncateResponse(request.truncate.response_id, request.truncate.audio_played_ms)
    if kind == "update_config":
        update = request.update_config
        return UpdateConfig(lambda options, settings: apply_update(options, update, settings))
    if kind == "config":
        return BadRequest(ProtocolViolation("config is only allowed as the first message; use update_config", "config"))
    return BadRequest(InvalidArgument("empty ConverseRequest: set one of its fields", "kind"))

"""What a Converse stream tells its client, in the service's own terms.

The parts of a session (`service.session`) and a response (`service.pipeline`)
emit these events into an `EventSink`; one module, `service.session.wire`,
maps them to the contract's `ConverseResponse` messages and queues them for
the stream's writer. Nothing here knows protobuf: the events name what
happened, the wire module decides how it is spelled on the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from service.config import Settings
    from service.options import SessionOptions
    from service.outbox import WriteStats


class ResponseStatus(StrEnum):
    """How a response ended (the contract's `ResponseStatus`)."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    MAX_TOKENS = "max_tokens"


class CommitReason(StrEnum):
    """Why a user turn was committed (the contract's `CommitReason`)."""

    SERVER_VAD = "server_vad"
    CLIENT_COMMIT = "client_commit"
    TEXT_INPUT = "text_input"
    END_OF_INPUT = "end_of_input"
    MAX_TURN_LENGTH = "max_turn_length"


@dataclass(frozen=True, slots=True)
class SessionStarted:
    session_id: str
    options: SessionOptions
    settings: Settings  # the limits the session runs under
    model: str
    output_sample_rate_hz: int


@dataclass(frozen=True, slots=True)
class GoAway:
    time_left_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    audio_start_ms: int


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class TurnCommitted:
    turn_id: str
    audio_duration_ms: int
    text_chars: int
    reason: CommitReason


@dataclass(frozen=True, slots=True)
class InputTranscription:
    turn_id: str
    text: str


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    response_id: str
    turn_id: str


@dataclass(frozen=True, slots=True)
class TextDelta:
    response_id: str
    text: str
    source_ts_ms: float = 0.0  # tracing only: the model step it comes from
    ready_ts_ms: float = 0.0  # tracing only: when it was ready to be sent


@dataclass(frozen=True, slots=True)
class AudioChunk:
    response_id: str
    pcm16: bytes
    sample_rate_hz: int
    duration_ms: int
    offset_ms: int
    source_ts_ms: float = 0.0  # tracing only
    ready_ts_ms: float = 0.0  # tracing only


@dataclass(frozen=True, slots=True)
class PlaybackInterrupted:
    response_id: str
    audio_start_ms: int


@dataclass(frozen=True, slots=True)
class ResponseTruncated:
    response_id: str
    audio_kept_ms: int
    heard_text: str


@dataclass(frozen=True, slots=True)
class ResponseMetrics:
    """One response's figures (tracing, and the service's metrics); field for field the contract's."""

    speech_end_to_commit_ms: float = 0.0
    prefill_ms: float = 0.0
    commit_to_first_text_ms: float = 0.0
    commit_to_first_audio_ms: float = 0.0
    tokens_before_first_audio: int = 0
    generation_ms: float = 0.0
    generation_rtf: float = 0.0
    decode_batches: int = 0
    decode_ms_total: float = 0.0
    decode_ms_max: float = 0.0
    server_latency_p50_ms: float = 0.0
    server_latency_max_ms: float = 0.0
    queue_high_water: int = 0
    text_coalesced: int = 0
    audio_merged: int = 0
    first_chunk_frames: int = 0
    max_stride_frames: int = 0
    step_to_write_p50_ms: float = 0.0
    step_to_write_max_ms: float = 0.0
    speculative: bool = False
    speculative_starts: int = 0
    speculative_discards: int = 0
    end_of_turn_probability: float = 0.0
    engine_wait_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class ResponseEnded:
    response_id: str
    status: ResponseStatus
    reason: str
    text: str
    text_tokens: int
    audio_frames: int
    audio_ms: int
    heard_text: str
    # the response's figures, taken when this event is written (everything the
    # response sent before it has been written by then): the service's metrics
    summary: Callable[[], ResponseMetrics] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ResponseSummary:
    """A traced response's figures (a `Metrics` event)."""

    response_id: str
    metrics: ResponseMetrics


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """A traced response decoded a batch of audio frames (a `Metrics` event)."""

    response_id: str
    frames: int
    decode_ms: float
    backlog_frames: int


@dataclass(frozen=True, slots=True)
class Error:
    """A request failed; the stream goes on."""

    code: str
    message: str
    field: str = ""


Event = (
    SessionStarted
    | GoAway
    | SpeechStarted
    | SpeechStopped
    | TurnCommitted
    | InputTranscription
    | ResponseStarted
    | TextDelta
    | AudioChunk
    | PlaybackInterrupted
    | ResponseTruncated
    | ResponseEnded
    | ResponseSummary
    | DecodeBatch
    | Error
)
#: an event built when the writer takes it (it reports what was written before it)
Later = Callable[[], Event]


class EventSink(Protocol):
    """Where a session's parts and its responses put their events, in order."""

    def put(self, event: Event | Later, stats: WriteStats | None = None) -> None:
        """Queue `event`; never blocks. `stats` collects what the writer observes
        of a response's media. Raises `SlowReader` when too much audio waits."""

    def purge(self, response_id: str) -> int:
        """Drop the queued text and audio of a response; return how many events."""

    @property
    def high_water(self) -> int:
        """The most events that waited for the writer at once."""

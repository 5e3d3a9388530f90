from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TurnDetectionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TURN_DETECTION_MODE_UNSPECIFIED: _ClassVar[TurnDetectionMode]
    TURN_DETECTION_MODE_SERVER_VAD: _ClassVar[TurnDetectionMode]
    TURN_DETECTION_MODE_MANUAL: _ClassVar[TurnDetectionMode]
    TURN_DETECTION_MODE_SEMANTIC: _ClassVar[TurnDetectionMode]

class CommitReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMIT_REASON_UNSPECIFIED: _ClassVar[CommitReason]
    COMMIT_REASON_SERVER_VAD: _ClassVar[CommitReason]
    COMMIT_REASON_CLIENT_COMMIT: _ClassVar[CommitReason]
    COMMIT_REASON_TEXT_INPUT: _ClassVar[CommitReason]
    COMMIT_REASON_END_OF_INPUT: _ClassVar[CommitReason]
    COMMIT_REASON_MAX_TURN_LENGTH: _ClassVar[CommitReason]

class ResponseStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESPONSE_STATUS_UNSPECIFIED: _ClassVar[ResponseStatus]
    RESPONSE_STATUS_COMPLETED: _ClassVar[ResponseStatus]
    RESPONSE_STATUS_CANCELLED: _ClassVar[ResponseStatus]
    RESPONSE_STATUS_INTERRUPTED: _ClassVar[ResponseStatus]
    RESPONSE_STATUS_FAILED: _ClassVar[ResponseStatus]
    RESPONSE_STATUS_MAX_TOKENS: _ClassVar[ResponseStatus]

class GenerateMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GENERATE_MODE_UNSPECIFIED: _ClassVar[GenerateMode]
    GENERATE_MODE_CHAT: _ClassVar[GenerateMode]
    GENERATE_MODE_TRANSCRIBE: _ClassVar[GenerateMode]
    GENERATE_MODE_SYNTHESIZE: _ClassVar[GenerateMode]
TURN_DETECTION_MODE_UNSPECIFIED: TurnDetectionMode
TURN_DETECTION_MODE_SERVER_VAD: TurnDetectionMode
TURN_DETECTION_MODE_MANUAL: TurnDetectionMode
TURN_DETECTION_MODE_SEMANTIC: TurnDetectionMode
COMMIT_REASON_UNSPECIFIED: CommitReason
COMMIT_REASON_SERVER_VAD: CommitReason
COMMIT_REASON_CLIENT_COMMIT: CommitReason
COMMIT_REASON_TEXT_INPUT: CommitReason
COMMIT_REASON_END_OF_INPUT: CommitReason
COMMIT_REASON_MAX_TURN_LENGTH: CommitReason
RESPONSE_STATUS_UNSPECIFIED: ResponseStatus
RESPONSE_STATUS_COMPLETED: ResponseStatus
RESPONSE_STATUS_CANCELLED: ResponseStatus
RESPONSE_STATUS_INTERRUPTED: ResponseStatus
RESPONSE_STATUS_FAILED: ResponseStatus
RESPONSE_STATUS_MAX_TOKENS: ResponseStatus
GENERATE_MODE_UNSPECIFIED: GenerateMode
GENERATE_MODE_CHAT: GenerateMode
GENERATE_MODE_TRANSCRIBE: GenerateMode
GENERATE_MODE_SYNTHESIZE: GenerateMode

class ConverseRequest(_message.Message):
    __slots__ = ("config", "audio", "text", "commit_turn", "cancel_response", "truncate", "update_config")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TURN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: SessionConfig
    audio: InputAudio
    text: InputText
    commit_turn: CommitTurn
    cancel_response: CancelResponse
    truncate: TruncateResponse
    update_config: UpdateConfig
    def __init__(self, config: _Optional[_Union[SessionConfig, _Mapping]] = ..., audio: _Optional[_Union[InputAudio, _Mapping]] = ..., text: _Optional[_Union[InputText, _Mapping]] = ..., commit_turn: _Optional[_Union[CommitTurn, _Mapping]] = ..., cancel_response: _Optional[_Union[CancelResponse, _Mapping]] = ..., truncate: _Optional[_Union[TruncateResponse, _Mapping]] = ..., update_config: _Optional[_Union[UpdateConfig, _Mapping]] = ...) -> None: ...

class SessionConfig(_message.Message):
    __slots__ = ("input_sample_rate_hz", "system_prompt", "sampling", "turn_detection", "output_audio", "trace", "client_label", "input_transcription")
    INPUT_SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TURN_DETECTION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_LABEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_TRANSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    input_sample_rate_hz: int
    system_prompt: str
    sampling: SamplingParams
    turn_detection: TurnDetection
    output_audio: OutputAudioConfig
    trace: bool
    client_label: str
    input_transcription: bool
    def __init__(self, input_sample_rate_hz: _Optional[int] = ..., system_prompt: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., turn_detection: _Optional[_Union[TurnDetection, _Mapping]] = ..., output_audio: _Optional[_Union[OutputAudioConfig, _Mapping]] = ..., trace: _Optional[bool] = ..., client_label: _Optional[str] = ..., input_transcription: _Optional[bool] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("text_temperature", "text_top_k", "audio_temperature", "audio_top_k", "max_new_tokens")
    TEXT_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TEXT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    AUDIO_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text_temperature: float
    text_top_k: int
    audio_temperature: float
    audio_top_k: int
    max_new_tokens: int
    def __init__(self, text_temperature: _Optional[float] = ..., text_top_k: _Optional[int] = ..., audio_temperature: _Optional[float] = ..., audio_top_k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class TurnDetection(_message.Message):
    __slots__ = ("mode", "threshold", "prefix_padding_ms", "silence_duration_ms", "interrupt_response", "min_interrupt_speech_ms", "speculative", "eagerness", "semantic_silence_ms", "max_silence_ms")
    MODE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PREFIX_PADDING_MS_FIELD_NUMBER: _ClassVar[int]
    SILENCE_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERRUPT_SPEECH_MS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    EAGERNESS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    mode: TurnDetectionMode
    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int
    interrupt_response: bool
    min_interrupt_speech_ms: int
    speculative: bool
    eagerness: float
    semantic_silence_ms: int
    max_silence_ms: int
    def __init__(self, mode: _Optional[_Union[TurnDetectionMode, str]] = ..., threshold: _Optional[float] = ..., prefix_padding_ms: _Optional[int] = ..., silence_duration_ms: _Optional[int] = ..., interrupt_response: _Optional[bool] = ..., min_interrupt_speech_ms: _Optional[int] = ..., speculative: _Optional[bool] = ..., eagerness: _Optional[float] = ..., semantic_silence_ms: _Optional[int] = ..., max_silence_ms: _Optional[int] = ...) -> None: ...

class OutputAudioConfig(_message.Message):
    __slots__ = ("chunk_ms", "first_chunk_frames", "max_stride_frames")
    CHUNK_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_STRIDE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    chunk_ms: int
    first_chunk_frames: int
    max_stride_frames: int
    def __init__(self, chunk_ms: _Optional[int] = ..., first_chunk_frames: _Optional[int] = ..., max_stride_frames: _Optional[int] = ...) -> None: ...

class InputAudio(_message.Message):
    __slots__ = ("pcm16",)
    PCM16_FIELD_NUMBER: _ClassVar[int]
    pcm16: bytes
    def __init__(self, pcm16: _Optional[bytes] = ...) -> None: ...

class InputText(_message.Message):
    __slots__ = ("text", "defer_response")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DEFER_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    text: str
    defer_response: bool
    def __init__(self, text: _Optional[str] = ..., defer_response: _Optional[bool] = ...) -> None: ...

class CommitTurn(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("response_id",)
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    def __init__(self, response_id: _Optional[str] = ...) -> None: ...

class TruncateResponse(_message.Message):
    __slots__ = ("response_id", "audio_played_ms")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PLAYED_MS_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    audio_played_ms: int
    def __init__(self, response_id: _Optional[str] = ..., audio_played_ms: _Optional[int] = ...) -> None: ...

class UpdateConfig(_message.Message):
    __slots__ = ("sampling", "turn_detection", "trace")
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TURN_DETECTION_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    sampling: SamplingParams
    turn_detection: TurnDetection
    trace: bool
    def __init__(self, sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., turn_detection: _Optional[_Union[TurnDetection, _Mapping]] = ..., trace: _Optional[bool] = ...) -> None: ...

class ConverseResponse(_message.Message):
    __slots__ = ("ts_ms", "seq", "session_started", "speech_started", "speech_stopped", "turn_committed", "response_started", "text_delta", "audio_chunk", "playback_interrupted", "response_ended", "metrics", "error", "go_away", "input_transcription", "response_truncated")
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SESSION_STARTED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STARTED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STOPPED_FIELD_NUMBER: _ClassVar[int]
    TURN_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_STARTED_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CHUNK_FIELD_NUMBER: _ClassVar[int]
    PLAYBACK_INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ENDED_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GO_AWAY_FIELD_NUMBER: _ClassVar[int]
    INPUT_TRANSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    ts_ms: int
    seq: int
    session_started: SessionStarted
    speech_started: SpeechStarted
    speech_stopped: SpeechStopped
    turn_committed: TurnCommitted
    response_started: ResponseStarted
    text_delta: TextDelta
    audio_chunk: AudioChunk
    playback_interrupted: PlaybackInterrupted
    response_ended: ResponseEnded
    metrics: Metrics
    error: Error
    go_away: GoAway
    input_transcription: InputTranscription
    response_truncated: ResponseTruncated
    def __init__(self, ts_ms: _Optional[int] = ..., seq: _Optional[int] = ..., session_started: _Optional[_Union[SessionStarted, _Mapping]] = ..., speech_started: _Optional[_Union[SpeechStarted, _Mapping]] = ..., speech_stopped: _Optional[_Union[SpeechStopped, _Mapping]] = ..., turn_committed: _Optional[_Union[TurnCommitted, _Mapping]] = ..., response_started: _Optional[_Union[ResponseStarted, _Mapping]] = ..., text_delta: _Optional[_Union[TextDelta, _Mapping]] = ..., audio_chunk: _Optional[_Union[AudioChunk, _Mapping]] = ..., playback_interrupted: _Optional[_Union[PlaybackInterrupted, _Mapping]] = ..., response_ended: _Optional[_Union[ResponseEnded, _Mapping]] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., go_away: _Optional[_Union[GoAway, _Mapping]] = ..., input_transcription: _Optional[_Union[InputTranscription, _Mapping]] = ..., response_truncated: _Optional[_Union[ResponseTruncated, _Mapping]] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("session_id", "config", "limits", "model", "output_sample_rate_hz")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: SessionConfig
    limits: SessionLimits
    model: str
    output_sample_rate_hz: int
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[SessionConfig, _Mapping]] = ..., limits: _Optional[_Union[SessionLimits, _Mapping]] = ..., model: _Optional[str] = ..., output_sample_rate_hz: _Optional[int] = ...) -> None: ...

class SessionLimits(_message.Message):
    __slots__ = ("max_session_seconds", "max_turn_ms", "max_message_bytes", "max_text_chars", "idle_timeout_seconds", "max_new_tokens")
    MAX_SESSION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TURN_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_session_seconds: int
    max_turn_ms: int
    max_message_bytes: int
    max_text_chars: int
    idle_timeout_seconds: int
    max_new_tokens: int
    def __init__(self, max_session_seconds: _Optional[int] = ..., max_turn_ms: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., idle_timeout_seconds: _Optional[int] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class SpeechStarted(_message.Message):
    __slots__ = ("audio_start_ms",)
    AUDIO_START_MS_FIELD_NUMBER: _ClassVar[int]
    audio_start_ms: int
    def __init__(self, audio_start_ms: _Optional[int] = ...) -> None: ...

class SpeechStopped(_message.Message):
    __slots__ = ("audio_end_ms",)
    AUDIO_END_MS_FIELD_NUMBER: _ClassVar[int]
    audio_end_ms: int
    def __init__(self, audio_end_ms: _Optional[int] = ...) -> None: ...

class TurnCommitted(_message.Message):
    __slots__ = ("turn_id", "audio_duration_ms", "text_chars", "reason")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    audio_duration_ms: int
    text_chars: int
    reason: CommitReason
    def __init__(self, turn_id: _Optional[str] = ..., audio_duration_ms: _Optional[int] = ..., text_chars: _Optional[int] = ..., reason: _Optional[_Union[CommitReason, str]] = ...) -> None: ...

class ResponseStarted(_message.Message):
    __slots__ = ("response_id", "turn_id")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    turn_id: str
    def __init__(self, response_id: _Optional[str] = ..., turn_id: _Optional[str] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("response_id", "text", "source_ts_ms", "ready_ts_ms")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TS_MS_FIELD_NUMBER: _ClassVar[int]
    READY_TS_MS_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    text: str
    source_ts_ms: float
    ready_ts_ms: float
    def __init__(self, response_id: _Optional[str] = ..., text: _Optional[str] = ..., source_ts_ms: _Optional[float] = ..., ready_ts_ms: _Optional[float] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("response_id", "pcm16", "sample_rate_hz", "duration_ms", "offset_ms", "source_ts_ms", "ready_ts_ms")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    PCM16_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TS_MS_FIELD_NUMBER: _ClassVar[int]
    READY_TS_MS_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    pcm16: bytes
    sample_rate_hz: int
    duration_ms: int
    offset_ms: int
    source_ts_ms: float
    ready_ts_ms: float
    def __init__(self, response_id: _Optional[str] = ..., pcm16: _Optional[bytes] = ..., sample_rate_hz: _Optional[int] = ..., duration_ms: _Optional[int] = ..., offset_ms: _Optional[int] = ..., source_ts_ms: _Optional[float] = ..., ready_ts_ms: _Optional[float] = ...) -> None: ...

class PlaybackInterrupted(_message.Message):
    __slots__ = ("response_id", "audio_start_ms")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_START_MS_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    audio_start_ms: int
    def __init__(self, response_id: _Optional[str] = ..., audio_start_ms: _Optional[int] = ...) -> None: ...

class ResponseEnded(_message.Message):
    __slots__ = ("response_id", "status", "reason", "text", "text_tokens", "audio_frames", "audio_ms", "heard_text")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FRAMES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    HEARD_TEXT_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    status: ResponseStatus
    reason: str
    text: str
    text_tokens: int
    audio_frames: int
    audio_ms: int
    heard_text: str
    def __init__(self, response_id: _Optional[str] = ..., status: _Optional[_Union[ResponseStatus, str]] = ..., reason: _Optional[str] = ..., text: _Optional[str] = ..., text_tokens: _Optional[int] = ..., audio_frames: _Optional[int] = ..., audio_ms: _Optional[int] = ..., heard_text: _Optional[str] = ...) -> None: ...

class InputTranscription(_message.Message):
    __slots__ = ("turn_id", "text")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    text: str
    def __init__(self, turn_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class ResponseTruncated(_message.Message):
    __slots__ = ("response_id", "audio_kept_ms", "heard_text")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_KEPT_MS_FIELD_NUMBER: _ClassVar[int]
    HEARD_TEXT_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    audio_kept_ms: int
    heard_text: str
    def __init__(self, response_id: _Optional[str] = ..., audio_kept_ms: _Optional[int] = ..., heard_text: _Optional[str] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("response_id", "response", "decode_batch")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    DECODE_BATCH_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    response: ResponseMetrics
    decode_batch: DecodeBatchMetrics
    def __init__(self, response_id: _Optional[str] = ..., response: _Optional[_Union[ResponseMetrics, _Mapping]] = ..., decode_batch: _Optional[_Union[DecodeBatchMetrics, _Mapping]] = ...) -> None: ...

class ResponseMetrics(_message.Message):
    __slots__ = ("speech_end_to_commit_ms", "prefill_ms", "commit_to_first_text_ms", "commit_to_first_audio_ms", "tokens_before_first_audio", "generation_ms", "generation_rtf", "decode_batches", "decode_ms_total", "decode_ms_max", "server_latency_p50_ms", "server_latency_max_ms", "queue_high_water", "text_coalesced", "audio_merged", "first_chunk_frames", "max_stride_frames", "step_to_write_p50_ms", "step_to_write_max_ms", "speculative", "speculative_starts", "speculative_discards", "end_of_turn_probability", "engine_wait_ms")
    SPEECH_END_TO_COMMIT_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TO_FIRST_TEXT_MS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TO_FIRST_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_BEFORE_FIRST_AUDIO_FIELD_NUMBER: _ClassVar[int]
    GENERATION_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_RTF_FIELD_NUMBER: _ClassVar[int]
    DECODE_BATCHES_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_MAX_FIELD_NUMBER: _ClassVar[int]
    SERVER_LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    SERVER_LATENCY_MAX_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_HIGH_WATER_FIELD_NUMBER: _ClassVar[int]
    TEXT_COALESCED_FIELD_NUMBER: _ClassVar[int]
    AUDIO_MERGED_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_STRIDE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    STEP_TO_WRITE_P50_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_TO_WRITE_MAX_MS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_STARTS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_DISCARDS_FIELD_NUMBER: _ClassVar[int]
    END_OF_TURN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    ENGINE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    speech_end_to_commit_ms: float
    prefill_ms: float
    commit_to_first_text_ms: float
    commit_to_first_audio_ms: float
    tokens_before_first_audio: int
    generation_ms: float
    generation_rtf: float
    decode_batches: int
    decode_ms_total: float
    decode_ms_max: float
    server_latency_p50_ms: float
    server_latency_max_ms: float
    queue_high_water: int
    text_coalesced: int
    audio_merged: int
    first_chunk_frames: int
    max_stride_frames: int
    step_to_write_p50_ms: float
    step_to_write_max_ms: float
    speculative: bool
    speculative_starts: int
    speculative_discards: int
    end_of_turn_probability: float
    engine_wait_ms: float
    def __init__(self, speech_end_to_commit_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., commit_to_first_text_ms: _Optional[float] = ..., commit_to_first_audio_ms: _Optional[float] = ..., tokens_before_first_audio: _Optional[int] = ..., generation_ms: _Optional[float] = ..., generation_rtf: _Optional[float] = ..., decode_batches: _Optional[int] = ..., decode_ms_total: _Optional[float] = ..., decode_ms_max: _Optional[float] = ..., server_latency_p50_ms: _Optional[float] = ..., server_latency_max_ms: _Optional[float] = ..., queue_high_water: _Optional[int] = ..., text_coalesced: _Optional[int] = ..., audio_merged: _Optional[int] = ..., first_chunk_frames: _Optional[int] = ..., max_stride_frames: _Optional[int] = ..., step_to_write_p50_ms: _Optional[float] = ..., step_to_write_max_ms: _Optional[float] = ..., speculative: _Optional[bool] = ..., speculative_starts: _Optional[int] = ..., speculative_discards: _Optional[int] = ..., end_of_turn_probability: _Optional[float] = ..., engine_wait_ms: _Optional[float] = ...) -> None: ...

class DecodeBatchMetrics(_message.Message):
    __slots__ = ("frames", "decode_ms", "backlog_frames")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: int
    decode_ms: float
    backlog_frames: int
    def __init__(self, frames: _Optional[int] = ..., decode_ms: _Optional[float] = ..., backlog_frames: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    field: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class GoAway(_message.Message):
    __slots__ = ("time_left_ms", "reason")
    TIME_LEFT_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    time_left_ms: int
    reason: str
    def __init__(self, time_left_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("text", "audio", "system_prompt", "sampling", "mode")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    text: str
    audio: bytes
    system_prompt: str
    sampling: SamplingParams
    mode: GenerateMode
    def __init__(self, text: _Optional[str] = ..., audio: _Optional[bytes] = ..., system_prompt: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., mode: _Optional[_Union[GenerateMode, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "wav", "content_type", "sample_rate_hz", "status", "audio_ms")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WAV_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    text: str
    wav: bytes
    content_type: str
    sample_rate_hz: int
    status: ResponseStatus
    audio_ms: int
    def __init__(self, text: _Optional[str] = ..., wav: _Optional[bytes] = ..., content_type: _Optional[str] = ..., sample_rate_hz: _Optional[int] = ..., status: _Optional[_Union[ResponseStatus, str]] = ..., audio_ms: _Optional[int] = ...) -> None: ...

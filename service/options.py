"""Session options: validation of the client's config and its effective values.

This is the one place that knows the allowed ranges of every configurable
field; error messages name the field (as a proto path) and the range, because
clients in any language read them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from service.backends.base import Sampling
from service.config import Settings
from service.errors import InvalidArgument
from service.turns import TurnMode, TurnSettings
from voicechat.v1 import voicechat_pb2 as pb

INPUT_SAMPLE_RATES = (16_000, 24_000, 48_000)


@dataclass(frozen=True)
class SessionOptions:
    """Everything a session needs from its SessionConfig, defaults filled in."""

    input_sample_rate_hz: int
    system_prompt: str
    sampling: Sampling
    turn: TurnSettings
    chunk_ms: int
    first_chunk_frames: int
    max_stride_frames: int
    trace: bool
    client_label: str = ""
    input_transcription: bool = False


def _number(value: float) -> str:
    """A number as the client sent it: integers whole, floats in their shortest exact form."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def _check_range(value: float, low: float, high: float, field: str) -> None:
    if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        raise InvalidArgument(
            f"{field} must be between {_number(low)} and {_number(high)}, got {_number(value)}", field
        )


def resolve_sampling(base: Sampling, msg: pb.SamplingParams, max_new_tokens: int, field: str) -> Sampling:
    """`base` with the fields set in `msg` applied, validated."""
    changes: dict[str, Any] = {}
    for name, low, high in (
        ("text_temperature", 0.0, 2.0),
        ("text_top_k", 0, 1000),
        ("audio_temperature", 0.0, 2.0),
        ("audio_top_k", 0, 2048),
        ("max_new_tokens", 1, max_new_tokens),
    ):
        if msg.HasField(name):
            value = getattr(msg, name)
            _check_range(value, low, high, f"{field}.{name}")
            changes[name] = value
    return dataclasses.replace(base, **changes)


_TURN_MODES = {
    pb.TURN_DETECTION_MODE_SERVER_VAD: TurnMode.SERVER_VAD,
    pb.TURN_DETECTION_MODE_MANUAL: TurnMode.MANUAL,
    pb.TURN_DETECTION_MODE_SEMANTIC: TurnMode.SEMANTIC,
}
_TURN_MODES_OUT = {mode: value for value, mode in _TURN_MODES.items()}


def resolve_turn(base: TurnSettings, msg: pb.TurnDetection, field: str) -> TurnSettings:
    changes: dict[str, Any] = {}
    if msg.mode in _TURN_MODES:
        changes["mode"] = _TURN_MODES[msg.mode]
    elif msg.mode != pb.TURN_DETECTION_MODE_UNSPECIFIED:
        raise InvalidArgument(f"{field}.mode {msg.mode} is not a TurnDetectionMode", f"{field}.mode")
    for name, low, high in (
        ("threshold", 0.05, 0.95),
        ("prefix_padding_ms", 0, 2000),
        ("silence_duration_ms", 100, 5000),
        ("min_interrupt_speech_ms", 0, 2000),
        ("eagerness", 0.05, 0.95),
        ("semantic_silence_ms", 100, 2000),
        ("max_silence_ms", 200, 10_000),
    ):
        if msg.HasField(name):
            value = getattr(msg, name)
            _check_range(value, low, high, f"{field}.{name}")
            changes[name] = value
    for flag in ("interrupt_response", "speculative"):
        if msg.HasField(flag):
            changes[flag] = getattr(msg, flag)
    turn = dataclasses.replace(base, **changes)
    if turn.max_silence_ms < turn.semantic_silence_ms:
        raise InvalidArgument(
            f"{field}.max_silence_ms ({turn.max_silence_ms}) must be at least semantic_silence_ms "
            f"({turn.semantic_silence_ms})",
            f"{field}.max_silence_ms",
        )
    return turn


def check_system_prompt(prompt: str, settings: Settings, field: str) -> None:
    if len(prompt) > settings.max_text_chars:
        raise InvalidArgument(f"{field} is longer than {settings.max_text_chars} characters ({len(prompt)})", field)


def resolve_options(
    msg: pb.SessionConfig, settings: Settings, default_sampling: Sampling, default_prompt: str, trace: bool
) -> SessionOptions:
    """Validate a SessionConfig and fill in the defaults."""
    rate = msg.input_sample_rate_hz or 16_000
    if rate not in INPUT_SAMPLE_RATES:
        raise InvalidArgument(
            f"config.input_sample_rate_hz must be one of {', '.join(map(str, INPUT_SAMPLE_RATES))}, got {rate}",
            "config.input_sample_rate_hz",
        )
    check_system_prompt(msg.system_prompt, settings, "config.system_prompt")
    if len(msg.client_label) > 64:
        raise InvalidArgument("config.client_label is longer than 64 characters", "config.client_label")
    out = msg.output_audio
    chunk_ms = out.chunk_ms or settings.chunk_ms
    first = out.first_chunk_frames or settings.first_chunk_frames
    stride = out.max_stride_frames or settings.max_stride_frames
    _check_range(chunk_ms, 20, 100, "config.output_audio.chunk_ms")
    _check_range(first, 1, 16, "config.output_audio.first_chunk_frames")
    _check_range(stride, 1, 64, "config.output_audio.max_stride_frames")
    base_sampling = dataclasses.replace(default_sampling, max_new_tokens=settings.default_max_new_tokens)
    return SessionOptions(
        input_sample_rate_hz=rate,
        system_prompt=msg.system_prompt or default_prompt,
        sampling=resolve_sampling(base_sampling, msg.sampling, settings.max_new_tokens, "config.sampling"),
        turn=resolve_turn(
            TurnSettings(max_turn_ms=settings.max_turn_ms, speculative=settings.speculative),
            msg.turn_detection,
            "config.turn_detection",
        ),
        chunk_ms=chunk_ms,
        first_chunk_frames=min(first, stride),
        max_stride_frames=stride,
        trace=msg.trace or trace or settings.trace_all,
        client_label=msg.client_label,
        input_transcription=msg.input_transcription,
    )


def apply_update(options: SessionOptions, msg: pb.UpdateConfig, settings: Settings) -> SessionOptions:
    """Options after an UpdateConfig (only set fields change)."""
    return dataclasses.replace(
        options,
        sampling=resolve_sampling(options.sampling, msg.sampling, settings.max_new_tokens, "update_config.sampling"),
        turn=resolve_turn(options.turn, msg.turn_detection, "update_config.turn_detection"),
        trace=msg.trace if msg.HasField("trace") else options.trace,
    )


def options_to_proto(options: SessionOptions) -> pb.SessionConfig:
    s, t = options.sampling, options.turn
    mode = _TURN_MODES_OUT[t.mode]
    return pb.SessionConfig(
        input_sample_rate_hz=options.input_sample_rate_hz,
        system_prompt=options.system_prompt,
        sampling=pb.SamplingParams(
            text_temperature=s.text_temperature,
            text_top_k=s.text_top_k,
            audio_temperature=s.audio_temperature,
            audio_top_k=s.audio_top_k,
            max_new_tokens=s.max_new_tokens,
        ),
        turn_detection=pb.TurnDetection(
            mode=mode,
            threshold=t.threshold,
            prefix_padding_ms=t.prefix_padding_ms,
            silence_duration_ms=t.silence_duration_ms,
            interrupt_response=t.interrupt_response,
            min_interrupt_speech_ms=t.min_interrupt_speech_ms,
            speculative=t.speculative,
            eagerness=t.eagerness,
            semantic_silence_ms=t.semantic_silence_ms,
            max_silence_ms=t.max_silence_ms,
        ),
        output_audio=pb.OutputAudioConfig(
            chunk_ms=options.chunk_ms,
            first_chunk_frames=options.first_chunk_frames,
            max_stride_frames=options.max_stride_frames,
        ),
        trace=options.trace,
        client_label=options.client_label,
        input_transcription=options.input_transcription,
    )


def limits_to_proto(settings: Settings) -> pb.SessionLimits:
    return pb.SessionLimits(
        max_session_seconds=settings.max_session_seconds,
        max_turn_ms=settings.max_turn_ms,
        max_message_bytes=settings.max_message_bytes,
        max_text_chars=settings.max_text_chars,
        idle_timeout_seconds=settings.idle_timeout_seconds,
        max_new_tokens=settings.max_new_tokens,
    )

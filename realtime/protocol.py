"""OpenAI Realtime (GA) events <-> voicechat.v1: the pure half of the bridge.

Everything here is a function of its arguments: the session object a client
sees (`SessionState`), how a `session.update` maps onto a `SessionConfig` /
`UpdateConfig`, and the JSON event each Converse event becomes. `session.py`
holds the I/O. docs/realtime.md lists every event and what happens to it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from voicechat.v1 import voicechat_pb2 as pb

RATE_HZ = 24_000  # the only audio format: PCM16 mono 24 kHz, both ways (as OpenAI's audio/pcm)
PCM_FORMAT = {"type": "audio/pcm", "rate": RATE_HZ}
# semantic_vad eagerness -> the contract's eagerness (turn committed at P(finished) >= 1 - eagerness)
EAGERNESS = {"low": 0.2, "medium": 0.5, "auto": 0.5, "high": 0.8}
EAGERNESS_OUT = {0.2: "low", 0.5: "auto", 0.8: "high"}
VOICE = "lfm2"  # the model has one voice; any requested voice is accepted and this one is used


class ClientError(Exception):
    """A client event the bridge refuses: sent back as an `error` event; the session goes on."""

    def __init__(self, message: str, param: str = "", code: str = "invalid_value",
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind


def error_event(message: str, *, kind: str = "invalid_request_error", code: str = "", param: str = "",
                event_id: str = "") -> dict[str, Any]:  # fmt: skip
    """An `error` server event (its `event_id` is the client event's, when there is one)."""
    return {
        "type": "error",
        "error": {"type": kind, "code": code or None, "message": message, "param": param or None,
                  "event_id": event_id or None},
    }  # fmt: skip


# -- session ------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionState:
    """What a client may configure, as the bridge holds it between Converse streams."""

    instructions: str = ""
    transcription: bool = False
    turn: dict[str, Any] | None = dataclasses.field(default_factory=lambda: {"type": "server_vad"})
    max_output_tokens: int | None = None  # None: the server's default
    text_only: bool = False  # output_modalities ["text"]: audio is not forwarded

    def config(self) -> pb.SessionConfig:
        """The SessionConfig that opens a Converse stream for this state."""
        sampling = pb.SamplingParams()
        if self.max_output_tokens is not None:
            sampling.max_new_tokens = self.max_output_tokens
        return pb.SessionConfig(
            input_sample_rate_hz=RATE_HZ,
            system_prompt=self.instructions,
            sampling=sampling,
            turn_detection=turn_detection(self.turn),
            input_transcription=self.transcription,
            client_label="realtime",
        )


def turn_detection(turn: dict[str, Any] | None) -> pb.TurnDetection:
    """An OpenAI turn_detection object (already checked) as the contract's TurnDetection."""
    if turn is None:
        return pb.TurnDetection(mode=pb.TURN_DETECTION_MODE_MANUAL)
    out = pb.TurnDetection()
    if turn["type"] == "semantic_vad":
        out.mode = pb.TURN_DETECTION_MODE_SEMANTIC
        out.eagerness = EAGERNESS[turn.get("eagerness") or "auto"]
    else:
        out.mode = pb.TURN_DETECTION_MODE_SERVER_VAD
        for name in ("threshold", "prefix_padding_ms", "silence_duration_ms"):
            if turn.get(name) is not None:
                setattr(out, name, turn[name])
    if turn.get("interrupt_response") is not None:
        out.interrupt_response = turn["interrupt_response"]
    return out


_SESSION_FIELDS = frozenset({
    "type", "model", "instructions", "audio", "output_modalities", "max_output_tokens", "tools", "tool_choice",
    "tracing", "truncation", "include", "prompt", "parallel_tool_calls", "object", "id", "expires_at",
})  # fmt: skip
_TURN_FIELDS = {
    "server_vad": {"type", "threshold", "prefix_padding_ms", "silence_duration_ms", "interrupt_response",
                   "create_response", "idle_timeout_ms"},
    "semantic_vad": {"type", "eagerness", "interrupt_response", "create_response"},
}  # fmt: skip


def _obj(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ClientError(f"{param} must be an object", param)
    return value


def _unknown(obj: dict[str, Any], allowed: set[str] | frozenset[str], param: str) -> None:
    for key in obj:
        if key not in allowed:
            raise ClientError(f"{param}.{key} is not supported by this server", f"{param}.{key}", "unsupported")


def _check_format(fmt: Any, param: str) -> None:
    if fmt is None:
        return
    if fmt == "pcm16":  # the beta name
        return
    fmt = _obj(fmt, param)
    if fmt.get("type") != "audio/pcm" or fmt.get("rate", RATE_HZ) != RATE_HZ:
        raise ClientError(f"{param}: only audio/pcm at 24000 Hz is supported, got {fmt}", param, "unsupported")


def _check_turn(turn: Any, param: str) -> dict[str, Any] | None:
    if turn is None or turn is False:  # Pipecat sends false for "no turn detection"
        return None
    turn = _obj(turn, param)
    kind = turn.get("type")
    if kind not in _TURN_FIELDS:
        raise ClientError(f"{param}.type must be server_vad, semantic_vad or null, got {kind!r}", f"{param}.type")
    _unknown(turn, _TURN_FIELDS[kind], param)
    if turn.get("create_response") is False:
        raise ClientError("create_response=false is not supported: a committed turn is always answered",
                          f"{param}.create_response", "unsupported")  # fmt: skip
    if turn.get("idle_timeout_ms") is not None:
        raise ClientError("idle_timeout_ms is not supported", f"{param}.idle_timeout_ms", "unsupported")
    if kind == "semantic_vad" and turn.get("eagerness") not in (None, *EAGERNESS):
        raise ClientError(f"{param}.eagerness must be low, medium, high or auto", f"{param}.eagerness")
    # the contract's ranges (service/options.py), checked here so that session.updated never echoes a value
    # the server will refuse
    for name, kinds, low, high in (
        ("threshold", (int, float), 0.05, 0.95),
        ("prefix_padding_ms", (int,), 0, 2000),
        ("silence_duration_ms", (int,), 100, 5000),
    ):
        value = turn.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            raise ClientError(f"{param}.{name} must be a number from {low} to {high}, got {value!r}",
                              f"{param}.{name}")  # fmt: skip
    if turn.get("interrupt_response") not in (None, True, False):
        raise ClientError(f"{param}.interrupt_response must be a boolean", f"{param}.interrupt_response")
    return {k: v for k, v in turn.items() if k in ("type", "threshold", "prefix_padding_ms", "silence_duration_ms",
                                                   "interrupt_response", "eagerness")}  # fmt: skip


def apply_session(state: SessionState, session: Any, param: str = "session") -> SessionState:
    """`state` with a client's session object applied, or ClientError naming the first field refused.

    Nothing is applied unless everything is accepted, as OpenAI does."""
    session = _obj(session, param)
    _unknown(session, _SESSION_FIELDS, param)
    if session.get("type", "realtime") != "realtime":
        raise ClientError(f"{param}.type must be realtime (transcription sessions are not served)", f"{param}.type")
    changes: dict[str, Any] = {}
    if "instructions" in session:
        if not isinstance(session["instructions"], str):
            raise ClientError(f"{param}.instructions must be a string", f"{param}.instructions")
        changes["instructions"] = session["instructions"]
    tools = session.get("tools")
    if tools:
        raise ClientError("tools are not supported (the model has no tool calling)", f"{param}.tools", "unsupported")
    if session.get("tool_choice") not in (None, "auto", "none"):
        raise ClientError("tool_choice is not supported", f"{param}.tool_choice", "unsupported")
    for name in ("prompt", "include"):
        if session.get(name):
            raise ClientError(f"{param}.{name} is not supported", f"{param}.{name}", "unsupported")
    if session.get("truncation") not in (None, "auto", "disabled"):
        raise ClientError(f"{param}.truncation is not supported", f"{param}.truncation", "unsupported")
    if "output_modalities" in session:
        modalities = session["output_modalities"]
        if modalities not in (["audio"], ["text"], ["audio", "text"], ["text", "audio"]):
            raise ClientError(f"{param}.output_modalities must be [\"audio\"] or [\"text\"]",
                              f"{param}.output_modalities")  # fmt: skip
        changes["text_only"] = modalities == ["text"]
    if "max_output_tokens" in session:
        tokens = session["max_output_tokens"]
        if tokens in (None, "inf"):
            changes["max_output_tokens"] = None
        elif isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1:
            changes["max_output_tokens"] = tokens
        else:
            raise ClientError(f"{param}.max_output_tokens must be a positive integer or \"inf\"",
                              f"{param}.max_output_tokens")  # fmt: skip
    if "audio" in session:
        audio = _obj(session["audio"], f"{param}.audio")
        _unknown(audio, {"input", "output"}, f"{param}.audio")
        if "output" in audio:
            out = _obj(audio["output"], f"{param}.audio.output")
            _unknown(out, {"format", "voice", "speed"}, f"{param}.audio.output")
            _check_format(out.get("format"), f"{param}.audio.output.format")
            if out.get("speed") not in (None, 1, 1.0):
                raise ClientError("only speed 1.0 is supported", f"{param}.audio.output.speed", "unsupported")
        if "input" in audio:
            inp = _obj(audio["input"], f"{param}.audio.input")
            where = f"{param}.audio.input"
            _unknown(inp, {"format", "transcription", "turn_detection", "noise_reduction"}, where)
            _check_format(inp.get("format"), f"{where}.format")
            if inp.get("noise_reduction") is not None:  # accepted, no effect: the model hears the audio as sent
                _obj(inp["noise_reduction"], f"{where}.noise_reduction")
            if "transcription" in inp:
                transcription = inp["transcription"]
                if transcription is not None:
                    _obj(transcription, f"{where}.transcription")  # model, language, prompt: the model's own ASR
                changes["transcription"] = transcription is not None
            if "turn_detection" in inp:
                changes["turn"] = _check_turn(inp["turn_detection"], f"{where}.turn_detection")
    return dataclasses.replace(state, **changes)


def session_object(state: SessionState, started: pb.SessionStarted, expires_at: int) -> dict[str, Any]:
    """The session as `session.created` / `session.updated` carry it: the effective values."""
    cfg = started.config
    td = cfg.turn_detection
    turn: dict[str, Any] | None
    if td.mode == pb.TURN_DETECTION_MODE_MANUAL:
        turn = None
    elif td.mode == pb.TURN_DETECTION_MODE_SEMANTIC:
        eagerness = EAGERNESS_OUT.get(round(td.eagerness, 2), "auto")
        turn = {"type": "semantic_vad", "eagerness": eagerness, "create_response": True,
                "interrupt_response": td.interrupt_response}  # fmt: skip
    else:
        turn = {"type": "server_vad", "threshold": round(td.threshold, 3), "prefix_padding_ms": td.prefix_padding_ms,
                "silence_duration_ms": td.silence_duration_ms, "create_response": True,
                "interrupt_response": td.interrupt_response, "idle_timeout_ms": None}  # fmt: skip
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": started.session_id,
        "model": started.model,
        "output_modalities": ["text"] if state.text_only else ["audio"],
        "instructions": cfg.system_prompt,
        "audio": {
            "input": {
                "format": dict(PCM_FORMAT),
                "transcription": {"model": started.model} if cfg.input_transcription else None,
                "noise_reduction": None,
                "turn_detection": turn,
            },
            "output": {"format": dict(PCM_FORMAT), "voice": VOICE, "speed": 1.0},
        },
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": cfg.sampling.max_new_tokens,
        "tracing": None,
        "truncation": "disabled",
        "prompt": None,
        "include": None,
        "expires_at": expires_at,
    }


# -- client input -------------------------------------------------------------------


def response_params(params: dict[str, Any], state: SessionState) -> str:
    """Check a `response.create`'s response object; returns its instructions ("" when none).

    Fields set to null count as absent (LiveKit sends `instructions: null`)."""
    instructions = ""
    for key, value in params.items():
        if value is None or key == "metadata":
            continue
        if key == "conversation" and value == "auto":
            continue
        if key == "output_modalities" and isinstance(value, list) and (value == ["text"]) == state.text_only:
            continue
        if key == "tool_choice" and value in ("auto", "none"):
            continue
        if key == "tools" and value == []:
            continue
        if key == "instructions" and isinstance(value, str):
            instructions = value
            continue
        raise ClientError(f"response.{key} is not supported here: set it with session.update",
                          f"response.{key}", "unsupported")  # fmt: skip
    return instructions


def decode_audio(value: Any, param: str = "audio") -> bytes:
    """Base64 PCM16 from an append event; ClientError when it is not."""
    if not isinstance(value, str):
        raise ClientError(f"{param} must be a base64 string", param)
    try:
        pcm = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ClientError(f"{param} is not valid base64: {exc}", param) from exc
    if len(pcm) % 2:
        raise ClientError(f"{param} holds {len(pcm)} bytes: PCM16 needs an even number", param)
    return pcm


def user_text(item: Any) -> str:
    """The text of a `conversation.item.create` user message; ClientError for anything else."""
    item = _obj(item, "item")
    if item.get("type", "message") != "message":
        raise ClientError(f"item.type {item.get('type')!r} is not supported: only user messages",
                          "item.type", "unsupported")  # fmt: skip
    if item.get("role") != "user":
        raise ClientError(f"item.role {item.get('role')!r} is not supported: only user messages",
                          "item.role", "unsupported")  # fmt: skip
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise ClientError("item.content must be a non-empty list", "item.content")
    parts: list[str] = []
    for i, part in enumerate(content):
        part = _obj(part, f"item.content[{i}]")
        if part.get("type") != "input_text" or not isinstance(part.get("text"), str):
            raise ClientError(f"item.content[{i}].type {part.get('type')!r} is not supported: only input_text",
                              f"item.content[{i}].type", "unsupported")  # fmt: skip
        parts.append(part["text"])
    return "\n".join(parts)


# -- server events ------------------------------------------------------------------

_STATUS = {
    pb.RESPONSE_STATUS_COMPLETED: ("completed", None),
    pb.RESPONSE_STATUS_CANCELLED: ("cancelled", "client_cancelled"),
    pb.RESPONSE_STATUS_INTERRUPTED: ("cancelled", "turn_detected"),
    pb.RESPONSE_STATUS_MAX_TOKENS: ("incomplete", "max_output_tokens"),
    pb.RESPONSE_STATUS_FAILED: ("failed", None),
}


def assistant_item(item_id: str, text: str, status: str, text_only: bool) -> dict[str, Any]:
    part = {"type": "output_text", "text": text} if text_only else {"type": "output_audio", "transcript": text}
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
            "content": [part]}  # fmt: skip


def user_item(item_id: str, *, text: str | None = None, transcript: str | None = None) -> dict[str, Any]:
    part = {"type": "input_text", "text": text} if text is not None else {"type": "input_audio",
                                                                           "transcript": transcript}  # fmt: skip
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [part]}  # fmt: skip


def response_object(response_id: str, status: str, *, output: list[dict[str, Any]], text_only: bool,
                    max_tokens: int, metadata: Any = None) -> dict[str, Any]:  # fmt: skip
    return {
        "object": "realtime.response",
        "id": response_id,
        "status": status,
        "status_details": None,
        "output": output,
        "conversation_id": None,
        "output_modalities": ["text"] if text_only else ["audio"],
        "max_output_tokens": max_tokens,
        "audio": {"output": {"format": dict(PCM_FORMAT), "voice": VOICE}},
        "usage": None,
        "metadata": metadata,
    }


def response_done(ended: pb.ResponseEnded, response: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """`response.done` for a ResponseEnded: status, its details and usage."""
    status, reason = _STATUS.get(ended.status, ("failed", None))
    details: dict[str, Any] | None = None
    if status == "failed":
        details = {"type": "failed", "error": {"type": "server_error", "code": "response_failed",
                                               "message": ended.reason}}  # fmt: skip
    elif reason is not None:
        details = {"type": status, "reason": reason}
    output_tokens = ended.text_tokens + ended.audio_frames
    usage = {
        "total_tokens": output_tokens,
        "input_tokens": 0,  # the contract does not report input tokens
        "output_tokens": output_tokens,
        "input_token_details": {"text_tokens": 0, "audio_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": ended.text_tokens, "audio_tokens": ended.audio_frames},
    }
    return {
        "type": "response.done",
        "response": {**response, "status": status, "status_details": details, "usage": usage, "output": [item]},
    }


def now_s() -> int:
    return int(time.time())

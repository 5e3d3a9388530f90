"""The session's one mapping to the contract: every domain event has its
message, field for field, and no other part of the session or the pipeline
imports the proto."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from service import events
from service.session import wire
from voicechat.v1 import voicechat_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_wire_module_imports_the_proto() -> None:
    parts = sorted((ROOT / "service" / "session").glob("*.py")) + sorted((ROOT / "service" / "pipeline").glob("*.py"))
    speaking = [p.relative_to(ROOT).as_posix() for p in parts if "voicechat_pb2" in p.read_text()]
    assert speaking == ["service/session/wire.py"]


def test_response_metrics_are_the_contracts_field_for_field() -> None:
    ours = {f.name for f in dataclasses.fields(events.ResponseMetrics)}
    assert ours == set(pb.ResponseMetrics.DESCRIPTOR.fields_by_name)


@pytest.mark.parametrize("status", list(events.ResponseStatus))
def test_every_response_status_has_its_enum_value(status: events.ResponseStatus) -> None:
    assert pb.ResponseStatus.Name(wire.status_to_proto(status)) == f"RESPONSE_STATUS_{status.name}"


def test_every_commit_reason_has_its_enum_value() -> None:
    for reason in events.CommitReason:
        assert pb.CommitReason.Name(wire.reason_to_proto(reason)) == f"COMMIT_REASON_{reason.name}"


def test_every_event_maps_to_its_own_message() -> None:
    samples: list[events.Event] = [
        events.GoAway(1000, "draining"),
        events.SpeechStarted(20),
        events.SpeechStopped(900),
        events.TurnCommitted("turn_1", 880, 0, events.CommitReason.SERVER_VAD),
        events.InputTranscription("turn_1", "hello"),
        events.ResponseStarted("resp_1", "turn_1"),
        events.TextDelta("resp_1", "Hi", source_ts_ms=1.0, ready_ts_ms=2.0),
        events.AudioChunk("resp_1", b"\0\0" * 960, 24_000, 40, 80),
        events.PlaybackInterrupted("resp_1", 1200),
        events.ResponseTruncated("resp_1", 320, "Hi"),
        events.ResponseEnded("resp_1", events.ResponseStatus.INTERRUPTED, "", "Hi", 2, 8, 320, "Hi"),
        events.ResponseSummary("resp_1", events.ResponseMetrics(decode_batches=3, speculative=True)),
        events.DecodeBatch("resp_1", frames=2, decode_ms=1.5, backlog_frames=2),
        events.Error("INVALID_ARGUMENT", "bad", "text.text"),
    ]
    mapped = typing.get_args(events.Event)
    assert {type(e) for e in samples} | {events.SessionStarted} == set(mapped)
    kinds = {
        "GoAway": "go_away",
        "ResponseSummary": "metrics",
        "DecodeBatch": "metrics",
    }
    for event in samples:
        message = wire.to_proto(event)
        name = type(event).__name__
        kind = kinds.get(name) or "_".join(w.lower() for w in _words(name))
        assert message.WhichOneof("event") == kind, name
    ended = wire.to_proto(samples[10]).response_ended
    assert (ended.status, ended.audio_ms, ended.heard_text) == (pb.RESPONSE_STATUS_INTERRUPTED, 320, "Hi")
    summary = wire.to_proto(samples[11]).metrics.response
    assert (summary.decode_batches, summary.speculative) == (3, True)


def _words(name: str) -> list[str]:
    words: list[str] = []
    for ch in name:
        if ch.isupper():
            words.append(ch)
        else:
            words[-1] += ch
    return words

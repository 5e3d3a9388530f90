"""Bad input gets a clear status or a recoverable in-stream error, as the
contract documents, and the session survives what is recoverable."""

from __future__ import annotations

import math

import grpc
import pytest

from tests.conftest import Running
from tests.helpers import (
    audio,
    collect_until,
    commit,
    config,
    kinds,
    manual_config,
    requests,
    response_text,
    text,
    tone,
)
from voicechat.v1 import voicechat_pb2 as pb


async def _status_of(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value


async def test_first_message_must_be_config(running: Running) -> None:
    error = await _status_of(running.stub.Converse(requests([text("hi")], hold=5)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "first ConverseRequest must be `config`" in error.details()


async def test_second_config_ends_the_stream(running: Running) -> None:
    error = await _status_of(running.stub.Converse(requests([config(), config()], hold=5)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "update_config" in error.details()


@pytest.mark.parametrize(
    ("session_config", "field"),
    [
        (pb.SessionConfig(input_sample_rate_hz=44_100), "config.input_sample_rate_hz"),
        (pb.SessionConfig(sampling=pb.SamplingParams(audio_temperature=50.0)), "config.sampling.audio_temperature"),
        (pb.SessionConfig(sampling=pb.SamplingParams(text_temperature=math.nan)), "config.sampling.text_temperature"),
        (pb.SessionConfig(sampling=pb.SamplingParams(audio_top_k=100_000)), "config.sampling.audio_top_k"),
        (pb.SessionConfig(sampling=pb.SamplingParams(max_new_tokens=0)), "config.sampling.max_new_tokens"),
        (pb.SessionConfig(sampling=pb.SamplingParams(max_new_tokens=10**6)), "config.sampling.max_new_tokens"),
        (pb.SessionConfig(output_audio=pb.OutputAudioConfig(chunk_ms=5)), "config.output_audio.chunk_ms"),
        (pb.SessionConfig(turn_detection=pb.TurnDetection(silence_duration_ms=10)), "config.turn_detection.silence_duration_ms"),
    ],
)
async def test_invalid_config_is_invalid_argument_naming_the_field(
    running: Running, session_config: pb.SessionConfig, field: str
) -> None:
    call = running.stub.Converse(requests([pb.ConverseRequest(config=session_config)], hold=5))
    error = await _status_of(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details() and ("between" in error.details() or "one of" in error.details())


async def test_recoverable_errors_keep_the_session_alive(running: Running) -> None:
    bad_update = pb.ConverseRequest(update_config=pb.UpdateConfig(sampling=pb.SamplingParams(audio_top_k=99_999)))
    items = [
        manual_config(),
        audio(b"\x00\x01\x02"),  # odd byte count
        pb.ConverseRequest(),  # nothing set
        commit(),  # nothing to commit
        text("x" * 5000),  # over max_text_chars
        bad_update,
        pb.ConverseRequest(truncate=pb.TruncateResponse(response_id="resp_9", audio_played_ms=10)),
        text("still here"),
    ]
    call = running.stub.Converse(requests(items))
    events = await collect_until(call)
    call.cancel()
    errors = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert [(e.code, e.field) for e in errors] == [
        ("INVALID_ARGUMENT", "audio.pcm16"),
        ("INVALID_ARGUMENT", "kind"),
        ("FAILED_PRECONDITION", "commit_turn"),
        ("INVALID_ARGUMENT", "text.text"),
        ("INVALID_ARGUMENT", "update_config.sampling.audio_top_k"),
        ("FAILED_PRECONDITION", "truncate.response_id"),
    ]
    assert "even number of bytes" in errors[0].message
    assert response_text(events) == "Turn 1. You said: still here."


async def test_update_config_changes_the_next_response(running: Running) -> None:
    update = pb.ConverseRequest(update_config=pb.UpdateConfig(sampling=pb.SamplingParams(max_new_tokens=4)))
    call = running.stub.Converse(requests([config(), update, text("long enough to be cut")]))
    events = await collect_until(call)
    call.cancel()
    ended = next(e.response_ended for e in events if e.WhichOneof("event") == "response_ended")
    assert ended.status == pb.RESPONSE_STATUS_MAX_TOKENS
    assert ended.text_tokens == 4 and "max_new_tokens=4" in ended.reason


async def test_generate_rejects_bad_requests(running: Running) -> None:
    cases = [
        (pb.GenerateRequest(), "set text, audio, or both"),
        (pb.GenerateRequest(audio=b"not audio at all"), "not a readable audio file (WAV, FLAC or MP3)"),
        (pb.GenerateRequest(text="hi", mode=pb.GENERATE_MODE_TRANSCRIBE), "needs audio"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(audio_temperature=-1.0)), "sampling.audio_temperature"),
    ]
    for request, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Generate(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()


async def test_audio_rates_16_24_48k_are_accepted(running: Running) -> None:
    for rate in (16_000, 24_000, 48_000):
        items = [manual_config(input_sample_rate_hz=rate), audio(tone(1.0, rate=rate)), commit()]
        call = running.stub.Converse(requests(items))
        events = await collect_until(call)
        call.cancel()
        assert "response_ended" in kinds(events)
        committed = next(e.turn_committed for e in events if e.WhichOneof("event") == "turn_committed")
        assert abs(committed.audio_duration_ms - 1000) <= 20, rate


async def test_deferred_text_is_bounded(start_server) -> None:
    running = await start_server(max_text_chars=100)
    items = [config()] + [text("x" * 40, defer=True) for _ in range(4)] + [commit()]
    call = running.stub.Converse(requests(items))
    events = await collect_until(call)
    call.cancel()
    errors = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert len(errors) == 2 and all("exceed 100 characters" in e.message for e in errors)
    assert response_text(events).count("x") == 80

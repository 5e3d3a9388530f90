"""The contract as a client without proto files sees it: health, reflection,
and a complete text turn and audio turn over Converse."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

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

SERVICE = "voicechat.v1.VoiceChatService"


async def test_health_is_serving_after_warmup(running: Running) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    for name in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert running.server.backend.warmed_up  # type: ignore[union-attr]


async def _reflect(channel: grpc.aio.Channel, method: str, request: reflection_pb2.ServerReflectionRequest):
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )

    async def one():
        yield request

    return [r async for r in call(one())][0]


async def test_reflection_v1_and_v1alpha_describe_converse_as_bidi(running: Running) -> None:
    for version in ("v1", "v1alpha"):
        method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
        listed = await _reflect(running.channel, method, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health", f"grpc.reflection.{version}.ServerReflection"} <= names
        found = await _reflect(
            running.channel, method, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)
        )
        files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in found.file_descriptor_response.file_descriptor_proto]
        service = next(s for f in files for s in f.service if s.name == "VoiceChatService")
        methods = {m.name: m for m in service.method}
        assert methods["Converse"].client_streaming and methods["Converse"].server_streaming
        assert not methods["Generate"].client_streaming and not methods["Generate"].server_streaming
    # the generated v1alpha stub talks to the same servicer: it lists the
    # service, and each method's request and response types resolve to the
    # file that declares them
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    first = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    listed, found = [reply async for reply in stub.ServerReflectionInfo(iter(first))]
    assert SERVICE in {s.name for s in listed.list_services_response.service}
    service = next(s for f in _files(found) for s in f.service if s.name == "VoiceChatService")
    types = sorted({t.lstrip(".") for m in service.method for t in (m.input_type, m.output_type)})
    assert {m.name for m in service.method} == {"Converse", "Generate"} and len(types) == 4
    asked = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=t) for t in types]
    for name, reply in zip(types, [r async for r in stub.ServerReflectionInfo(iter(asked))], strict=True):
        assert not reply.HasField("error_response"), (name, reply.error_response.error_message)
        assert name in {f"{f.package}.{m.name}" for f in _files(reply) for m in f.message_type}


def _files(reply: reflection_pb2.ServerReflectionResponse) -> list[descriptor_pb2.FileDescriptorProto]:
    protos = reply.file_descriptor_response.file_descriptor_proto
    return [descriptor_pb2.FileDescriptorProto.FromString(b) for b in protos]


def _check_response_shape(events: list[pb.ConverseResponse], chunk_ms: int = 40) -> str:
    """Asserts the ordering rules of the contract; returns the response id."""
    order = kinds(events)
    assert order[0] == "session_started"
    start = order.index("response_started")
    end = order.index("response_ended")
    body = order[start + 1 : end]
    assert "text_delta" in body and "audio_chunk" in body
    assert set(body) <= {"text_delta", "audio_chunk"}
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    stamps = [e.ts_ms for e in events]
    assert stamps == sorted(stamps)
    response_id = events[start].response_started.response_id
    chunks = [e.audio_chunk for e in events if e.WhichOneof("event") == "audio_chunk"]
    deltas = [e.text_delta for e in events if e.WhichOneof("event") == "text_delta"]
    assert {c.response_id for c in chunks} == {d.response_id for d in deltas} == {response_id}
    assert all(c.sample_rate_hz == 24_000 for c in chunks)
    assert all(len(c.pcm16) == chunk_ms * 48 and c.duration_ms == chunk_ms for c in chunks[:-1])
    assert 0 < len(chunks[-1].pcm16) <= chunk_ms * 48
    offsets = [c.offset_ms for c in chunks]
    assert offsets == [sum(c.duration_ms for c in chunks[:i]) for i in range(len(chunks))]
    ended = events[end].response_ended
    assert ended.status == pb.RESPONSE_STATUS_COMPLETED
    assert ended.audio_ms == sum(c.duration_ms for c in chunks)
    assert ended.text == response_text(events)
    return response_id


async def test_text_turn_streams_a_complete_response(running: Running) -> None:
    call = running.stub.Converse(requests([config(), text("Hello there")]))
    events = await collect_until(call)
    call.cancel()
    _check_response_shape(events)
    assert response_text(events) == "Turn 1. You said: Hello there."
    started = events[0].session_started
    assert started.session_id.startswith("sess_")
    assert started.output_sample_rate_hz == 24_000
    assert started.config.sampling.max_new_tokens == 1024
    assert started.config.output_audio.chunk_ms == 40
    assert started.limits.max_text_chars == running.server.settings.max_text_chars
    committed = events[1].turn_committed
    assert committed.reason == pb.COMMIT_REASON_TEXT_INPUT and committed.text_chars == len("Hello there")


async def test_audio_turn_with_manual_commit(running: Running) -> None:
    call = running.stub.Converse(requests([manual_config(), audio(tone(1.5)), audio(tone(0.5)), commit()]))
    events = await collect_until(call)
    call.cancel()
    _check_response_shape(events)
    assert response_text(events) == "Turn 1. I heard 2.0 seconds of audio."
    committed = next(e.turn_committed for e in events if e.WhichOneof("event") == "turn_committed")
    assert committed.reason == pb.COMMIT_REASON_CLIENT_COMMIT
    assert abs(committed.audio_duration_ms - 2000) <= 20


async def test_chunk_size_follows_the_session_config(running: Running) -> None:
    cfg = config(output_audio=pb.OutputAudioConfig(chunk_ms=100))
    call = running.stub.Converse(requests([cfg, text("Size me")]))
    events = await collect_until(call)
    call.cancel()
    _check_response_shape(events, chunk_ms=100)


async def test_conversation_state_persists_across_turns(running: Running) -> None:
    call = running.stub.Converse(requests([config(), text("one"), 0.5, text("two")]))
    events = await collect_until(call, count=2)
    call.cancel()
    ids = [e.response_started.response_id for e in events if e.WhichOneof("event") == "response_started"]
    assert response_text(events, ids[0]) == "Turn 1. You said: one."
    assert response_text(events, ids[1]) == "Turn 2. You said: two."


async def test_half_close_answers_pending_audio_then_ends_cleanly(running: Running) -> None:
    async def reqs():
        yield manual_config()
        yield audio(tone(1.0))

    events = [e async for e in running.stub.Converse(reqs())]
    assert kinds(events)[-1] == "response_ended"
    committed = next(e.turn_committed for e in events if e.WhichOneof("event") == "turn_committed")
    assert committed.reason == pb.COMMIT_REASON_END_OF_INPUT
    assert response_text(events) == "Turn 1. I heard 1.0 seconds of audio."


async def test_generate_text_in_and_wav_in(running: Running) -> None:
    import io
    import wave

    reply = await running.stub.Generate(pb.GenerateRequest(text="Hi"))
    assert reply.text == "Turn 1. You said: Hi."
    assert reply.content_type == "audio/wav" and reply.sample_rate_hz == 24_000
    with wave.open(io.BytesIO(reply.wav)) as wav:
        assert wav.getframerate() == 24_000 and wav.getnchannels() == 1
        assert wav.getnframes() == reply.audio_ms * 24 > 0

    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(48_000)
        wav.writeframes(tone(1.5, rate=48_000))
    reply = await running.stub.Generate(pb.GenerateRequest(audio=buf.getvalue()))
    assert reply.text == "Turn 1. I heard 1.5 seconds of audio."
    assert reply.status == pb.RESPONSE_STATUS_COMPLETED and reply.wav

    asr = await running.stub.Generate(pb.GenerateRequest(audio=buf.getvalue(), mode=pb.GENERATE_MODE_TRANSCRIBE))
    assert asr.text and not asr.wav
    tts = await running.stub.Generate(pb.GenerateRequest(text="Say this", mode=pb.GENERATE_MODE_SYNTHESIZE))
    assert tts.text == "Say this" and tts.wav

    short = await running.stub.Generate(
        pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_new_tokens=5))
    )
    assert short.status == pb.RESPONSE_STATUS_MAX_TOKENS


async def test_text_deltas_never_split_a_character(start_server) -> None:
    running = await start_server(scripted_step_ms=3)  # one token at a time: pieces split characters
    typed = "héllo 你好 🙂 ünïcödé"
    call = running.stub.Converse(requests([config(), text(typed)]))
    events = await collect_until(call)
    call.cancel()
    deltas = [e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta"]
    assert len(deltas) > 3 and all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == f"Turn 1. You said: {typed}."

"""The real gRPC server with the LFM2 backend on a tiny random-weight checkpoint.

The server is started exactly as in production (`Settings(backend="lfm2",
model=...)`): it loads the checkpoint through the LFM2 backend, warms it up
and serves Converse and Generate. The random model never ends a reply on its
own, so every reply ends at max_new_tokens.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import grpc
import pytest

from service.config import Settings  # noqa: E402
from service.server import VoiceChatServer  # noqa: E402
from tests.helpers import (  # noqa: E402
    audio,
    collect_until,
    commit,
    manual_config,
    requests,
    response_audio,
    text,
    tone,
)
from voicechat.v1 import voicechat_pb2 as pb  # noqa: E402
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc  # noqa: E402

pytest_plugins = ["tests.lfm2_fixtures"]

STEPS = 30  # 6 text, 12 audio, 6 text, 6 audio


def kinds(events: list[pb.ConverseResponse]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def of_response(events: list[pb.ConverseResponse], response_id: str) -> list[pb.ConverseResponse]:
    return [e for e in events if getattr(getattr(e, e.WhichOneof("event")), "response_id", None) == response_id]


@pytest.mark.parametrize("engine", ["batched", "serial"])
async def test_converse_text_then_audio_turn(tiny_dir: Path, engine: str) -> None:
    server = VoiceChatServer(Settings(backend="lfm2", model=str(tiny_dir), host="127.0.0.1", port=0, engine=engine))
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.VoiceChatServiceStub(channel)
            sampling = pb.SamplingParams(max_new_tokens=STEPS)
            call = stub.Converse(
                requests([manual_config(sampling=sampling), text("Hello there"), audio(tone(1.5)), commit()])
            )
            events = await collect_until(call, count=2, within=120)
            call.cancel()
    finally:
        await server.stop(0)

    order = kinds(events)
    assert order[0] == "session_started"
    started = events[0].session_started
    assert started.model.startswith("lfm2:") and started.output_sample_rate_hz == 24_000
    ended = [e.response_ended for e in events if e.WhichOneof("event") == "response_ended"]
    responses = [e.response_started.response_id for e in events if e.WhichOneof("event") == "response_started"]
    assert len(responses) == 2 and [e.response_id for e in ended] == responses
    for response_id, end in zip(responses, ended, strict=True):
        order = kinds(of_response(events, response_id))
        assert order[0] == "response_started" and order[-1] == "response_ended"
        assert "text_delta" in order and "audio_chunk" in order
        assert end.status == pb.RESPONSE_STATUS_MAX_TOKENS
        assert end.text_tokens == 12 and end.audio_frames == 18
        # 18 frames of 80 ms at 24 kHz, PCM16
        assert len(response_audio(events, response_id)) == 18 * 1920 * 2
        assert end.audio_ms == 18 * 80
    turns = [e.turn_committed for e in events if e.WhichOneof("event") == "turn_committed"]
    assert turns[0].reason == pb.COMMIT_REASON_TEXT_INPUT
    assert turns[1].reason == pb.COMMIT_REASON_CLIENT_COMMIT and turns[1].audio_duration_ms == 1500


@pytest.mark.parametrize("engine", ["batched", "serial"])
async def test_generate_returns_text_and_wav(tiny_dir: Path, engine: str) -> None:
    settings = Settings(backend="lfm2", model=str(tiny_dir), host="127.0.0.1", port=0, warmup=False, engine=engine)
    server = VoiceChatServer(settings)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.VoiceChatServiceStub(channel)
            reply = await stub.Generate(
                pb.GenerateRequest(text="Say something", sampling=pb.SamplingParams(max_new_tokens=STEPS)),
                timeout=60,
            )
    finally:
        await server.stop(0)
    assert reply.status == pb.RESPONSE_STATUS_MAX_TOKENS and reply.content_type == "audio/wav"
    with wave.open(io.BytesIO(reply.wav)) as wav:
        assert wav.getframerate() == 24_000 and wav.getnframes() == 18 * 1920

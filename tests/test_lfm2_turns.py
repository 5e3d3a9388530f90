"""Speculative responses and input transcripts through the real LFM2 backend
(tiny random-weight checkpoint, fp32, greedy), on both engines.

A speculative run that is discarded must leave the conversation's history and
model cache exactly as they were, and a promoted one must be the answer a
plain run gives: so every reply here equals the reply of the same
conversation with speculation off, token for token and sample for sample.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from service.config import Settings
from service.server import VoiceChatServer
from tests.helpers import collect_until, commit, config, open_stream, text, tone
from tests.speech import paced_chunks, silence, speech
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

pytest_plugins = ["tests.lfm2_fixtures"]

STEPS = 24
GREEDY = pb.SamplingParams(text_temperature=0, audio_temperature=0, max_new_tokens=STEPS)
RATE = 16_000


def _reply(events: list[pb.ConverseResponse], response_id: str) -> tuple[str, bytes]:
    deltas = [e.text_delta.text for e in events if e.HasField("text_delta") and e.text_delta.response_id == response_id]
    chunks = [
        e.audio_chunk.pcm16 for e in events if e.HasField("audio_chunk") and e.audio_chunk.response_id == response_id
    ]
    return "".join(deltas), b"".join(chunks)


async def _until_summary(call) -> list[pb.ConverseResponse]:
    """Events up to a response's metrics summary (sent after its response_ended)."""
    events: list[pb.ConverseResponse] = []
    async with asyncio.timeout(120):
        async for event in call:
            events.append(event)
            if event.HasField("metrics") and event.metrics.HasField("response"):
                return events
    raise AssertionError("the stream ended before a response summary")


async def _conversation(stub, speculative: bool) -> tuple[list[tuple[str, bytes]], pb.ResponseMetrics]:
    """A spoken turn with a pause inside it, then a typed turn."""
    turn = pb.TurnDetection(speculative=speculative)
    call, queue = open_stream(stub, config(sampling=GREEDY, turn_detection=turn, trace=True))
    spoken = (
        speech("So I was thinking", RATE, before_ms=300, after_ms=0)
        + silence(320, RATE)
        + speech("about the trip", RATE, before_ms=0, after_ms=900)
    )
    async for piece in paced_chunks(spoken.pcm16, RATE, 32, speed=2.0):
        await queue.put(pb.ConverseRequest(audio=pb.InputAudio(pcm16=piece)))
    events = await _until_summary(call)
    await queue.put(text("And then?"))
    events += await _until_summary(call)
    await queue.put(None)
    call.cancel()
    ids = [e.response_started.response_id for e in events if e.HasField("response_started")]
    assert len(ids) == 2
    summaries = [e.metrics.response for e in events if e.HasField("metrics") and e.metrics.HasField("response")]
    return [_reply(events, i) for i in ids], summaries[0]


@pytest.mark.parametrize("engine", ["batched", "serial"])
async def test_speculation_changes_nothing_in_the_answers(tiny_dir: Path, engine: str) -> None:
    settings = Settings(backend="lfm2", model=str(tiny_dir), dtype="fp32", host="127.0.0.1", port=0, engine=engine)
    server = VoiceChatServer(settings)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.VoiceChatServiceStub(channel)
            plain, _ = await _conversation(stub, speculative=False)
            held, summary = await _conversation(stub, speculative=True)
    finally:
        await server.stop(0)
    # the pause started a speculation that was discarded; the end of the turn started one that was used
    assert summary.speculative and summary.speculative_discards >= 1
    for (text_a, audio_a), (text_b, audio_b) in zip(plain, held, strict=True):
        assert audio_a and text_a == text_b and audio_a == audio_b


async def test_a_spoken_turn_is_transcribed_by_the_model_outside_the_history(tiny_dir: Path) -> None:
    settings = Settings(backend="lfm2", model=str(tiny_dir), dtype="fp32", host="127.0.0.1", port=0)
    server = VoiceChatServer(settings)
    port = await server.start()
    replies = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.VoiceChatServiceStub(channel)
            for transcribe in (False, True):
                manual = pb.TurnDetection(mode=pb.TURN_DETECTION_MODE_MANUAL)
                call, queue = open_stream(
                    stub, config(sampling=GREEDY, turn_detection=manual, input_transcription=transcribe)
                )
                await queue.put(pb.ConverseRequest(audio=pb.InputAudio(pcm16=tone(1.0))))
                await queue.put(commit())
                events = await collect_until(call, within=120)
                await queue.put(text("And then?"))
                events += await collect_until(call, within=120)
                await asyncio.sleep(0.5)
                await queue.put(None)
                events += [e async for e in call]
                ids = [e.response_started.response_id for e in events if e.HasField("response_started")]
                replies.append([_reply(events, i) for i in ids])
                transcripts = [e.input_transcription for e in events if e.HasField("input_transcription")]
                assert [t.turn_id for t in transcripts] == (["turn_1"] if transcribe else [])
    finally:
        await server.stop(0)
    # the transcription ran as a request of its own: the conversation's answers are unchanged
    assert replies[0] == replies[1]

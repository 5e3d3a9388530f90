"""Speculative responses against the real server with real speech: a response
started in the silence is either released at the commit, complete and in
order, or discarded without a trace on the wire."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import StartServer
from tests.helpers import collect_until, config, kinds, open_stream
from tests.speech import paced_chunks, silence, speech
from voicechat.v1 import voicechat_pb2 as pb

RATE = 16_000
SPEED = 2.0  # twice real time: the server's timeline is the audio's, not the wall clock's


async def _feed(queue: asyncio.Queue, pcm16: bytes) -> None:
    async for piece in paced_chunks(pcm16, RATE, 32, speed=SPEED):
        await queue.put(pb.ConverseRequest(audio=pb.InputAudio(pcm16=piece)))


def _config(speculative: bool) -> pb.ConverseRequest:
    return config(trace=True, turn_detection=pb.TurnDetection(speculative=speculative))


async def _one_turn(running, utterance, speculative: bool) -> list[pb.ConverseResponse]:
    call, queue = open_stream(running.stub, _config(speculative))
    feeder = asyncio.create_task(_feed(queue, utterance.pcm16))
    events = await collect_until(call, within=30)
    events += await collect_until(call, stop_kind="metrics", within=10)
    await feeder
    await queue.put(None)
    call.cancel()
    return events


@pytest.mark.parametrize("step_ms", [0, 15])
async def test_a_committed_speculative_response_is_complete_and_in_order(
    start_server: StartServer, step_ms: int
) -> None:
    running = await start_server(scripted_step_ms=step_ms)
    utterance = speech("What is the weather like today", RATE, before_ms=300, after_ms=900)
    plain = await _one_turn(running, utterance, speculative=False)
    held = await _one_turn(running, utterance, speculative=True)
    summaries = [e.metrics.response for e in held if e.HasField("metrics") and e.metrics.HasField("response")]
    assert summaries[-1].speculative and summaries[-1].speculative_starts == 1
    order = kinds(held)
    assert order.index("speech_stopped") < order.index("turn_committed") < order.index("response_started")
    first_media = min(order.index("text_delta"), order.index("audio_chunk"))
    assert order.index("response_started") < first_media and order.index("response_ended") > first_media
    assert [e.seq for e in held] == sorted(e.seq for e in held)

    def reply(events: list[pb.ConverseResponse]) -> tuple[str, bytes, list[int]]:
        chunks = [e.audio_chunk for e in events if e.WhichOneof("event") == "audio_chunk"]
        text = "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta")
        return text, b"".join(c.pcm16 for c in chunks), [c.offset_ms for c in chunks]

    text, audio, offsets = reply(held)
    assert (text, audio) == reply(plain)[:2]  # the same answer, all of it
    assert offsets == sorted(offsets) and offsets[0] == 0
    ended = next(e.response_ended for e in held if e.WhichOneof("event") == "response_ended")
    assert ended.status == pb.RESPONSE_STATUS_COMPLETED and ended.text == text


async def test_a_discarded_speculation_leaves_no_trace(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=5)
    # a pause long enough to start speculating, too short to end the turn (500 ms)
    first = speech("So I was thinking", RATE, before_ms=300, after_ms=0)
    second = speech("about the trip to the mountains", RATE, before_ms=0, after_ms=900)
    utterance = first + silence(320, RATE) + second
    events = await _one_turn(running, utterance, speculative=True)
    order = kinds(events)
    assert order.count("turn_committed") == 1 and order.count("response_started") == 1
    # nothing of a response before its turn was committed
    assert order.index("turn_committed") < order.index("response_started") < order.index("text_delta")
    assert all(e.response_started.response_id == "resp_1" for e in events if e.HasField("response_started"))
    summary = [e.metrics.response for e in events if e.HasField("metrics") and e.metrics.HasField("response")][-1]
    assert summary.speculative_discards >= 1 and summary.speculative_starts >= summary.speculative_discards
    committed = next(e.turn_committed for e in events if e.WhichOneof("event") == "turn_committed")
    spoken_ms = second.speech_end_ms + first.duration_ms + 320 - first.speech_start_ms
    assert committed.audio_duration_ms > spoken_ms  # the turn holds all of its audio
    # the discarded run was undone: this is the conversation's first turn, on all the audio
    ended = next(e.response_ended for e in events if e.WhichOneof("event") == "response_ended")
    assert ended.text == f"Turn 1. I heard {committed.audio_duration_ms / 1000:.1f} seconds of audio."


async def test_cancel_and_truncate_with_speculation_on(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=10)
    call, queue = open_stream(running.stub, _config(True))
    utterance = speech("Tell me a long story", RATE, before_ms=300, after_ms=900)
    feeder = asyncio.create_task(_feed(queue, utterance.pcm16))
    await collect_until(call, stop_kind="audio_chunk", within=30)
    await queue.put(pb.ConverseRequest(cancel_response=pb.CancelResponse()))
    ended = (await collect_until(call, within=30))[-1].response_ended
    assert ended.status in (pb.RESPONSE_STATUS_CANCELLED, pb.RESPONSE_STATUS_COMPLETED)
    await queue.put(pb.ConverseRequest(truncate=pb.TruncateResponse(response_id=ended.response_id, audio_played_ms=80)))
    ack = (await collect_until(call, stop_kind="response_truncated", within=10))[-1].response_truncated
    assert ack.response_id == ended.response_id and ack.audio_kept_ms == 80
    await feeder
    await queue.put(None)
    call.cancel()

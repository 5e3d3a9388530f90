"""The contract's chunk framing against the real server: a client that reads
promptly gets `chunk_ms` audio chunks (every chunk of a response but its last
exactly `chunk_ms` long) whatever the model's speed (the scripted backend with
no delay per step generates far faster than real time, as a model on a GPU
does) and whether or not a speculative response was held and released at the
commit. Merging is for clients that are behind only (tests/test_outbox.py,
tests/test_adversarial.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import StartServer
from tests.helpers import collect_until, config, open_stream, text
from tests.speech import paced_chunks, speech
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

RATE = 16_000
BYTES_PER_MS = 48  # 24 kHz PCM16


def _assert_framed(events: list[pb.ConverseResponse], chunk_ms: int) -> int:
    """Every response's chunks are chunk_ms long but its last, contiguous; returns the chunks seen."""
    by_response: dict[str, list[pb.AudioChunk]] = {}
    for event in events:
        if event.WhichOneof("event") == "audio_chunk":
            by_response.setdefault(event.audio_chunk.response_id, []).append(event.audio_chunk)
    assert by_response, "no audio"
    for response_id, chunks in by_response.items():
        sizes = [c.duration_ms for c in chunks]
        assert all(s == chunk_ms for s in sizes[:-1]), (response_id, sizes)
        assert 0 < sizes[-1] <= chunk_ms, (response_id, sizes)
        assert all(len(c.pcm16) == c.duration_ms * BYTES_PER_MS for c in chunks[:-1])
        assert [c.offset_ms for c in chunks] == [i * chunk_ms for i in range(len(chunks))]
    return sum(map(len, by_response.values()))


def _summaries(events: list[pb.ConverseResponse]) -> list[pb.ResponseMetrics]:
    return [e.metrics.response for e in events if e.HasField("metrics") and e.metrics.HasField("response")]


@pytest.mark.parametrize("chunk_ms", [20, 40, 100])
async def test_a_fast_model_sends_chunk_ms_chunks_to_a_prompt_reader(start_server: StartServer, chunk_ms: int) -> None:
    running = await start_server(scripted_step_ms=0)
    call, queue = open_stream(running.stub, config(trace=True, output_audio=pb.OutputAudioConfig(chunk_ms=chunk_ms)))
    # replies of 3.8 s and 8 s (95-400 chunks) generated in a moment each
    for request in ("What is the weather like today?", "#frames=100 tell me a story", "And then?"):
        await queue.put(text(request))
    events = await collect_until(call, count=3, within=60)
    ended = [e.response_ended for e in events if e.WhichOneof("event") == "response_ended"]
    assert [e.status for e in ended] == [pb.RESPONSE_STATUS_COMPLETED] * 3 and ended[1].audio_ms >= 8000
    assert _assert_framed(events, chunk_ms) >= 8000 // chunk_ms
    events += await collect_until(call, stop_kind="metrics", within=10)
    assert all(s.audio_merged == 0 for s in _summaries(events))
    await queue.put(None)
    call.cancel()


async def _spoken_turn(running, speculative: bool) -> list[pb.ConverseResponse]:
    call, queue = open_stream(
        running.stub, config(trace=True, turn_detection=pb.TurnDetection(speculative=speculative))
    )
    utterance = speech("What is the weather like today", RATE, before_ms=300, after_ms=900)

    async def feed() -> None:
        async for piece in paced_chunks(utterance.pcm16, RATE, 32, speed=2.0):
            await queue.put(pb.ConverseRequest(audio=pb.InputAudio(pcm16=piece)))

    feeder = asyncio.create_task(feed())
    events = await collect_until(call, within=30)
    events += await collect_until(call, stop_kind="metrics", within=10)
    await feeder
    await queue.put(None)
    call.cancel()
    return events


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "held-and-released"])
async def test_a_spoken_turn_to_a_fast_model_is_framed_with_or_without_speculation(
    start_server: StartServer, speculative: bool
) -> None:
    running = await start_server(scripted_step_ms=0)
    for _ in range(3):  # the reproduction failed 6 runs of 6: a few runs catch a regression
        events = await _spoken_turn(running, speculative)
        summary = _summaries(events)[-1]
        # with speculation the response was held (generated ahead, paused) and released at the commit
        assert summary.speculative == speculative
        assert summary.speculative_starts >= speculative
        _assert_framed(events, 40)
        assert summary.audio_merged == 0 and summary.text_coalesced == 0


async def test_a_client_that_falls_behind_gets_merged_chunks_and_all_its_audio(start_server: StartServer) -> None:
    # 10 ms a step (8x real time): most of the audio comes after the client stopped reading
    running = await start_server(scripted_step_ms=10)
    # a small HTTP/2 window that never grows: a client that does not read pushes back at once
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 * 1024)]
    async with grpc.aio.insecure_channel(running.target, options=options) as channel:
        call, queue = open_stream(pb_grpc.VoiceChatServiceStub(channel), config(trace=True))
        await queue.put(text("#frames=150 a long story"))  # 12 s of audio in 1.5 s
        await asyncio.sleep(2.0)  # the client reads nothing meanwhile
        events = await collect_until(call, within=60)
        events += await collect_until(call, stop_kind="metrics", within=10)
        await queue.put(None)
        call.cancel()
    ended = events[-2].response_ended
    assert ended.status == pb.RESPONSE_STATUS_COMPLETED and ended.audio_ms >= 12_000
    chunks = [e.audio_chunk for e in events if e.WhichOneof("event") == "audio_chunk"]
    sizes = [c.duration_ms for c in chunks]
    assert max(sizes) > 40 and max(sizes) <= 1000 and all(s % 40 == 0 for s in sizes[:-1])
    assert sum(sizes) == ended.audio_ms
    position = 0
    for chunk in chunks:
        assert chunk.offset_ms == position and len(chunk.pcm16) == chunk.duration_ms * BYTES_PER_MS
        position += chunk.duration_ms
    assert _summaries(events)[-1].audio_merged > 0

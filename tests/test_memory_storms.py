"""Memory returns after storms: what discarded or finished requests held is freed.

Against a real server on the tiny LFM2 checkpoint (the real engine, caches and
decoders): streams that alternate speech and short pauses (every pause starts a
speculative response, every resumption discards it), then a transcription flood.
The process's RSS, once idle, stays within a bound of where it started after a
first storm, and further storms add next to nothing (printed with `pytest -s`);
before the engine owned speculation, 16 such streams grew it by 700 MB and kept it.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import psutil

from service.backends.lfm2 import LFM2Backend
from tests.conftest import StartServer
from tests.helpers import audio, commit, config, manual_config, open_stream
from tests.speech import paced_chunks, silence, speech
from voicechat.v1 import voicechat_pb2 as pb

pytest_plugins = ["tests.lfm2_fixtures"]

STREAMS = 8
ROUNDS = 6
BOUND_MB = 250  # RSS after the first storm, idle, over RSS before it
REPEAT_BOUND_MB = 60  # what two more storms may add


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


async def test_memory_returns_after_speculation_and_transcription_storms(
    start_server: StartServer, tiny_dir: Path
) -> None:
    running = await start_server(LFM2Backend(model=str(tiny_dir), device="cpu", dtype="fp32"),
                                 max_sessions=STREAMS + 2, default_max_new_tokens=24)  # fmt: skip
    words = speech("Could you tell me", before_ms=100, after_ms=0)
    pause = silence(350, 16_000)  # long enough to speculate, too short to commit
    spec = pb.TurnDetection(mode=pb.TURN_DETECTION_MODE_SERVER_VAD, silence_duration_ms=2_000)

    async def warm() -> None:  # one full turn first: lazily built state is not growth
        call, queue = open_stream(running.stub, manual_config(input_transcription=True))
        await queue.put(audio(words.pcm16))
        await queue.put(commit())
        async for event in call:
            if event.WhichOneof("event") == "input_transcription":
                break
        call.cancel()

    async def speculating() -> None:
        call, queue = open_stream(running.stub, config(turn_detection=spec))
        reader = asyncio.create_task(_count(call, "response_ended"))
        for _ in range(ROUNDS):
            async for piece in paced_chunks((words + pause).pcm16, 16_000, 20, speed=2.0):
                await queue.put(audio(piece))
        await queue.put(None)
        await asyncio.wait_for(reader, 120)

    async def transcribing() -> None:
        call, queue = open_stream(running.stub, manual_config(input_transcription=True))
        reader = asyncio.create_task(_count(call, "input_transcription"))
        for _ in range(3 * ROUNDS):
            await queue.put(audio(words.pcm16))
            await queue.put(commit())
            await asyncio.sleep(0.05)
        await queue.put(None)
        await asyncio.wait_for(reader, 120)

    await warm()
    engine = running.server._runtime.loaded_engine  # type: ignore[union-attr]
    rss = [_rss_mb()]
    for _ in range(3):
        speculated = engine.stats.speculative
        await asyncio.gather(*(speculating() for _ in range(STREAMS)), transcribing())
        await asyncio.sleep(1.0)
        rss.append(_rss_mb())
        assert engine.stats.speculative - speculated >= STREAMS // 2  # the storm did speculate (most streams, each round)
    print(f"\nRSS {' -> '.join(f'{r:.0f}' for r in rss)} MB over three storms of {STREAMS} streams "
          f"speculating and a transcription flood")  # fmt: skip
    # the first storm builds what serving builds once (decoder threads, turn-detection sessions);
    # the storms after it leave nothing behind
    assert rss[1] - rss[0] < BOUND_MB
    assert rss[3] - rss[1] < REPEAT_BOUND_MB


async def _count(call, kind: str) -> int:  # type: ignore[no-untyped-def]
    n = 0
    async for event in call:
        n += event.WhichOneof("event") == kind
    return n

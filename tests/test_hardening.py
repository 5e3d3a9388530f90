"""Task and thread edges of a stream, against the real server: crashes, cleanup,
drain, history edits through the engine, decoders, transcripts and heard text."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence

import grpc
import numpy as np
import pytest

from service.backends.scripted import ScriptedBackend, ScriptedDecoder
from service.session.turn_control import TurnControl
from tests.conftest import StartServer
from tests.helpers import (
    collect_until,
    commit,
    config,
    kinds,
    manual_config,
    open_stream,
    requests,
    text,
    tone,
    wait_until,
)
from voicechat.v1 import voicechat_pb2 as pb


async def test_a_crashed_session_task_ends_the_stream_with_internal(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_server()

    def broken(self: TurnControl, text: str, defer_response: bool) -> None:
        raise RuntimeError("secret internal detail 0xdeadbeef")

    monkeypatch.setattr(TurnControl, "on_text", broken)
    rounds = 100  # the crash often lands while session_started is being sent: the status must follow it
    with caplog.at_level(logging.ERROR, logger="service.session"):
        for _ in range(rounds):
            call = running.stub.Converse(requests([config(), text("hello")]))
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                async with asyncio.timeout(5):  # not the idle timeout
                    async for _ in call:
                        pass
            assert failure.value.code() == grpc.StatusCode.INTERNAL
            assert "0xdeadbeef" not in failure.value.details() and "RuntimeError" not in failure.value.details()
    crashes = [r for r in caplog.records if "session task failed" in r.getMessage()]
    assert len(crashes) == rounds and all(r.exc_info is not None for r in crashes)
    await wait_until(lambda: running.server.servicer.admission.active == 0)


async def test_a_client_that_goes_away_is_logged_as_such(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_server(scripted_step_ms=5)
    with caplog.at_level(logging.INFO, logger="service.servicer"):
        call = running.stub.Converse(requests([config(), text("#frames=400 a long story")]))
        async for event in call:
            if event.WhichOneof("event") == "audio_chunk":
                break
        call.cancel()
        await wait_until(lambda: not running.server.servicer.sessions)
    ended = [r.getMessage() for r in caplog.records if " ended after " in r.getMessage()]
    assert len(ended) == 1 and ended[0].endswith("client went away")


async def test_generate_in_flight_is_drained(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=10)
    generate = asyncio.ensure_future(running.stub.Generate(pb.GenerateRequest(text="#frames=80 a long answer")))
    await wait_until(lambda: running.server.servicer.admission.active == 1)
    await running.server.stop(10)
    reply = await generate
    assert reply.status == pb.RESPONSE_STATUS_COMPLETED and reply.audio_ms == 80 * 80


async def test_a_stream_waiting_for_its_config_is_ended_by_drain(start_server: StartServer) -> None:
    running = await start_server()
    queue: asyncio.Queue[pb.ConverseRequest] = asyncio.Queue()

    async def nothing():
        yield await queue.get()

    call = running.stub.Converse(nothing())
    await wait_until(lambda: running.server.servicer.admission.active == 1)
    started = time.monotonic()
    stopping = asyncio.ensure_future(running.server.stop(5))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in call:
            pass
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    await stopping
    assert time.monotonic() - started < 4  # not the whole grace period


async def test_truncate_is_acknowledged_with_what_stays_in_the_history(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=5)
    call, queue = open_stream(running.stub, manual_config())
    await queue.put(text("#frames=60 tell me something"))
    first = await collect_until(call)
    ended = first[-1].response_ended
    assert ended.status == pb.RESPONSE_STATUS_COMPLETED and ended.heard_text == ended.text
    # a truncate and the next turn back to back: the edit takes effect first
    await queue.put(
        pb.ConverseRequest(truncate=pb.TruncateResponse(response_id=ended.response_id, audio_played_ms=200))
    )
    await queue.put(text("and then?"))
    events = await collect_until(call)
    acks = [e.response_truncated for e in events if e.WhichOneof("event") == "response_truncated"]
    assert len(acks) == 1 and acks[0].response_id == ended.response_id
    assert acks[0].audio_kept_ms == 240  # 200 ms reach into the third 80 ms frame
    # the scripted model speaks its first 6 text tokens before any audio
    assert acks[0].heard_text and ended.text.startswith(acks[0].heard_text)
    assert events[-1].response_ended.text.startswith("(You heard 240 ms of my last answer.) Turn 2.")
    await queue.put(None)


async def test_an_interrupted_response_reports_the_text_it_keeps(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=10)
    call, queue = open_stream(running.stub, manual_config())
    await queue.put(text("#frames=300 a long story about the sea and the wind"))
    await collect_until(call, stop_kind="audio_chunk")
    await queue.put(pb.ConverseRequest(cancel_response=pb.CancelResponse()))
    ended = (await collect_until(call))[-1].response_ended
    assert ended.status == pb.RESPONSE_STATUS_CANCELLED
    assert ended.text.startswith(ended.heard_text)
    await queue.put(None)


class _WatchedDecoder(ScriptedDecoder):
    """Flags a close that happens while a decode is still running."""

    overlaps = 0
    closes = 0

    def __init__(self) -> None:
        super().__init__(0.05)
        self._busy = threading.Lock()

    def decode(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        with self._busy:
            return super().decode(frames)

    def close(self) -> None:
        if self._busy.locked():
            type(self).overlaps += 1
        type(self).closes += 1


class _WatchedBackend(ScriptedBackend):
    def new_decoder(self) -> ScriptedDecoder:
        return _WatchedDecoder()


async def test_a_decoder_is_closed_only_after_its_last_decode(start_server: StartServer) -> None:
    running = await start_server(backend=_WatchedBackend(step_ms=2))
    for _ in range(3):
        call = running.stub.Converse(requests([config(), text("#frames=200 go on")]))
        async for event in call:
            if event.WhichOneof("event") == "audio_chunk":
                break
        call.cancel()  # mid-decode: the decoder is busy for 50 ms per batch
    await wait_until(lambda: _WatchedDecoder.closes >= 3 and not running.server.servicer.sessions)
    assert _WatchedDecoder.overlaps == 0


async def test_spoken_turns_get_a_transcript_that_stays_out_of_the_history(start_server: StartServer) -> None:
    running = await start_server()
    tr = pb.TurnDetection(mode=pb.TURN_DETECTION_MODE_MANUAL)
    call, queue = open_stream(running.stub, config(turn_detection=tr, input_transcription=True))
    await queue.put(pb.ConverseRequest(audio=pb.InputAudio(pcm16=tone(0.5))))
    await queue.put(commit())
    await queue.put(text("and a typed one"))
    events = await collect_until(call, count=2)
    await asyncio.sleep(0.2)
    await queue.put(None)
    events += [e async for e in call]
    transcripts = [e.input_transcription for e in events if e.WhichOneof("event") == "input_transcription"]
    assert [t.turn_id for t in transcripts] == ["turn_1"]  # typed turns get none
    # the scripted model transcribes deterministically; the transcription is its own conversation
    assert transcripts[0].text == "Turn 1. I heard 0.5 seconds of audio."
    replies = [e.response_ended.text for e in events if e.WhichOneof("event") == "response_ended"]
    assert replies == ["Turn 1. I heard 0.5 seconds of audio.", "Turn 2. You said: and a typed one."]
    assert "session_started" == kinds(events)[0]

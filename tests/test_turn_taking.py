"""Turn-taking over Converse with real synthesised speech (espeak-ng):
server VAD, manual mode, barge-in, truncation and input sample rates."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.backends.base import AssistantTurn
from service.backends.scripted import ScriptedBackend
from tests.conftest import StartServer
from tests.helpers import collect_until, commit, config, kinds, manual_config, open_stream, response_text, text
from tests.speech import noise, paced_chunks, silence, speech
from voicechat.v1 import voicechat_pb2 as pb

SPEED = 2.0  # stream at twice real time: the VAD timeline is the audio, not the wall clock


async def _stream(queue: asyncio.Queue, pcm16: bytes, rate: int, speed: float = SPEED) -> None:
    async for piece in paced_chunks(pcm16, rate, 32, speed=speed):
        await queue.put(pb.ConverseRequest(audio=pb.InputAudio(pcm16=piece)))


@pytest.mark.parametrize("rate", [16_000, 24_000, 48_000])
async def test_server_vad_commits_once_per_utterance_and_not_on_noise(start_server: StartServer, rate: int) -> None:
    running = await start_server()
    first = speech("What is the weather like today", rate, before_ms=400, after_ms=900)
    click = noise(120, rate, level_dbfs=-12, seed=3) + silence(900, rate)
    second = speech("Tell me a joke please", rate, before_ms=300, after_ms=900)
    call, queue = open_stream(running.stub, config(input_sample_rate_hz=rate, trace=True))
    feeder = asyncio.create_task(_stream(queue, (first + click + second).pcm16, rate))
    events = await collect_until(call, count=2, within=60)
    summary = (await collect_until(call, stop_kind="metrics", within=10))[-1].metrics.response
    await feeder
    order = kinds(events)
    assert order.count("turn_committed") == 2 and order.count("speech_started") == 2
    committed = [e.turn_committed for e in events if e.WhichOneof("event") == "turn_committed"]
    assert all(c.reason == pb.COMMIT_REASON_SERVER_VAD for c in committed)
    spoken = [first.speech_end_ms - first.speech_start_ms, second.speech_end_ms - second.speech_start_ms]
    for c, length in zip(committed, spoken, strict=True):
        # the turn holds the speech plus ~300 ms prefix padding and ~100 ms tail
        assert length < c.audio_duration_ms < length + 700
    starts = [e.speech_started.audio_start_ms for e in events if e.WhichOneof("event") == "speech_started"]
    assert abs(starts[0] - first.speech_start_ms) < 150
    stops = [e.speech_stopped.audio_end_ms for e in events if e.WhichOneof("event") == "speech_stopped"]
    assert abs(stops[0] - first.speech_end_ms) < 200
    # every response answers the audio of its own turn, in order
    texts = [e.response_ended.text for e in events if e.WhichOneof("event") == "response_ended"]
    # end of speech -> commit is the silence the detector waits for (500 ms), dated on the audio
    assert 400 < summary.speech_end_to_commit_ms < 900
    assert texts[0].startswith("Turn 1. I heard") and "Turn 2. I heard" in texts[1]
    call.cancel()


async def test_manual_mode_never_commits_by_itself(start_server: StartServer) -> None:
    running = await start_server()
    utterance = speech("Push to talk means I decide", 16_000, before_ms=200, after_ms=1500)
    call, queue = open_stream(running.stub, manual_config())
    await _stream(queue, utterance.pcm16, 16_000, speed=4.0)
    await asyncio.sleep(0.5)
    await queue.put(commit())
    events = await collect_until(call, within=20)
    order = kinds(events)
    assert "speech_started" not in order and order.count("turn_committed") == 1
    committed = next(e.turn_committed for e in events if e.WhichOneof("event") == "turn_committed")
    assert committed.reason == pb.COMMIT_REASON_CLIENT_COMMIT
    assert abs(committed.audio_duration_ms - utterance.duration_ms) < 40
    call.cancel()


async def test_barge_in_interrupts_a_long_response(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=10)
    call, queue = open_stream(running.stub, config())
    await queue.put(text("#frames=600 tell me a very long story"))
    await collect_until(call, stop_kind="audio_chunk")
    interruption = speech("Stop, wait a moment", 16_000, before_ms=100, after_ms=800)
    speech_began = time.monotonic() + interruption.speech_start_ms / 1000
    feeder = asyncio.create_task(_stream(queue, interruption.pcm16, 16_000, speed=1.0))
    events = await collect_until(call, within=20)
    reaction_s = time.monotonic() - speech_began
    order = kinds(events)
    assert order.index("speech_started") < order.index("playback_interrupted") < order.index("response_ended")
    ended = events[-1].response_ended
    assert ended.status == pb.RESPONSE_STATUS_INTERRUPTED
    assert ended.audio_frames < 600
    # interruption waits for 250 ms of confirmed speech, plus one model step and the chunking
    assert reaction_s < 1.5
    # nothing of the interrupted response follows the interruption
    after = order[order.index("playback_interrupted") :]
    assert "audio_chunk" not in after and "text_delta" not in after
    # the interrupting speech becomes the next turn
    more = await collect_until(call, within=20)
    reply = more[-1].response_ended.text
    assert "Turn 2. I heard" in reply
    # the history kept only what could have been played before the interruption
    heard_ms = int(reply.split("You heard ")[1].split(" ms")[0])
    assert 0 < heard_ms <= (reaction_s + interruption.speech_start_ms / 1000 + 0.1) * 1000 + 80
    await feeder
    call.cancel()


async def test_interruption_can_be_disabled(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=5)
    cfg = config(turn_detection=pb.TurnDetection(interrupt_response=False))
    call, queue = open_stream(running.stub, cfg)
    await queue.put(text("#frames=200 keep talking"))
    await collect_until(call, stop_kind="audio_chunk")
    feeder = asyncio.create_task(_stream(queue, speech("Hello there", 16_000, after_ms=800).pcm16, 16_000, speed=1.0))
    events = await collect_until(call, within=20)
    assert events[-1].response_ended.status == pb.RESPONSE_STATUS_COMPLETED
    assert "playback_interrupted" not in kinds(events)
    await feeder
    call.cancel()


class _Recording(ScriptedBackend):
    """Keeps its conversations so the test can read their history."""

    def __init__(self) -> None:
        super().__init__(step_ms=2)
        self.conversations = []

    def new_conversation(self, system_prompt, mode=None):  # type: ignore[override]
        conversation = super().new_conversation(system_prompt) if mode is None else super().new_conversation(system_prompt, mode)
        self.conversations.append(conversation)
        return conversation


async def test_truncate_keeps_only_what_was_heard(start_server: StartServer) -> None:
    backend = _Recording()
    running = await start_server(backend=backend)
    call, queue = open_stream(running.stub, config())
    await queue.put(text("#frames=50 first answer"))
    first = await collect_until(call)
    response_id = first[-1].response_ended.response_id
    await queue.put(pb.ConverseRequest(truncate=pb.TruncateResponse(response_id=response_id, audio_played_ms=1000)))
    await queue.put(text("second"))
    second = await collect_until(call)
    # the backend saw the truncated turn: 1000 ms = 13 frames (the 13th partly heard)
    history = [turn for role, turn in backend.conversations[-1].history if role == "assistant"]
    assert isinstance(history[0], AssistantTurn) and history[0].audio_frames == 13
    assert response_text(second).startswith("(You heard 1040 ms of my last answer.) Turn 2.")
    call.cancel()


async def test_turn_longer_than_the_limit_is_committed_at_the_limit(start_server: StartServer) -> None:
    from tests.helpers import audio, tone

    running = await start_server(max_turn_ms=1000)
    call, queue = open_stream(running.stub, manual_config())
    for _ in range(5):
        await queue.put(audio(tone(0.5)))
    events = await collect_until(call, within=20)
    committed = next(e.turn_committed for e in events if e.WhichOneof("event") == "turn_committed")
    assert committed.reason == pb.COMMIT_REASON_MAX_TURN_LENGTH
    assert committed.audio_duration_ms == 1000
    assert events[0].session_started.limits.max_turn_ms == 1000
    call.cancel()

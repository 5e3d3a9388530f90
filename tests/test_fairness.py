"""No client can slow the others down: adversarial clients against a real server.

The victim is a well-behaved session that types a turn and waits for the first
audio chunk (typed turn -> first audio, as the client sees it). It does this
alone, then while attackers run, on the same server (scripted model at 10 ms
per step, the shipping scheduler). Under attack its latency stays within a
margin of quiet. The attacks are those the scheduler's caps and classes are
for: a truncate flood, transcriptions of many short turns, clients that never
read, and speculative rows that fill the batch and never commit. Figures are
printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from tests.conftest import Running, StartServer
from tests.helpers import audio, config, manual_config, open_stream, text, wait_until
from tests.speech import paced_chunks, speech
from voicechat.v1 import voicechat_pb2 as pb

STEP_MS = 10
TURNS = 4
# Under attack the victim's first audio may grow by this much over quiet (p50): a loaded 2-core
# machine also runs the attackers' streams. Before the scheduler's classes and caps, the rows of
# these attacks measured seconds (a transcription flood 52 s, held speculations 17.7 s).
MARGIN_MS = 400
ROOT = Path(__file__).resolve().parent.parent


async def _victim(running: Running, turns: int = TURNS) -> list[float]:
    """Typed turns, one after another; per turn the ms from sending it to the first audio chunk."""
    loop = asyncio.get_running_loop()
    call, queue = open_stream(running.stub, manual_config())
    figures: list[float] = []
    events = call.__aiter__()
    try:
        for i in range(turns):
            sent = loop.time()
            await queue.put(text(f"victim turn {i} #frames=4"))
            first = None
            while True:
                event = await asyncio.wait_for(events.__anext__(), 60)
                kind = event.WhichOneof("event")
                if kind == "audio_chunk" and first is None:
                    first = (loop.time() - sent) * 1000
                if kind == "response_ended":
                    assert event.response_ended.status == pb.RESPONSE_STATUS_COMPLETED, event
                    break
            assert first is not None
            figures.append(first)
    finally:
        call.cancel()
    return figures


async def _compare(
    running: Running, attack: Callable[[], Awaitable[None]], name: str, settle_s: float = 1.0, margin_ms: float = MARGIN_MS
) -> None:
    quiet = await _victim(running)
    task = asyncio.create_task(attack())
    try:
        await asyncio.sleep(settle_s)
        assert not task.done(), "the attack ended before the victim spoke"
        attacked = await _victim(running)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    print(f"\n{name}: typed turn -> first audio quiet p50 {statistics.median(quiet):.0f} ms "
          f"max {max(quiet):.0f}; under attack p50 {statistics.median(attacked):.0f} ms max {max(attacked):.0f}")  # fmt: skip
    assert statistics.median(attacked) < statistics.median(quiet) + margin_ms


async def _drain(call: grpc.aio.StreamStreamCall) -> None:
    async for _ in call:
        pass


@pytest.fixture
async def server(start_server: StartServer) -> Running:
    return await start_server(scripted_step_ms=STEP_MS, max_sessions=32)


@pytest.mark.parametrize(
    "kind",
    [
        # one client ends a reply, then cuts it over and over as fast as it can: its cuts of one
        # response collapse into one engine edit (and one acknowledgement) at a time
        "truncate",
        # one client commits short spoken turns back to back with input transcription on: its
        # transcriptions wait behind other sessions' turns, at most two queued
        "transcribe",
        # four clients ask for long replies and never read them
        "never-read",
    ],
)
async def test_attackers_do_not_slow_other_sessions(server: Running, kind: str) -> None:
    async def attack() -> None:
        await _attacker_process(server, kind)

    await _compare(server, attack, kind, settle_s=2.5)


async def _attacker_process(running: Running, kind: str) -> None:
    """tests/fairness_attacker.py in its own process, until cancelled."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fairness_attacker", kind, running.target, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        await process.stdout.readline()  # "attacking"
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_long_replies_filling_the_batch_do_not_keep_a_turn_out_for_long(start_server: StartServer) -> None:
    """Four clients hold long replies on a batch of two: a committed turn takes the
    place of the reply that has held it longest (suspended for a while, it resumes),
    so it waits about `preempt_after_s`, not for a whole reply."""
    running = await start_server(scripted_step_ms=STEP_MS, max_batch=2, max_sessions=16, preempt_after_s=0.5)

    async def attack() -> None:
        await _attacker_process(running, "long")

    await _compare(running, attack, "4 long replies on a batch of 2", settle_s=2.5, margin_ms=MARGIN_MS + 500)


async def test_held_speculations_do_not_keep_a_committed_turn_out(start_server: StartServer) -> None:
    """A batch of 4, filled by four sessions that spoke, paused (so a speculative
    response started and paused itself at its first audio) and then sent
    nothing: a committed turn takes a paused speculation's place at once."""
    running = await start_server(scripted_step_ms=STEP_MS, max_batch=4, max_sessions=16)
    quiet = await _victim(running)
    utterance = speech("Could you tell me", before_ms=200, after_ms=0)
    calls: list[grpc.aio.StreamStreamCall] = []
    readers = []
    spec = pb.TurnDetection(mode=pb.TURN_DETECTION_MODE_SERVER_VAD, silence_duration_ms=3_000)
    for _ in range(4):
        call, queue = open_stream(running.stub, config(turn_detection=spec))
        calls.append(call)
        readers.append(asyncio.create_task(_drain(call)))

        async def speak(queue: asyncio.Queue[pb.ConverseRequest | None] = queue) -> None:
            async for piece in paced_chunks(utterance.pcm16, 16_000, 20, speed=4.0):
                await queue.put(audio(piece))
            await queue.put(audio(b"\0\0" * 16 * 300))  # a 300 ms pause: long enough to speculate, not to commit

        await speak()
    engine = running.server._runtime.loaded_engine  # type: ignore[union-attr]
    try:
        await wait_until(lambda: engine.stats.running == 4, within=10)  # the speculations fill the batch
        attacked = await _victim(running)
    finally:
        for task in readers:
            task.cancel()
        for call in calls:
            call.cancel()
    print(f"\nheld speculations: typed turn -> first audio quiet p50 {statistics.median(quiet):.0f} ms; "
          f"with the batch full of paused speculations p50 {statistics.median(attacked):.0f} ms")  # fmt: skip
    assert statistics.median(attacked) < statistics.median(quiet) + MARGIN_MS


async def test_a_wait_past_the_bound_says_the_model_is_busy(start_server: StartServer) -> None:
    """The one place is held: a Generate that waits longer than --max-queue-wait-s gets
    RESOURCE_EXHAUSTED, and a Converse turn a failed response saying the model is busy."""
    running = await start_server(scripted_step_ms=STEP_MS, max_batch=1, max_queue_wait_s=0.3, preempt_after_s=0)
    holder, queue = open_stream(running.stub, manual_config())
    await queue.put(text("#frames=3000 hold the only place"))
    events = holder.__aiter__()
    while (await asyncio.wait_for(events.__anext__(), 10)).WhichOneof("event") != "audio_chunk":
        pass
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Generate(pb.GenerateRequest(text="hello"), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in info.value.details()
        call, other = open_stream(running.stub, manual_config())
        await other.put(text("me too"))
        async for event in call:
            if event.WhichOneof("event") == "response_ended":
                assert event.response_ended.status == pb.RESPONSE_STATUS_FAILED
                assert "the model is busy" in event.response_ended.reason
                break
        call.cancel()
    finally:
        holder.cancel()


async def _spoken_victim(running: Running, speculative: bool, turns: int = 3) -> list[float]:
    """Server-VAD turns at real time; per turn the ms from turn_committed to the first audio chunk."""
    loop = asyncio.get_running_loop()
    utterance = speech("What is the weather like today", before_ms=300, after_ms=900)
    detection = pb.TurnDetection(mode=pb.TURN_DETECTION_MODE_SERVER_VAD, speculative=speculative)
    call, queue = open_stream(running.stub, config(turn_detection=detection))
    figures: list[float] = []
    committed: float | None = None

    async def read() -> None:
        nonlocal committed
        async for event in call:
            kind = event.WhichOneof("event")
            if kind == "turn_committed":
                committed = loop.time()
            elif kind == "audio_chunk" and committed is not None:
                figures.append((loop.time() - committed) * 1000)
                committed = None

    reader = asyncio.create_task(read())
    try:
        for i in range(turns):
            async for piece in paced_chunks(utterance.pcm16, 16_000, 20):
                await queue.put(audio(piece))
            await wait_until(lambda i=i: len(figures) > i, within=30)
    finally:
        reader.cancel()
        call.cancel()
    return figures


async def test_busy_sessions_do_not_make_a_victims_own_speculation_slower(start_server: StartServer) -> None:
    """Three sessions keep long replies going on a batch of two while a user speaks with speculation
    on: its speculative row takes a place as a committed turn would (preemption), so commit -> first
    audio is no worse than with speculation off (it was 66.7 s against 17.3 s)."""
    running = await start_server(scripted_step_ms=STEP_MS, max_batch=2, max_sessions=16, preempt_after_s=0.5)
    attack = asyncio.create_task(_attacker_process(running, "long"))
    try:
        await asyncio.sleep(2.5)
        assert not attack.done()
        off = await _spoken_victim(running, speculative=False)
        on = await _spoken_victim(running, speculative=True)
    finally:
        attack.cancel()
        await asyncio.gather(attack, return_exceptions=True)
    print(f"\nbusy batch of 2: commit -> first audio with speculation p50 {statistics.median(on):.0f} ms, "
          f"without {statistics.median(off):.0f} ms")  # fmt: skip
    assert statistics.median(on) < statistics.median(off) + MARGIN_MS

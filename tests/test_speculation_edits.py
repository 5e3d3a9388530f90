"""Speculation respects the client, against the real server with real speech:
a `truncate` or an `update_config` that arrives while a speculative response
is held (generated on the turn so far, paused at its first audio, not
committed) applies exactly as it does with speculation off. Each test runs the
same conversation both ways and compares what the client sees."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from service.session import ChatSession
from tests.conftest import Running, StartServer
from tests.helpers import collect_until, config, open_stream, text, wait_until
from tests.speech import paced_chunks, silence, speech
from voicechat.v1 import voicechat_pb2 as pb

RATE = 16_000
SPEED = 2.0  # twice real time: the server's timeline is the audio's


@dataclass
class Outcome:
    events: list[pb.ConverseResponse]
    reply: pb.ResponseEnded
    summary: pb.ResponseMetrics

    def of(self, kind: str) -> list[pb.ConverseResponse]:
        return [e for e in self.events if e.WhichOneof("event") == kind]


async def _feed(queue: asyncio.Queue, pcm16: bytes) -> None:
    async for piece in paced_chunks(pcm16, RATE, 32, speed=SPEED):
        await queue.put(pb.ConverseRequest(audio=pb.InputAudio(pcm16=piece)))


def _held(session: ChatSession) -> bool:
    """A speculative response is held: generated up to its first audio frame, not committed."""
    spec = session.speculation.current
    return spec is not None and spec.run is not None and spec.run.held and spec.run.timing.tokens_before_audio >= 0


async def _paused_turn(
    running: Running, speculative: bool, while_paused: list[pb.ConverseRequest], wait_for: str | None
) -> Outcome:
    """A spoken reply to a text turn, then a spoken turn whose pause (300 ms of
    silence: long enough to speculate, too short to commit) carries the
    requests `while_paused`; the turn is then committed by more silence.
    `wait_for`: an event the requests are answered with, awaited before the commit."""
    first = config(trace=True, turn_detection=pb.TurnDetection(speculative=speculative))
    call, queue = open_stream(running.stub, first)
    servicer = running.server.servicer
    await queue.put(text("#frames=10 hello"))  # resp_1: 800 ms of audio
    events = await collect_until(call, within=30)
    assert events[-1].response_ended.response_id == "resp_1"
    session = next(iter(servicer.sessions))
    await asyncio.sleep(1.0)  # resp_1 has played out: speaking now is no barge-in
    await _feed(queue, speech("What is the weather like today", RATE, before_ms=300, after_ms=300).pcm16)
    if speculative:
        await wait_until(lambda: _held(session), within=10)
    for request in while_paused:
        await queue.put(request)
    if wait_for is not None:
        events += await collect_until(call, stop_kind=wait_for, within=20)
    if speculative:
        spec = session.speculation.current
        assert spec is None or spec.user is None  # not committed meanwhile
    await _feed(queue, silence(900, RATE).pcm16)
    events += await collect_until(call, within=30)
    events += await collect_until(call, stop_kind="metrics", within=10)
    await queue.put(None)
    call.cancel()
    await wait_until(lambda: not servicer.sessions, within=10)
    reply = events[-2].response_ended if events[-2].HasField("response_ended") else events[-3].response_ended
    assert reply.response_id == "resp_2", reply
    summaries = [e.metrics.response for e in events if e.HasField("metrics") and e.metrics.HasField("response")]
    return Outcome(events, reply, summaries[-1])


async def test_a_truncate_while_a_speculation_is_held_applies_as_without_speculation(
    start_server: StartServer,
) -> None:
    running = await start_server(scripted_step_ms=10)
    truncate = pb.ConverseRequest(truncate=pb.TruncateResponse(response_id="resp_1", audio_played_ms=400))
    plain = await _paused_turn(running, False, [truncate], "response_truncated")
    held = await _paused_turn(running, True, [truncate], "response_truncated")
    for outcome in (plain, held):
        assert not outcome.of("error"), outcome.of("error")
        (ack,) = outcome.of("response_truncated")
        assert (ack.response_truncated.response_id, ack.response_truncated.audio_kept_ms) == ("resp_1", 400)
        # the model answers on the cut history (the scripted reply says what was heard)
        assert outcome.reply.text.startswith("(You heard 400 ms of my last answer.)"), outcome.reply.text
        assert outcome.reply.status == pb.RESPONSE_STATUS_COMPLETED
    assert held.of("response_truncated")[0].response_truncated == plain.of("response_truncated")[0].response_truncated
    assert held.reply.text == plain.reply.text and held.reply.audio_ms == plain.reply.audio_ms
    # the held speculation was discarded and started again on the cut history, which the commit promoted
    assert held.summary.speculative and held.summary.speculative_starts >= 2 and held.summary.speculative_discards >= 1
    assert not plain.summary.speculative and plain.summary.speculative_starts == 0


async def test_a_truncate_while_a_discarded_speculation_is_undone_is_not_reverted(start_server: StartServer) -> None:
    # the user speaks again after the pause (the held speculation is discarded; its undo
    # restores the history it saw) and the truncate arrives right behind that speech
    running = await start_server(scripted_step_ms=10)
    again = speech("and what about tomorrow in Paris", RATE, before_ms=0, after_ms=0).pcm16
    split = 300 * RATE // 1000 * 2  # 300 ms: the speech is back
    requests = [
        pb.ConverseRequest(audio=pb.InputAudio(pcm16=again[:split])),
        pb.ConverseRequest(truncate=pb.TruncateResponse(response_id="resp_1", audio_played_ms=400)),
        pb.ConverseRequest(audio=pb.InputAudio(pcm16=again[split:])),
    ]
    plain = await _paused_turn(running, False, requests, "response_truncated")
    held = await _paused_turn(running, True, requests, "response_truncated")
    for outcome in (plain, held):
        assert not outcome.of("error"), outcome.of("error")
        assert [e.response_truncated.audio_kept_ms for e in outcome.of("response_truncated")] == [400]
        assert outcome.reply.text.startswith("(You heard 400 ms of my last answer.)"), outcome.reply.text
    assert held.reply.text == plain.reply.text
    assert held.summary.speculative_discards >= 1


async def test_update_config_while_a_speculation_is_held_applies_as_without_speculation(
    start_server: StartServer,
) -> None:
    running = await start_server(scripted_step_ms=10)
    update = pb.ConverseRequest(update_config=pb.UpdateConfig(sampling=pb.SamplingParams(max_new_tokens=5)))
    plain = await _paused_turn(running, False, [update], None)
    held = await _paused_turn(running, True, [update], None)
    for outcome in (plain, held):
        assert not outcome.of("error"), outcome.of("error")
        reply = outcome.reply
        assert reply.status == pb.RESPONSE_STATUS_MAX_TOKENS and "max_new_tokens=5" in reply.reason
        assert reply.text_tokens + reply.audio_frames <= 5
    assert (held.reply.text, held.reply.audio_ms) == (plain.reply.text, plain.reply.audio_ms)
    assert held.summary.speculative and held.summary.speculative_starts >= 2


@pytest.mark.parametrize(
    "turn",
    [pb.TurnDetection(speculative=False), pb.TurnDetection(mode=pb.TURN_DETECTION_MODE_MANUAL)],
    ids=["speculation-off", "manual"],
)
async def test_update_config_that_rules_out_speculation_discards_the_held_one(
    start_server: StartServer, turn: pb.TurnDetection
) -> None:
    running = await start_server(scripted_step_ms=10)
    update = pb.ConverseRequest(update_config=pb.UpdateConfig(turn_detection=turn))
    commit = [pb.ConverseRequest(commit_turn=pb.CommitTurn())] if turn.mode == pb.TURN_DETECTION_MODE_MANUAL else []
    plain = await _paused_turn(running, False, [update, *commit], None)
    held = await _paused_turn(running, True, [update, *commit], None)
    assert (held.reply.text, held.reply.status) == (plain.reply.text, plain.reply.status)
    assert held.reply.status == pb.RESPONSE_STATUS_COMPLETED
    assert not held.summary.speculative and held.summary.speculative_discards >= 1


async def test_update_config_that_changes_nothing_of_the_answer_keeps_the_held_speculation(
    start_server: StartServer,
) -> None:
    running = await start_server(scripted_step_ms=10)
    same = pb.ConverseRequest(update_config=pb.UpdateConfig(trace=True))  # already on
    held = await _paused_turn(running, True, [same], None)
    assert held.summary.speculative and held.summary.speculative_starts == 1
    assert held.summary.speculative_discards == 0 and held.reply.status == pb.RESPONSE_STATUS_COMPLETED

"""The scheduler, on the scripted runner: order of operations per conversation,
abort and pause, a close that answers everything, the scheduling policy
(classes, round robin, caps, the wait bound, speculation pausing itself) and the
watchdog. The server tests run the same scheduler; these pin its rules down."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from service.backends.base import AssistantTurn, AudioFrame, Conversation, EndReason, GenerateMode, Sampling
from service.backends.scripted import ScriptedBackend
from service.engine.api import ConversationRef, EngineBusy, FatalEngineError, GenerationRequest, UserTurn
from service.engine.compose import batched_engine, serial_engine
from service.engine.runner import Row, StepOut
from service.engine.scheduler import Scheduler
from tests.helpers import StepCollector


def _request(conversation: ConversationRef, text: str, **kw: object) -> GenerationRequest:
    return GenerationRequest(conversation, UserTurn(text=text), Sampling(), **kw)  # type: ignore[arg-type]


def _first_step() -> tuple[StepCollector, threading.Event]:
    stepped = threading.Event()
    return StepCollector(on_step=lambda n: stepped.set()), stepped


@pytest.fixture
def engines() -> Iterator[list[Scheduler]]:
    made: list[Scheduler] = []
    yield made
    for engine in made:
        engine.close(5)


def _engine(engines: list[Scheduler], max_batch: int = 8, step_ms: float = 1, **kw: object) -> Scheduler:
    engine = batched_engine(ScriptedBackend(step_ms=step_ms), max_batch) if max_batch > 1 else serial_engine(
        ScriptedBackend(step_ms=step_ms))  # fmt: skip
    for name, value in kw.items():
        setattr(engine, name, value)
    engines.append(engine)
    return engine


def test_edits_apply_in_order_with_generations(engines: list[Scheduler]) -> None:
    engine = _engine(engines)
    conversation = engine.open("be brief")
    first = StepCollector()
    engine.submit(_request(conversation, "#frames=10 one"), first)
    # queued behind the generation: sees its recorded response
    recorded = engine.edit(conversation, lambda c: c.record_response(AssistantTurn(list(first.items))))
    kept = engine.edit(conversation, lambda c: c.truncate_response(2))
    second = StepCollector()
    engine.submit(_request(conversation, "two"), second)
    second.wait()
    assert recorded.result(1) is None
    turn = kept.result(1)
    assert turn is not None and turn.audio_frames == 2
    assert first.text == "Turn 1. You said: one." and (first.reason, first.error) == (EndReason.END_OF_TURN, None)
    assert second.text == "(You heard 160 ms of my last answer.) Turn 2. You said: two."
    assert first.finished_calls == second.finished_calls == 1


def test_abort_and_pause_take_effect_between_steps(engines: list[Scheduler]) -> None:
    engine = _engine(engines, step_ms=2)
    sink, stepped = _first_step()
    handle = engine.submit(_request(engine.open(""), "#frames=500 long"), sink)
    assert stepped.wait(5)
    handle.pause()
    paused_at = len(sink.items)
    assert not sink.done.wait(0.2) and len(sink.items) <= paused_at + 1  # at most the step in flight
    handle.abort()  # an abort wakes a paused request
    assert sink.done.wait(5) and (sink.reason, sink.error) == (EndReason.STOPPED, None)


def test_close_answers_work_never_started(engines: list[Scheduler]) -> None:
    engine = _engine(engines, max_batch=1, step_ms=2)
    busy, stepped = _first_step()
    queued = StepCollector()
    engine.submit(_request(engine.open(""), "#frames=5000 long"), busy)
    other = engine.open("")
    engine.submit(_request(other, "never runs"), queued)  # waits for the only place
    edit = engine.edit(other, Conversation.snapshot)
    assert stepped.wait(5)
    assert engine.close(5)
    assert (busy.reason, busy.error) == (EndReason.STOPPED, None)
    assert queued.done.wait(1) and queued.reason is EndReason.STOPPED and queued.finished_calls == 1
    assert edit.exception(1) is not None
    late = StepCollector()
    engine.submit(_request(other, "after close"), late)
    assert late.done.is_set() and late.error is not None


def test_a_batch_steps_every_row_at_once(engines: list[Scheduler]) -> None:
    """Eight responses of 40 steps on a 10 ms model take about 40 steps, not 320."""
    engine = _engine(engines, max_batch=8, step_ms=10)
    sinks = [StepCollector() for _ in range(8)]
    started = time.monotonic()
    for i, sink in enumerate(sinks):
        engine.submit(_request(engine.open(""), f"#frames=30 r{i}", owner=f"s{i}"), sink)
    for sink in sinks:
        assert sink.wait().error is None
    elapsed = time.monotonic() - started
    steps = max(len(sink.items) for sink in sinks)
    assert engine.stats.rows == sum(len(sink.items) for sink in sinks)
    assert engine.stats.steps < 2 * steps  # shared steps: one per iteration for all rows
    assert elapsed < 8 * steps * 0.010  # less than the rows one after another would take


# -- the scheduling policy ----------------------------------------------------------------


def _started_order(engine: Scheduler, requests: list[GenerationRequest]) -> list[str]:
    order: list[str] = []
    all_started = threading.Event()

    class Sink(StepCollector):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def started(self, ts_ms: float) -> None:  # on the engine thread
            order.append(self.name)
            if len(order) == len(requests):
                all_started.set()
            super().started(ts_ms)

    handles = [engine.submit(request, Sink(request.user.text)) for request in requests]
    assert all_started.wait(10), order
    for handle in handles:
        handle.abort()  # the speculation waits, paused at its first audio, for a commit that never comes
    return order


def test_committed_turns_first_then_transcriptions_then_speculation_round_robin(engines: list[Scheduler]) -> None:
    """One place; while a long response holds it, a flood from session A and one
    request each from B and C wait. They start by class, and within a class the
    owners take turns: A's fourth turn does not go before B's first."""
    engine = _engine(engines, max_batch=1, step_ms=1)
    blocker, stepped = _first_step()
    engine.submit(_request(engine.open(""), "#frames=60 hold", owner="x"), blocker)
    assert stepped.wait(5)
    chat = lambda: engine.open("")  # noqa: E731
    asr = lambda: engine.open("", GenerateMode.TRANSCRIBE)  # noqa: E731
    requests = [
        _request(chat(), "spec-C #frames=1", owner="C", speculative=True),
        _request(asr(), "asr-A1", owner="A"),
        _request(chat(), "A1 #frames=1", owner="A"),
        _request(chat(), "A2 #frames=1", owner="A"),
        _request(chat(), "A3 #frames=1", owner="A"),
        _request(chat(), "B1 #frames=1", owner="B"),
        _request(asr(), "asr-B1", owner="B"),
    ]
    order = _started_order(engine, requests)
    assert order == ["A1 #frames=1", "B1 #frames=1", "A2 #frames=1", "A3 #frames=1", "asr-A1", "asr-B1",
                     "spec-C #frames=1"]  # fmt: skip


def test_transcriptions_per_session_are_capped(engines: list[Scheduler]) -> None:
    engine = _engine(engines, max_batch=1, step_ms=1)
    blocker, stepped = _first_step()
    blocking = engine.submit(_request(engine.open(""), "#frames=5000 hold"), blocker)
    assert stepped.wait(5)
    sinks = [StepCollector() for _ in range(4)]
    for sink in sinks:
        engine.submit(_request(engine.open("", GenerateMode.TRANSCRIBE), "words", owner="A"), sink)
    other = StepCollector()
    engine.submit(_request(engine.open("", GenerateMode.TRANSCRIBE), "words", owner="B"), other)
    refused = [s for s in sinks if s.done.is_set() and isinstance(s.error, EngineBusy)]  # refused at once
    assert len(refused) == 4 - engine.max_queued_transcriptions == 2
    assert not other.done.is_set()  # another session's transcription still waits its turn
    blocking.abort()
    assert other.wait().error is None


def test_edits_are_capped_and_keyed_edits_coalesce(engines: list[Scheduler]) -> None:
    """A truncate flood against one response collapses into its latest
    truncation; other edits beyond the cap fail at once. Nothing queues without bound."""
    engine = _engine(engines, max_batch=1, step_ms=2)
    conversation = engine.open("")
    busy, stepped = _first_step()
    engine.submit(_request(conversation, "#frames=100 long"), busy)  # the edits wait behind it
    assert stepped.wait(5)
    applied: list[int] = []
    floods = [engine.edit(conversation, lambda c, n=n: applied.append(n), coalesce="truncate:resp_1")
              for n in range(10_000)]  # fmt: skip
    plain = [engine.edit(conversation, lambda c: None) for _ in range(engine.max_pending_edits + 5)]
    refused = [f for f in plain if f.done() and isinstance(f.exception(0), EngineBusy)]
    assert 5 <= len(refused) <= 7  # the flood's queued edit (one, or one more in flight) counts too
    assert len(plain) - len(refused) <= engine.max_pending_edits
    busy.wait()
    for future in floods:
        future.result(5)
    assert applied == [9_999]  # every future of the flood got the one, latest, truncation


def test_a_wait_for_a_place_is_bounded(engines: list[Scheduler]) -> None:
    engine = _engine(engines, max_batch=1, step_ms=5, max_wait_s=0.3)
    blocker, stepped = _first_step()
    engine.submit(_request(engine.open(""), "#frames=400 hold"), blocker)
    assert stepped.wait(5)
    waiting = StepCollector()
    started = time.monotonic()
    engine.submit(_request(engine.open(""), "late"), waiting)
    assert waiting.done.wait(5) and isinstance(waiting.error, EngineBusy)
    assert 0.25 < time.monotonic() - started < 3
    assert not blocker.done.is_set()


def test_a_speculative_row_pauses_itself_at_its_first_audio_and_promote_resumes_it(engines: list[Scheduler]) -> None:
    engine = _engine(engines, step_ms=1)
    sink = StepCollector()
    handle = engine.submit(_request(engine.open(""), "#frames=20 guess", speculative=True), sink)
    deadline = time.monotonic() + 5
    while not any(isinstance(i, AudioFrame) for i in sink.items) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.2)
    frames = [i for i in sink.items if isinstance(i, AudioFrame)]
    assert len(frames) == 1 and handle.paused  # paused by the engine, exactly at its first frame
    handle.promote()
    assert sink.wait().reason is EndReason.END_OF_TURN
    assert len([i for i in sink.items if isinstance(i, AudioFrame)]) == 21  # 20 frames and the end of audio
    chunk = StepCollector()  # holding once the first chunk's frames are there (the pipeline asks for its stride)
    handle = engine.submit(_request(engine.open(""), "#frames=20 guess", speculative=True, hold_at_frames=3), chunk)
    while not handle.paused and time.monotonic() < deadline + 5:
        time.sleep(0.005)
    time.sleep(0.1)
    assert len([i for i in chunk.items if isinstance(i, AudioFrame)]) == 3 and handle.paused
    handle.abort()


def test_a_committed_turn_takes_a_paused_speculations_place(engines: list[Scheduler]) -> None:
    engine = _engine(engines, max_batch=1, step_ms=1)
    spec = StepCollector()
    engine.submit(_request(engine.open(""), "#frames=20 guess", speculative=True, owner="A"), spec)
    deadline = time.monotonic() + 5
    while not any(isinstance(i, AudioFrame) for i in spec.items) and time.monotonic() < deadline:
        time.sleep(0.005)
    turn = StepCollector()
    engine.submit(_request(engine.open(""), "now #frames=2", owner="B"), turn)
    assert turn.wait().reason is EndReason.END_OF_TURN
    assert spec.wait().reason is EndReason.STOPPED


# -- the watchdog -------------------------------------------------------------------------


def test_a_fatal_runner_error_stops_the_engine_and_answers_everyone(engines: list[Scheduler]) -> None:
    engine = _engine(engines, max_batch=1, step_ms=1)
    runner = engine.runner
    step = runner.step
    calls = {"n": 0}

    def failing(rows: list[Row]) -> list[StepOut]:
        calls["n"] += 1
        if calls["n"] == 5:
            raise FatalEngineError("device lost")
        return step(rows)

    runner.step = failing  # type: ignore[method-assign]
    failures: list[BaseException] = []
    engine.on_failure(failures.append)
    running, waiting = StepCollector(), StepCollector()
    conversation = engine.open("")
    engine.submit(_request(conversation, "#frames=50 long"), running)
    engine.submit(_request(engine.open(""), "queued"), waiting)
    edit = engine.edit(conversation, lambda c: None)
    for sink in (running, waiting):
        assert sink.done.wait(5) and isinstance(sink.error, FatalEngineError) and sink.finished_calls == 1
    assert isinstance(edit.exception(5), FatalEngineError)
    assert [str(e) for e in failures] == ["device lost"] and engine.failure is failures[0]
    late = StepCollector()
    engine.submit(_request(conversation, "after"), late)
    assert late.done.is_set() and isinstance(late.error, FatalEngineError)
    with pytest.raises(RuntimeError):
        engine.open("")


def test_a_long_response_gives_its_place_up_for_a_while_and_resumes_where_it_stopped(
    engines: list[Scheduler],
) -> None:
    engine = _engine(engines, max_batch=1, step_ms=2, preempt_after_s=0.2)
    alone = StepCollector()
    engine.submit(_request(engine.open(""), "#frames=300 long", owner="A"), alone)
    alone.wait()
    long, stepped = _first_step()
    engine.submit(_request(engine.open(""), "#frames=300 long", owner="A"), long)
    assert stepped.wait(5)
    time.sleep(0.3)  # it has held the only place for longer than preempt_after_s
    short = StepCollector()
    asked = time.monotonic()
    engine.submit(_request(engine.open(""), "short #frames=3", owner="B"), short)
    assert short.wait().reason is EndReason.END_OF_TURN
    assert time.monotonic() - asked < 2  # not behind the whole long reply (~0.6 s more at 2 ms a step)
    assert not long.done.is_set() and engine.stats.suspended == 1
    assert long.wait().reason is EndReason.END_OF_TURN
    assert long.values == alone.values  # resumed exactly where it stopped


def test_a_speculation_runs_on_a_fork_that_an_abort_or_a_trunk_edit_drops(engines: list[Scheduler]) -> None:
    """No snapshot or restore from outside: a speculative request's changes to
    the history are dropped when it stops before its commit, and an edit that
    arrives while it runs aborts it and applies to the trunk."""
    engine = _engine(engines, step_ms=1)
    conversation = engine.open("")
    first = StepCollector()
    engine.submit(_request(conversation, "hello #frames=2"), first)
    first.wait()
    engine.edit(conversation, lambda c: c.record_response(AssistantTurn(list(first.items)))).result(5)
    trunk = engine.edit(conversation, lambda c: list(c.history)).result(5)  # type: ignore[attr-defined]

    aborted = StepCollector()
    handle = engine.submit(_request(conversation, "a guess #frames=30", speculative=True), aborted)
    deadline = time.monotonic() + 5
    while not handle.paused and time.monotonic() < deadline:
        time.sleep(0.005)
    handle.abort()
    assert aborted.wait().reason is EndReason.STOPPED
    assert engine.edit(conversation, lambda c: list(c.history)).result(5) == trunk  # type: ignore[attr-defined]

    live = StepCollector()
    engine.submit(_request(conversation, "another guess #frames=30", speculative=True), live)
    while not any(isinstance(i, AudioFrame) for i in live.items) and time.monotonic() < deadline + 5:
        time.sleep(0.005)
    seen = engine.edit(conversation, lambda c: list(c.history)).result(5)  # type: ignore[attr-defined]
    assert live.wait().reason is EndReason.STOPPED and seen == trunk  # the edit saw the trunk, not the fork

    promoted = StepCollector()
    handle = engine.submit(_request(conversation, "kept #frames=3", speculative=True), promoted)
    handle.promote()  # committed: the fork is the conversation from now on
    assert promoted.wait().reason is EndReason.END_OF_TURN
    trunk = engine.edit(conversation, lambda c: list(c.history)).result(5)  # type: ignore[attr-defined]
    assert len(trunk) > len(seen)

    # one that ends by itself before its commit (it never reached its hold) stays undecided:
    # the next operation drops it, unless a promote() adopted it first
    ended = StepCollector()
    engine.submit(_request(conversation, "short #frames=2", speculative=True, hold_at_frames=99), ended)
    assert ended.wait().reason is EndReason.END_OF_TURN
    assert engine.edit(conversation, lambda c: list(c.history)).result(5) == trunk  # type: ignore[attr-defined]
    ended = StepCollector()
    handle = engine.submit(_request(conversation, "short #frames=2", speculative=True, hold_at_frames=99), ended)
    assert ended.wait().reason is EndReason.END_OF_TURN
    handle.promote()
    assert len(engine.edit(conversation, lambda c: list(c.history)).result(5)) > len(trunk)  # type: ignore[attr-defined]


def test_a_promote_racing_the_engines_hold_is_never_lost(engines: list[Scheduler]) -> None:
    """The engine holds a speculation at its first audio while the loop may
    promote it at that very moment: the check and the pause are one step, so a
    promoted response is never left paused (it used to stop after its text)."""
    engine = _engine(engines, max_batch=8, step_ms=0)
    conversation = engine.open("")
    for i in range(200):
        sink = StepCollector()
        handle = engine.submit(_request(conversation, f"{i} #frames=3", speculative=True), sink)
        time.sleep(0.0002 * (i % 10))  # promote before, at, or after the first audio
        handle.promote()
        assert sink.wait().reason is EndReason.END_OF_TURN, i

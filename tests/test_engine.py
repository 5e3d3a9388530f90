"""The engine seam with the threaded engine over the scripted backend: order of
operations per conversation, abort, pause, and a close that answers everything."""

from __future__ import annotations

import threading

from service.backends.base import AssistantTurn, Conversation, EndReason, Sampling
from service.backends.engine import ConversationRef, GenerationRequest, ThreadedEngine, UserTurn
from service.backends.scripted import ScriptedBackend
from tests.helpers import StepCollector


def _request(conversation: ConversationRef, text: str) -> GenerationRequest:
    return GenerationRequest(conversation, UserTurn(text=text), Sampling())


def _first_step() -> tuple[StepCollector, threading.Event]:
    stepped = threading.Event()
    return StepCollector(on_step=lambda n: stepped.set()), stepped


def test_edits_apply_in_order_with_generations() -> None:
    engine = ThreadedEngine(ScriptedBackend(step_ms=1), workers=4)
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
    assert engine.close(5)


def test_abort_and_pause_take_effect_between_steps() -> None:
    engine = ThreadedEngine(ScriptedBackend(step_ms=2), workers=2)
    sink, stepped = _first_step()
    handle = engine.submit(_request(engine.open(""), "#frames=500 long"), sink)
    assert stepped.wait(5)
    handle.pause()
    paused_at = len(sink.items)
    assert not sink.done.wait(0.2) and len(sink.items) <= paused_at + 1  # at most the step in flight
    handle.abort()  # an abort wakes a paused request
    assert sink.done.wait(5) and (sink.reason, sink.error) == (EndReason.STOPPED, None)
    assert engine.close(5)


def test_close_answers_work_the_pool_never_ran() -> None:
    engine = ThreadedEngine(ScriptedBackend(step_ms=2), workers=1)
    busy, stepped = _first_step()
    queued = StepCollector()
    engine.submit(_request(engine.open(""), "#frames=5000 long"), busy)
    other = engine.open("")  # its lane waits for the only worker
    engine.submit(_request(other, "never runs"), queued)
    edit = engine.edit(other, Conversation.snapshot)
    assert stepped.wait(5)
    assert engine.close(5)
    assert (busy.reason, busy.error) == (EndReason.STOPPED, None)
    assert queued.done.wait(1) and queued.reason is EndReason.STOPPED and queued.finished_calls == 1
    assert edit.exception(1) is not None
    late = StepCollector()
    engine.submit(_request(other, "after close"), late)
    assert late.done.is_set() and late.error is not None

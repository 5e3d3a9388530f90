"""The engine seam with the threaded engine over the scripted backend: order of
operations per conversation, abort, pause, and a close that answers everything."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from service.backends.base import AssistantTurn, AudioFrame, Conversation, EndReason, Sampling, TextToken
from service.backends.engine import GenerationRequest, ThreadedEngine, UserTurn
from service.backends.scripted import ScriptedBackend


class Sink:
    def __init__(self) -> None:
        self.items: list[TextToken | AudioFrame] = []
        self.end: tuple[EndReason | None, BaseException | None] | None = None
        self.done = threading.Event()
        self.first = threading.Event()

    def started(self, ts_ms: float) -> None:
        pass

    def steps(self, items: Sequence[TextToken | AudioFrame], ts_ms: float) -> None:
        self.items += items
        self.first.set()

    def finished(self, reason: EndReason | None, error: BaseException | None) -> None:
        assert self.end is None, "finished twice"
        self.end = (reason, error)
        self.done.set()

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.items if isinstance(s, TextToken))


def _request(engine: ThreadedEngine, conversation, text: str) -> GenerationRequest:
    return GenerationRequest(conversation, UserTurn(text=text), Sampling())


def test_edits_apply_in_order_with_generations() -> None:
    engine = ThreadedEngine(ScriptedBackend(step_ms=1), workers=4)
    conversation = engine.open("be brief")
    first = Sink()
    engine.submit(_request(engine, conversation, "#frames=10 one"), first)
    # queued behind the generation: sees its recorded response
    recorded = engine.edit(conversation, lambda c: c.record_response(AssistantTurn(list(first.items))))
    kept = engine.edit(conversation, lambda c: c.truncate_response(2))
    second = Sink()
    engine.submit(_request(engine, conversation, "two"), second)
    assert second.done.wait(10) and recorded.result(1) is None
    turn = kept.result(1)
    assert turn is not None and turn.audio_frames == 2
    assert first.text == "Turn 1. You said: one." and first.end == (EndReason.END_OF_TURN, None)
    assert second.text == "(You heard 160 ms of my last answer.) Turn 2. You said: two."
    assert engine.close(5)


def test_abort_and_pause_take_effect_between_steps() -> None:
    engine = ThreadedEngine(ScriptedBackend(step_ms=2), workers=2)
    sink = Sink()
    handle = engine.submit(_request(engine, engine.open(""), "#frames=500 long"), sink)
    assert sink.first.wait(5)
    handle.pause()
    paused_at = len(sink.items)
    assert not sink.done.wait(0.2) and len(sink.items) <= paused_at + 1  # at most the step in flight
    handle.abort()  # an abort wakes a paused request
    assert sink.done.wait(5) and sink.end == (EndReason.STOPPED, None)
    assert engine.close(5)


def test_close_answers_work_the_pool_never_ran() -> None:
    engine = ThreadedEngine(ScriptedBackend(step_ms=2), workers=1)
    busy, queued = Sink(), Sink()
    engine.submit(_request(engine, engine.open(""), "#frames=5000 long"), busy)
    other = engine.open("")  # its lane waits for the only worker
    engine.submit(_request(engine, other, "never runs"), queued)
    edit = engine.edit(other, Conversation.snapshot)
    assert busy.first.wait(5)
    assert engine.close(5)
    assert busy.end == (EndReason.STOPPED, None)
    assert queued.done.wait(1) and queued.end is not None and queued.end[0] is EndReason.STOPPED
    assert edit.exception(1) is not None
    late = Sink()
    engine.submit(_request(engine, other, "after close"), late)
    assert late.end is not None and late.end[1] is not None

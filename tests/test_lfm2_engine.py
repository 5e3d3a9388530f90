"""The batched LFM2 engine against the serial one, on the tiny random checkpoint.

Every conversation in a batch must produce exactly the tokens, text and
frames it produces alone on the serial engine (fp32, greedy): with histories
of different lengths, rows that join and leave at different steps, text and
audio rows in one step, a row aborted mid-run, a truncated response followed
by a new turn, the prefix cache on, a long prefill split into chunks, and a
model error in one row. End conditions are forced through the samplers, as
in test_lfm2_backend.py: the random weights never end a response by themselves.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.backends.base import (
    END_OF_AUDIO_CODE,
    AssistantTurn,
    EndReason,
    Finished,
    GenerateMode,
    Sampling,
    TextToken,
)
from service.backends.lfm2 import AUDIO_START, IM_END, TEXT_END, LFM2Backend
from service.engine.api import ConversationRef, Engine, GenerationRequest, TextStream, UserTurn
from service.engine.compose import batched_engine
from service.engine.lfm2_runner import sample_frames, sample_rows
from service.engine.scheduler import Scheduler
from tests.helpers import STEP_WAIT_S
from tests.helpers import StepCollector as Sink

pytest_plugins = ["tests.lfm2_fixtures"]

GREEDY = Sampling(text_temperature=0.0, text_top_k=0, audio_temperature=0.0, audio_top_k=0, max_new_tokens=30)
WAIT_S = STEP_WAIT_S


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16_000)) * 0.1).astype(np.float32)


@dataclass
class Turn:
    text: str = ""
    audio: np.ndarray | None = None
    max_new_tokens: int = 30
    abort_after: int | None = None
    keep_frames: int | None = None  # truncate the recorded response to this many frames


@dataclass
class Played:
    """One turn as an engine played it."""

    values: list[object]
    reason: EndReason | None
    error: BaseException | None
    prefill_positions: int

    def same(self) -> tuple[list[object], EndReason | None, int]:
        return self.values, self.reason, self.prefill_positions


def converse(
    engine: Engine,
    turns: Sequence[Turn],
    mode: GenerateMode = GenerateMode.CHAT,
    on_step: Callable[[int], None] | None = None,
    opened: list[ConversationRef] | None = None,
) -> list[Played]:
    """Play a conversation's turns one after another, recording each response
    (and truncating it when asked) through edits, as the pipeline does."""
    ref = engine.open("", mode)
    if opened is not None:
        opened.append(ref)
    played = []
    for i, turn in enumerate(turns):
        sink = Sink(on_step if i == 0 else None, turn.abort_after)
        sampling = Sampling(0.0, 0, 0.0, 0, turn.max_new_tokens)
        sink.set_handle(engine.submit(GenerationRequest(ref, UserTurn(turn.audio, 16_000, turn.text), sampling), sink))
        sink.wait()
        assert sink.finished_calls == 1 and sink.started_calls == 1
        engine.edit(ref, lambda c, s=sink: c.record_response(AssistantTurn(list(s.items)))).result(WAIT_S)
        if turn.keep_frames is not None:
            engine.edit(ref, lambda c, n=turn.keep_frames: c.truncate_response(n)).result(WAIT_S)
        positions = engine.edit(ref, lambda c: c.last_prefill_positions).result(WAIT_S)
        played.append(Played(sink.values, sink.reason, sink.error, positions))
    engine.release(ref)
    return played


def alone(
    backend: LFM2Backend,
    turns: Sequence[Turn],
    mode: GenerateMode = GenerateMode.CHAT,
    heads: list[torch.Tensor] | None = None,
) -> list[Played]:
    """The reference: the conversation played on the serial loop
    (`LFM2Conversation.generate`, which tests/test_lfm2_backend.py checks
    against the package) with no engine. `heads` receives what each step's
    head sampled from (text logits, or the hidden state the audio head got)."""
    with pytest.MonkeyPatch.context() as patch:
        if heads is not None:
            model = backend.model
            text_sampler, audio_sampler = model._sample_text_token, model._sample_audio_frame

            def text(logits: torch.Tensor, **kw: Any) -> torch.Tensor:
                heads.append(logits.clone())
                return text_sampler(logits, **kw)

            def audio(hidden: torch.Tensor, **kw: Any) -> torch.Tensor:
                heads.append(hidden.clone())
                return audio_sampler(hidden, **kw)

            patch.setattr(model, "_sample_text_token", text)
            patch.setattr(model, "_sample_audio_frame", audio)
        conversation = backend.new_conversation("", mode)
        played = []
        for turn in turns:
            if turn.audio is not None:
                conversation.add_user_audio(turn.audio, 16_000)
            if turn.text:
                conversation.add_user_text(turn.text)
            stop, stream = threading.Event(), TextStream(backend.detokenize)
            items: list[Any] = []
            reason: EndReason | None = None
            error: BaseException | None = None
            try:
                for step in conversation.generate(Sampling(0.0, 0, 0.0, 0, turn.max_new_tokens), stop):
                    if isinstance(step, Finished):
                        reason = step.reason
                        break
                    if isinstance(step, TextToken):
                        step = TextToken(step.token_id, stream.push(step.token_id))
                    items.append(step)
                    if turn.abort_after is not None and len(items) == turn.abort_after:
                        stop.set()
            except Exception as exc:  # noqa: BLE001 - compared with the engine's failure
                error = exc
            conversation.record_response(AssistantTurn(items))
            if turn.keep_frames is not None:
                conversation.truncate_response(turn.keep_frames)
            sink = Sink()
            sink.items = items
            played.append(Played(sink.values, reason, error, conversation.last_prefill_positions))
        return played


@pytest.fixture
def batched(tiny_backend: LFM2Backend) -> Iterator[Callable[..., Scheduler]]:
    engines: list[Scheduler] = []

    def make(max_batch: int = 8, prefill_chunk: int = 256) -> Scheduler:
        engine = batched_engine(tiny_backend, max_batch, prefill_chunk)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert engine.close(10)


def in_threads(jobs: Sequence[Callable[[], Any]]) -> list[Any]:
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 3)
    if errors:
        raise errors[0]
    return results


def joined_at(gates: dict[int, threading.Event]) -> Callable[[int], None]:
    """An on_step that opens gate n when the first conversation reaches step n."""

    def on_step(n: int) -> None:
        if n in gates:
            gates[n].set()

    return on_step


def gated(gate: threading.Event, job: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        assert gate.wait(WAIT_S)
        return job()

    return run


# -- equality with the serial engine ---------------------------------------------------


SCRIPTS: list[list[Turn]] = [
    # long first turn, then a shorter reply; the second reply is truncated and followed by a third turn
    [Turn("Hello there, tell me a story about the sea", max_new_tokens=30),
     Turn("And then?", max_new_tokens=24, keep_frames=5), Turn("Go on", max_new_tokens=12)],
    # spoken input; leaves early
    [Turn(audio=noise(1.3, seed=1), max_new_tokens=9), Turn("Thanks", max_new_tokens=20)],
    # a short history; aborted mid-run, then a new turn
    [Turn("Hi", max_new_tokens=40, abort_after=11), Turn("Still there?", max_new_tokens=16)],
    # the longest history: text and audio
    [Turn("A much longer opening message " * 3, audio=noise(0.6, seed=2), max_new_tokens=26),
     Turn("Short", max_new_tokens=7)],
]  # fmt: skip


def test_batched_rows_equal_rows_alone(tiny_backend: LFM2Backend, batched: Callable[..., Scheduler]) -> None:
    expected_heads: list[list[torch.Tensor]] = [[] for _ in SCRIPTS]
    expected = [alone(tiny_backend, script, heads=expected_heads[i]) for i, script in enumerate(SCRIPTS)]
    engine = batched(max_batch=3)  # one conversation has to wait for a place
    refs: list[list[ConversationRef]] = [[] for _ in SCRIPTS]
    heads: list[list[torch.Tensor]] = [[] for _ in SCRIPTS]
    seen_waiting: list[int] = []
    steps_with: dict[str, set[int]] = {"text": set(), "audio": set()}
    text_head, audio_head = engine.runner._sample_text, engine.runner._sample_audio

    def record(rows: Any, values: torch.Tensor) -> None:
        owner = {id(ref.state): i for i, opened in enumerate(refs) for ref in opened}
        for row, value in zip(rows, values, strict=True):
            heads[owner[id(row.state)]].append(value.clone())

    def text(rows: Any, logits: torch.Tensor) -> Any:
        steps_with["text"].add(engine.stats.steps)
        record(rows, logits)
        return text_head(rows, logits)

    def audio(rows: Any, hidden: torch.Tensor) -> Any:
        steps_with["audio"].add(engine.stats.steps)
        record(rows, hidden)
        return audio_head(rows, hidden)

    engine.runner._sample_text, engine.runner._sample_audio = text, audio  # type: ignore[method-assign]
    gates = {n: threading.Event() for n in (3, 5, 8)}

    def on_step(n: int) -> None:
        seen_waiting.append(engine.stats.waiting)
        joined_at(gates)(n)

    jobs = [lambda: converse(engine, SCRIPTS[0], on_step=on_step, opened=refs[0])]
    jobs += [
        gated(gates[n], lambda i=i: converse(engine, SCRIPTS[i], opened=refs[i])) for i, n in enumerate((3, 5, 8), 1)
    ]
    got = in_threads(jobs)
    for i, (mine, reference) in enumerate(zip(got, expected, strict=True)):
        assert [p.same() for p in mine] == [p.same() for p in reference], f"conversation {i} differs"
        assert all(p.error is None for p in mine)
        # not only the same argmax: the same logits and audio-head inputs, to float rounding
        assert len(heads[i]) == len(expected_heads[i])
        for step, (a, b) in enumerate(zip(heads[i], expected_heads[i], strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"conversation {i}, step {step}")
    # the scripts did what they claim
    assert got[2][0].reason is EndReason.STOPPED and len(got[2][0].values) == 11
    assert [p.reason for p in got[0]] == [EndReason.MAX_TOKENS] * 3
    assert got[0][1].prefill_positions < got[0][2].prefill_positions  # after the truncation the cache rolled back
    assert steps_with["text"] & steps_with["audio"], "no step had text and audio rows together"
    assert engine.stats.rows > engine.stats.steps  # rows shared steps
    assert max(seen_waiting) >= 1 and engine.stats.waiting == 0 and engine.stats.running == 0


def test_long_prefill_runs_in_chunks_between_decode_steps(
    tiny_backend: LFM2Backend, batched: Callable[..., Scheduler]
) -> None:
    long_turn = [Turn("Listen to this", audio=noise(4.0, seed=3), max_new_tokens=12)]
    first = [Turn("Keep talking", max_new_tokens=60)]
    expected = [alone(tiny_backend, first), alone(tiny_backend, long_turn)]
    engine = batched(prefill_chunk=8)
    events: list[str] = []  # appended on the engine thread only, so in engine order
    gate = threading.Event()

    def first_step(n: int) -> None:
        events.append("first")
        if n == 5:
            gate.set()

    def long_step(n: int) -> None:
        events.append("long")

    jobs = [lambda: converse(engine, first, on_step=first_step),
            gated(gate, lambda: converse(engine, long_turn, on_step=long_step))]  # fmt: skip
    got = in_threads(jobs)
    assert [p.same() for p in got[0]] == [p.same() for p in expected[0]]
    assert [p.same() for p in got[1]] == [p.same() for p in expected[1]]
    positions = got[1][0].prefill_positions
    assert positions > 50
    # while the long turn prefilled (8 positions per iteration), the other row stepped every iteration
    at = events.index("long")
    assert events[at - math.ceil(positions / 8) + 1 : at] == ["first"] * (math.ceil(positions / 8) - 1)


# -- forced ends --------------------------------------------------------------------------


def frames(n: int, start: int = 0) -> list[list[int]]:
    return [[(start + i + k) % 2048 for k in range(8)] for i in range(n)]


EOA = [END_OF_AUDIO_CODE] * 8
FORCED = {
    "text_end_then_eoa": (GenerateMode.CHAT, [300, 301, TEXT_END, IM_END], [*frames(3), [END_OF_AUDIO_CODE] + [5] * 7]),
    "im_end": (GenerateMode.CHAT, [300, 301, IM_END], []),
    "interleaved_then_text_end": (GenerateMode.CHAT, [*range(300, 306), TEXT_END, IM_END], [*frames(14), EOA]),
    "synthesize": (GenerateMode.SYNTHESIZE, [AUDIO_START, IM_END], [*frames(3), EOA]),
    "transcribe": (GenerateMode.TRANSCRIBE, [300, 301, AUDIO_START], []),
}  # fmt: skip


def force_serial(
    monkeypatch: pytest.MonkeyPatch, backend: LFM2Backend, texts: list[int], codes: list[list[int]]
) -> None:
    """The package's samplers return these first, then sample as usual."""
    model = backend.model
    text_sampler, audio_sampler = model._sample_text_token, model._sample_audio_frame
    text_iter, frame_iter = iter(texts), iter(codes)

    def text(logits: torch.Tensor, **kw: Any) -> torch.Tensor:
        forced = next(text_iter, None)
        return text_sampler(logits, **kw) if forced is None else torch.tensor([forced])

    def audio(embedding: torch.Tensor, **kw: Any) -> torch.Tensor:
        forced = next(frame_iter, None)
        return audio_sampler(embedding, **kw) if forced is None else torch.tensor(forced)

    monkeypatch.setattr(model, "_sample_text_token", text)
    monkeypatch.setattr(model, "_sample_audio_frame", audio)


def force_batched(
    engine: Scheduler, ref: list[ConversationRef], texts: list[int], codes: list[list[int]]
) -> None:
    """The engine's heads return these first for the conversation in `ref` (other rows sample as usual)."""
    text_head, audio_head = engine.runner._sample_text, engine.runner._sample_audio
    text_iter, frame_iter = iter(texts), iter(codes)

    def mine(rows: Any) -> list[int]:
        return [i for i, row in enumerate(rows) if ref and row.state is ref[0].state]

    def text(rows: Any, logits: torch.Tensor) -> Any:
        tokens, bad = text_head(rows, logits)
        for i in mine(rows):
            forced = next(text_iter, None)
            if forced is not None:
                tokens[i] = forced
        return tokens, bad

    def audio(rows: Any, hidden: torch.Tensor) -> Any:
        out, bad = audio_head(rows, hidden)
        for i in mine(rows):
            forced = next(frame_iter, None)
            if forced is not None:
                out[i] = torch.tensor(forced)
        return out, bad

    engine.runner._sample_text, engine.runner._sample_audio = text, audio  # type: ignore[method-assign]


@pytest.mark.parametrize("case", list(FORCED))
def test_forced_ends_match_the_serial_loop(
    case: str, tiny_backend: LFM2Backend, batched: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    mode, texts, codes = FORCED[case]
    first = Turn("Say this", audio=noise(0.8, seed=4) if mode is GenerateMode.TRANSCRIBE else None)
    script = [first, Turn("Once more", max_new_tokens=10)]  # the next turn sees the ended response's history
    other = [Turn("Meanwhile, another conversation", max_new_tokens=40)]
    expected_other = alone(tiny_backend, other)
    with monkeypatch.context() as patch:
        force_serial(patch, tiny_backend, texts, codes)
        expected = alone(tiny_backend, script, mode)
    assert expected[0].reason is EndReason.END_OF_TURN
    engine = batched()
    ref: list[ConversationRef] = []
    force_batched(engine, ref, texts, codes)
    gate = threading.Event()
    got = in_threads([
        lambda: converse(engine, other, on_step=lambda n: gate.set() if n == 2 else None),
        gated(gate, lambda: converse(engine, script, mode, opened=ref)),
    ])  # fmt: skip
    assert [p.same() for p in got[1]] == [p.same() for p in expected]
    assert [p.same() for p in got[0]] == [p.same() for p in expected_other]


# -- failures -----------------------------------------------------------------------------


def test_a_prefill_error_fails_that_row_only(
    tiny_backend: LFM2Backend, batched: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    others = [[Turn("First conversation", max_new_tokens=30)], [Turn("Second one", max_new_tokens=20)]]
    failing = [Turn("FAIL please", max_new_tokens=20), Turn("Recovered?", max_new_tokens=15)]
    expected = [alone(tiny_backend, s) for s in others]
    conversation = tiny_backend.new_conversation("")  # the failed turn leaves the history as a stopped one would
    conversation.add_user_text("FAIL please")
    assert list(conversation.generate(GREEDY, stopped())) == [Finished(EndReason.STOPPED)]
    conversation.add_user_text("Recovered?")
    recovered = [s for s in conversation.generate(Sampling(0.0, 0, 0.0, 0, 15), threading.Event())][:-1]

    model = tiny_backend.model
    prefill = model._prefill
    failures = []

    def broken(**inputs: torch.Tensor) -> torch.Tensor:
        if not failures and "FAIL" in tiny_backend.processor.text.decode(inputs["text"][0].tolist()):
            failures.append(1)
            raise RuntimeError("encoder exploded")
        return prefill(**inputs)

    monkeypatch.setattr(model, "_prefill", broken)
    engine = batched()
    gate = threading.Event()
    got = in_threads([
        lambda: converse(engine, others[0], on_step=lambda n: gate.set() if n == 3 else None),
        gated(gate, lambda: converse(engine, others[1])),
        gated(gate, lambda: converse(engine, failing)),
    ])  # fmt: skip
    assert [p.same() for p in got[0]] == [p.same() for p in expected[0]]
    assert [p.same() for p in got[1]] == [p.same() for p in expected[1]]
    assert isinstance(got[2][0].error, RuntimeError) and got[2][0].values == []
    assert got[2][1].error is None
    assert got[2][1].values == [(s.token_id, tiny_backend.detokenize([s.token_id])) if isinstance(s, TextToken)
                                else tuple(int(c) for c in s.codes) for s in recovered]  # fmt: skip


def stopped() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


def test_a_decode_error_fails_that_row_only(
    tiny_backend: LFM2Backend, batched: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward that fails for one row's position: the batch is retried row
    by row, that row fails, the others go on as if nothing happened."""
    others = [[Turn("Short", max_new_tokens=30)], [Turn("Also short", max_new_tokens=25)]]
    failing = [Turn("A long history that no other conversation reaches " * 4, max_new_tokens=30)]
    expected = [alone(tiny_backend, s) for s in others]
    reference = alone(tiny_backend, failing)
    length = reference[0].prefill_positions
    assert all(p.prefill_positions + 30 < length for s in expected for p in s)
    lfm = tiny_backend.model.lfm
    forward = lfm.forward

    def broken(*args: Any, **kwargs: Any) -> Any:
        positions = kwargs.get("position_ids")
        if positions is not None and positions.shape[1] == 1 and bool((positions == length + 5).any()):
            raise RuntimeError("device fault")
        return forward(*args, **kwargs)

    monkeypatch.setattr(lfm, "forward", broken)
    engine = batched()
    gate = threading.Event()
    got = in_threads([
        lambda: converse(engine, others[0], on_step=lambda n: gate.set() if n == 2 else None),
        gated(gate, lambda: converse(engine, others[1])),
        gated(gate, lambda: converse(engine, failing)),
    ])  # fmt: skip
    assert [p.same() for p in got[0]] == [p.same() for p in expected[0]]
    assert [p.same() for p in got[1]] == [p.same() for p in expected[1]]
    assert isinstance(got[2][0].error, RuntimeError)
    assert got[2][0].values == reference[0].values[:6]  # steps 1-6 came from positions before the faulty one


# -- the engine's contract ------------------------------------------------------------


def test_edits_wait_for_the_request_and_close_stops_everything(
    tiny_backend: LFM2Backend, batched: Callable[..., Scheduler]
) -> None:
    engine = batched(max_batch=1)
    a, b = engine.open(""), engine.open("")
    long = Sampling(0.0, 0, 0.0, 0, 10_000)
    running = threading.Event()
    sink_a, sink_b = Sink(on_step=lambda n: running.set() if n == 3 else None), Sink()
    engine.submit(GenerationRequest(a, UserTurn(text="Hello"), long), sink_a)
    engine.submit(GenerationRequest(b, UserTurn(text="Waiting"), long), sink_b)  # no place: waits
    after = engine.edit(a, lambda c: len(sink_a.items))  # runs only once a's request has ended
    engine.release(b)  # after b's request: that still ends
    assert running.wait(WAIT_S)
    assert not after.done() and engine.stats.waiting == 1 and engine.stats.running == 1
    assert engine.close(30)
    assert sink_a.wait().reason is EndReason.STOPPED and len(sink_a.items) > 0
    assert sink_b.wait().reason is EndReason.STOPPED and sink_b.items == []
    assert sink_a.finished_calls == sink_b.finished_calls == 1
    with pytest.raises(RuntimeError):
        after.result(10)  # the engine closed before it could run
    with pytest.raises(RuntimeError, match="closed"):
        engine.open("")
    refused = Sink()
    engine.submit(GenerationRequest(a, UserTurn(text="x"), long), refused)
    assert isinstance(refused.wait().error, RuntimeError) and refused.finished_calls == 1
    with pytest.raises(RuntimeError):
        engine.edit(a, lambda c: None).result(10)


def test_released_conversations_refuse_work_and_edits_keep_order(
    tiny_backend: LFM2Backend, batched: Callable[..., Scheduler]
) -> None:
    engine = batched()
    ref = engine.open("")
    sink = Sink()
    engine.submit(GenerationRequest(ref, UserTurn(text="Hi"), Sampling(0.0, 0, 0.0, 0, 12)), sink)
    assert engine.edit(ref, lambda c: len(sink.items)).result(WAIT_S) == 12  # after the request, in order
    assert engine.edit(ref, lambda c: 1 / 0).exception(WAIT_S).__class__ is ZeroDivisionError
    engine.release(ref)
    refused = Sink()
    engine.submit(GenerationRequest(ref, UserTurn(text="again"), GREEDY), refused)
    assert isinstance(refused.wait().error, RuntimeError) and refused.items == []
    with pytest.raises(RuntimeError, match="released"):
        engine.edit(ref, lambda c: None).result(10)


def test_an_aborted_waiting_request_ends_without_a_place(
    tiny_backend: LFM2Backend, batched: Callable[..., Scheduler]
) -> None:
    engine = batched(max_batch=1)
    a, b = engine.open(""), engine.open("")
    gate = threading.Event()
    sink_a = Sink(on_step=lambda n: gate.set() if n == 2 else None)
    handle_a = engine.submit(GenerationRequest(a, UserTurn(text="Busy"), Sampling(0.0, 0, 0.0, 0, 10_000)), sink_a)
    assert gate.wait(WAIT_S)
    sink_b = Sink()
    engine.submit(GenerationRequest(b, UserTurn(text="Never mind"), GREEDY), sink_b).abort()
    assert sink_b.wait().reason is EndReason.STOPPED and sink_b.items == []
    assert not sink_a.done.is_set()  # b ended while a kept its place
    handle_a.abort()
    assert sink_a.wait().reason is EndReason.STOPPED


def test_a_paused_row_keeps_its_place_and_committed_turns_go_first(
    tiny_backend: LFM2Backend, batched: Callable[..., Scheduler]
) -> None:
    """A paused row is skipped (the others step on) but keeps its place among
    speculative requests; a committed request is admitted before a speculative
    one that came first, and takes the place of a paused speculative row when
    the batch is full; pausing changes nothing in what a row generates."""
    script = Turn("Speculate on this", max_new_tokens=20)
    (expected,) = alone(tiny_backend, [script])
    engine = batched(max_batch=2)
    refs = [engine.open("") for _ in range(4)]
    order: list[str] = []  # started calls, on the engine thread

    class Named(Sink):
        def __init__(self, name: str, **kw: Any) -> None:
            super().__init__(**kw)
            self.name = name

        def started(self, ts_ms: float) -> None:
            order.append(self.name)
            super().started(ts_ms)

    paused = threading.Event()
    spec_sink = Named("speculative", on_step=lambda n: (spec.pause(), paused.set()) if n == 4 else None)
    request = GenerationRequest(refs[0], UserTurn(text=script.text), Sampling(0.0, 0, 0.0, 0, 20), speculative=True)
    spec = engine.submit(request, spec_sink)
    target: list[int] = []
    went_on = threading.Event()
    busy = Named("busy", on_step=lambda n: went_on.set() if target and n >= target[0] else None)
    busy_handle = engine.submit(
        GenerationRequest(refs[1], UserTurn(text="Busy"), Sampling(0.0, 0, 0.0, 0, 10_000)), busy
    )
    assert paused.wait(WAIT_S)
    late_spec = Named("late speculative")
    late = engine.submit(GenerationRequest(refs[2], UserTurn(text="Maybe"), GREEDY, speculative=True), late_spec)
    target.append(len(busy.items) + 10)
    assert went_on.wait(WAIT_S)
    assert len(spec_sink.items) == 4  # held at its place while the busy row went on
    assert engine.stats.waiting == 1  # a speculative request does not take a paused one's place
    spec.promote()  # its turn was committed: it goes on (and no longer pauses at its first audio)
    spec_sink.wait()
    assert spec_sink.values == expected.values and spec_sink.reason is EndReason.MAX_TOKENS
    late.promote()  # else it waits, paused at its first audio, for a commit
    late_spec.wait()
    # a committed turn with the batch full of a busy row and a paused speculation: the speculation gives way
    again = Named("paused again", on_step=lambda n: (again_handle[0].pause(), again_paused.set()) if n == 2 else None)
    again_paused = threading.Event()
    again_handle = [engine.submit(GenerationRequest(refs[0], UserTurn(text="Again"), GREEDY, speculative=True), again)]
    assert again_paused.wait(WAIT_S)
    committed = Named("committed")
    engine.submit(GenerationRequest(refs[3], UserTurn(text="Sure"), GREEDY), committed)
    committed.wait()
    assert again.wait().reason is EndReason.STOPPED and len(again.items) == 2
    busy_handle.abort()
    assert sorted(order[:2]) == ["busy", "speculative"]
    assert order[2:] == ["late speculative", "paused again", "committed"]


def test_a_speculative_turn_undone_through_edits(
    tiny_backend: LFM2Backend, batched: Callable[..., Scheduler]
) -> None:
    committed = [Turn("Hello there", max_new_tokens=12), Turn(audio=noise(1.0, seed=6), max_new_tokens=16)]
    expected = alone(tiny_backend, committed)
    engine = batched()
    ref = engine.open("")
    first = Sink()
    engine.submit(GenerationRequest(ref, UserTurn(text="Hello there"), Sampling(0.0, 0, 0.0, 0, 12)), first)
    engine.edit(ref, lambda c: c.record_response(AssistantTurn(list(first.wait().items)))).result(WAIT_S)
    snapshot = engine.edit(ref, lambda c: c.snapshot()).result(WAIT_S)
    guess = Sink(abort_after=5)
    guess.set_handle(
        engine.submit(GenerationRequest(ref, UserTurn(noise(0.5, seed=6)), GREEDY, speculative=True), guess)
    )
    engine.edit(ref, lambda c: c.restore(snapshot)).result(WAIT_S)
    assert guess.wait().reason is EndReason.STOPPED
    second = Sink()
    engine.submit(GenerationRequest(ref, UserTurn(noise(1.0, seed=6)), Sampling(0.0, 0, 0.0, 0, 16)), second)
    assert second.wait().values == expected[1].values
    assert engine.edit(ref, lambda c: c.last_prefill_positions).result(WAIT_S) == expected[1].prefill_positions


# -- the batched heads ---------------------------------------------------------------------


def test_batched_depthformer_equals_the_package_row_for_row(tiny_backend: LFM2Backend) -> None:
    model = tiny_backend.model
    hidden = torch.randn(5, model.lfm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        frames_out, ok = sample_frames(model, hidden, [(None, None)] * 5)
        single = [model._sample_audio_frame(h) for h in hidden]
    assert ok.all() and frames_out.tolist() == [f.tolist() for f in single]


def test_sample_rows_follows_each_rows_parameters() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0, 1.0]] * 3 + [[float("nan")] * 5])
    params = [(None, None), (1.0, 2), (50.0, 1_000), (1.0, 2)]
    seen: list[set[int]] = [set() for _ in params]
    torch.manual_seed(0)
    for _ in range(200):
        tokens, ok = sample_rows(logits.clone(), params)
        assert ok.tolist() == [True, True, True, False]  # non-finite probabilities fail that row only
        for i, token in enumerate(tokens.tolist()):
            seen[i].add(token)
    assert seen[0] == {1}  # greedy
    assert seen[1] == {1, 2}  # top-2
    assert seen[2] == {0, 1, 2, 3, 4}  # hot and wide: everything


# -- the benchmark script --------------------------------------------------------------------


def test_engine_bench_runs_on_the_tiny_model(tiny_dir: Path, tmp_path: Path) -> None:
    from bench import engine as bench

    out = tmp_path / "engine.json"
    assert bench.main(["--model", str(tiny_dir), "--dtype", "fp32", "--concurrency", "1,3", "--steps", "10",
                       "--decode", "2", "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    points = {(p["engine"], p["conversations"]): p for p in report["points"]}
    assert set(points) == {("serial", 1), ("batched", 1), ("serial", 3), ("batched", 3)}
    for point in points.values():
        assert point["aggregate_steps_per_s"] > 0 and point["first_audio_ms_p50"] > 0
    assert points[("batched", 3)]["rows_per_step"] > 1  # the three conversations shared steps
    assert report["decode"][0]["audio_s_per_s"] > 0
    assert bench.main(["--model", str(tiny_dir), "--check", "--steps", "10"]) == 0


# -- waiting for the device ---------------------------------------------------------------------

SYNCS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


def test_a_decode_step_waits_for_the_device_at_most_once(
    batched: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU every device-to-host read stalls the step until the device is
    done. On the CPU stand-in the same reads are counted: each tensor method
    that would wait (`.item()`, `.tolist()`, `.cpu()`, truth values, ...),
    called on the engine thread during a step's forward and sampling, for
    rows that mix text and audio, greedy and sampled."""
    engine = batched(max_batch=4)
    state = threading.local()
    per_step: list[int] = []

    def counting(name: str) -> Callable[..., Any]:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if getattr(state, "counting", False):
                state.syncs += 1
            return original(self, *args, **kwargs)

        return wrapper

    def step(method: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def wrapped(rows: Any) -> Any:
            state.syncs = 0
            state.counting = True
            try:
                outs = method(rows)
            finally:
                state.counting = False
            per_step.append(state.syncs)
            return outs

        return wrapped

    engine.runner.step = step(engine.runner.step)  # type: ignore[method-assign]
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    refs = [engine.open("", GenerateMode.CHAT) for _ in range(3)]
    sinks = []
    for i, ref in enumerate(refs):
        sink = Sink(None, None)
        temperature = 0.0 if i == 0 else 0.8  # one greedy row, two sampled
        sampling = Sampling(temperature, 4, temperature, 4, 24)
        sink.set_handle(engine.submit(GenerationRequest(ref, UserTurn(None, 16_000, f"turn {i}"), sampling), sink))
        sinks.append(sink)
    for sink in sinks:
        sink.wait()
        assert sink.error is None
    for ref in refs:
        engine.release(ref)
    assert len(per_step) >= 20
    assert max(per_step) <= 1, f"device waits per step: {per_step}"


def test_a_suspended_row_resumes_exactly_where_it_stopped(
    tiny_backend: LFM2Backend, batched: Callable[..., Scheduler]
) -> None:
    """A committed turn that finds the only place held takes it; the response
    that held it is suspended (its cache stored in the conversation, its slot
    freed) and resumes later from the same step: token for token what it
    generates alone, and so is the turn that took its place."""
    long, short = Turn("Tell me a long story", max_new_tokens=40), Turn("Hi", max_new_tokens=8)
    (expected_long,) = alone(tiny_backend, [long])
    (expected_short,) = alone(tiny_backend, [short])
    engine = batched(max_batch=1)
    engine.preempt_after_s = 0.0
    started = threading.Event()
    sink_long = Sink(on_step=lambda n: started.set() if n == 10 else None)
    sink_long.set_handle(engine.submit(
        GenerationRequest(engine.open(""), UserTurn(text=long.text), Sampling(0.0, 0, 0.0, 0, 40), owner="A"),
        sink_long))  # fmt: skip
    assert started.wait(WAIT_S)
    long_steps_then: list[int] = []

    class Short(Sink):
        def finished(self, reason: EndReason | None, error: BaseException | None) -> None:  # engine thread
            long_steps_then.append(len(sink_long.items))
            super().finished(reason, error)

    sink_short = Short()
    engine.submit(
        GenerationRequest(engine.open(""), UserTurn(text=short.text), Sampling(0.0, 0, 0.0, 0, 8), owner="B"),
        sink_short,
    )
    assert sink_short.wait().values == expected_short.values
    assert long_steps_then[0] < 40  # the short turn did not wait for the long one to end
    assert sink_long.wait().values == expected_long.values
    assert engine.stats.suspended >= 1

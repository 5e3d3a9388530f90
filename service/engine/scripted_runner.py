"""The scripted backend's runner: the deterministic stand-in, stepped in batches.

Every row's answer comes from `ScriptedConversation.script` (the same steps the
backend yields alone). A prefill costs the backend's `prefill_ms` once per
iteration that prefills (whatever the rows), and a step its `step_ms` once for
the whole batch, as one forward of a batched model does: so the server tests
run the shipping scheduler at a model's cadence, with no torch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from service.backends.base import Finished, Step, TextToken
from service.backends.scripted import ScriptedBackend, ScriptedConversation
from service.engine.api import FatalEngineError, TextStream
from service.engine.runner import Row, Runner, StepOut


class _Answer:
    def __init__(self, steps: Iterator[Step], text: TextStream, fatal: bool = False) -> None:
        self.steps, self.text, self.fatal = steps, text, fatal
        self.next: Step | None = None  # looked ahead: the end comes with the last step, not a step later


class ScriptedRunner(Runner):
    def __init__(self, backend: ScriptedBackend) -> None:
        self.backend = backend
        self._scripted = backend

    def start(self, row: Row) -> bool:
        state = row.state
        assert isinstance(state, ScriptedConversation)
        user = row.request.user
        if user.audio is not None and len(user.audio):
            state.add_user_audio(user.audio, user.audio_rate)
        if user.text:
            state.add_user_text(user.text)
        fatal = "#fatal" in user.text
        state._flush_pending()
        steps = state.script(row.request.sampling, threading.Event(), paced=False)  # the scheduler stops rows
        row.model = _Answer(steps, TextStream(self.backend.detokenize), fatal)
        return row.request.sampling.max_new_tokens > 0

    def prefill(self, rows: list[Row], budget: float) -> list[tuple[Row, BaseException | None]]:
        if self._scripted.prefill_s:
            time.sleep(self._scripted.prefill_s)
        return [(row, None) for row in rows]

    def step(self, rows: list[Row]) -> list[StepOut]:
        if self._scripted.step_s:
            time.sleep(self._scripted.step_s)
        outs = []
        if any(row.model.fatal for row in rows):
            raise FatalEngineError("scripted model failure (#fatal directive)")
        for row in rows:
            answer: _Answer = row.model
            out = StepOut(row)
            try:
                step = answer.next or next(answer.steps)
                answer.next = None
                if isinstance(step, Finished):
                    out.end = step.reason
                else:
                    out.item = (
                        TextToken(step.token_id, answer.text.push(step.token_id))
                        if isinstance(step, TextToken)
                        else step
                    )
                    answer.next = next(answer.steps)
                    if isinstance(answer.next, Finished):
                        out.end = answer.next.reason
            except Exception as exc:  # noqa: BLE001 - the #fail directive: fails this row only
                out.error = exc
            outs.append(out)
        return outs

    def can_suspend(self, row: Row) -> bool:
        return True

    def suspend(self, row: Row) -> None:
        pass  # the answer's iterator is the whole state

    def resume(self, row: Row) -> None:
        pass

    def remove(self, row: Row, keep_cache: bool) -> None:
        row.model = None

"""What the scheduler asks of a model: the runner protocol.

The scheduler (`service.engine.scheduler`) decides which requests hold a row of
the batch and when; a runner does the model's work for those rows, on the
engine thread, in three calls per iteration:

* `start(row)`: the request got its row: add its user turn to the
  conversation's history and open the response;
* `prefill(rows, budget)`: run at most `budget` positions of the rows' new
  history (the rows in the scheduler's order); return the rows whose prefill
  finished (they decode from the next step on) or failed;
* `step(rows)`: one model step for every decoding row given: one batched
  forward and the heads; return one `StepOut` per row.

`remove(row, keep_cache)` takes a row out of the batch (finished, failed or
stopped). The runner owns every conversation's model state (`open` creates it)
and whatever batched buffers its model needs; the scheduler never looks inside.
Implementations: `service.engine.lfm2_runner.LFM2Runner` and
`service.engine.scripted_runner.ScriptedRunner`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from service.backends.base import AudioFrame, Backend, Conversation, EndReason, TextToken
from service.engine.api import ConversationRef, RequestHandle, StepSink


class Row:
    """A request with its place in the batch. `model` is the runner's own per-row state."""

    def __init__(self, ref: ConversationRef, handle: RequestHandle, sink: StepSink) -> None:
        self.ref, self.handle, self.sink = ref, handle, sink
        self.request = handle.request
        self.model: Any = None
        self.audio_frames = 0  # audio frames delivered (a speculative row pauses at its first)
        self.placed_at = 0.0  # monotonic time it got (or got back) its place
        self.fork: object = None  # a speculation's trunk (the conversation's snapshot before it)

    @property
    def state(self) -> Conversation:
        assert self.ref.state is not None
        return self.ref.state

    def __repr__(self) -> str:
        return f"Row({self.ref!r})"


@dataclass(slots=True)
class StepOut:
    """One row's result of a step: a step to deliver, an end, or both (a final step then its end)."""

    row: Row
    item: TextToken | AudioFrame | None = None
    end: EndReason | None = None
    error: BaseException | None = None


class Runner(ABC):
    """A model's side of the engine. Every method runs on the engine thread."""

    backend: Backend

    def open(self, ref: ConversationRef) -> Conversation:
        return self.backend.new_conversation(ref.system_prompt, ref.mode)

    @contextlib.contextmanager
    def engine_thread(self) -> Iterator[None]:
        """Held by the engine thread for its whole life (a grad mode is per thread)."""
        yield

    @contextlib.contextmanager
    def iteration(self) -> Iterator[None]:
        """Held around one iteration's prefill and step (a lock, a grad mode)."""
        yield

    @contextlib.contextmanager
    def editing(self) -> Iterator[None]:
        """Held around a history edit."""
        yield

    @abstractmethod
    def start(self, row: Row) -> bool:
        """Add the row's user turn and open its response; False when the
        response may take no step at all (max_new_tokens 0). Raises to fail it."""

    @abstractmethod
    def prefill(self, rows: list[Row], budget: float) -> list[tuple[Row, BaseException | None]]:
        """Prefill up to `budget` positions over `rows`, in order."""

    @abstractmethod
    def step(self, rows: list[Row]) -> list[StepOut]:
        """One step for every row in `rows` (decoding, not paused)."""

    @abstractmethod
    def remove(self, row: Row, keep_cache: bool) -> None:
        """Take `row` out of the batch; keep its conversation's cache or reset it."""

    def can_suspend(self, row: Row) -> bool:
        """Whether a decoding row can give its place up and resume later (`suspend`/`resume`)."""
        return False

    def suspend(self, row: Row) -> None:
        """Take a decoding row out of the batch, keeping what it needs to go on."""
        raise NotImplementedError

    def resume(self, row: Row) -> None:
        """Put a suspended row back into the batch, decoding from where it stopped."""
        raise NotImplementedError

    def prefill_budget(self) -> float:
        """Positions to prefill in an iteration while rows decode."""
        return float("inf")

    def idle(self) -> None:  # noqa: B027 - optional hook
        """No row decodes: give memory back."""

    def fits(self, row: Row) -> str | None:
        """Why the row's conversation cannot take another response (None: it can)."""
        return None

    def warm_up(self) -> None:  # noqa: B027 - optional hook
        """Run the batched path once before serving."""

"""The engine's interface: what the pipeline submits and what it gets back.

The pipeline never drives a model itself. It opens conversations, submits
generation requests and history edits to the process's `Engine`, and receives
each request's steps through a `StepSink`. Every engine keeps these rules:

* One thread at a time touches a conversation's model state (its history and
  cache), and a conversation's operations (open, edits, generations) take
  effect in the order they were submitted. An edit submitted after a request
  applies after that request has finished.
* Sinks are called on the engine thread and must not block: the pipeline's
  sink hands everything to the event loop with `call_soon_threadsafe`.
* `RequestHandle.abort()` is thread-safe and idempotent; the request finishes
  with `EndReason.STOPPED` at its next model step.
* A failure fails that request only (`finished(None, error)`), never the
  engine; nothing a request does can stall the others for more than a step.
  Only a `FatalEngineError` (the model can no longer run) stops the engine:
  every request then finishes with it, and the server goes NOT_SERVING and exits.

The one implementation is `service.engine.scheduler.Scheduler`.
"""

from __future__ import annotations

import concurrent.futures
import enum
import itertools
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from service.backends.base import (
    AudioFrame,
    Backend,
    Conversation,
    EndReason,
    GenerateMode,
    Sampling,
    TextToken,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UserTurn:
    """What the user said in the turn a request answers (either may be empty)."""

    audio: np.ndarray | None = None  # mono float32 in [-1, 1] at `audio_rate`
    audio_rate: int = 16_000
    text: str = ""


class ConversationRef:
    """A handle on one conversation whose model state lives in an engine.

    The pipeline only holds this handle; the `Conversation` inside is created,
    read and changed on engine threads only."""

    _ids = itertools.count(1)

    def __init__(self, system_prompt: str, mode: GenerateMode) -> None:
        self.id = next(self._ids)
        self.system_prompt = system_prompt
        self.mode = mode
        self.state: Conversation | None = None  # engine-owned; None until the engine created it

    def __repr__(self) -> str:
        return f"ConversationRef({self.id}, {self.mode.value})"


class Priority(enum.IntEnum):
    """The scheduler's classes, served in this order (round robin across owners within one)."""

    TURN = 0  # a committed turn: a user waits for its first audio
    TRANSCRIPTION = 1  # the text of a committed turn (a conversation in TRANSCRIBE mode)
    SPECULATIVE = 2  # started before its turn was committed; may give its place up


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Close the user turn `user` and generate the assistant's answer."""

    conversation: ConversationRef
    user: UserTurn
    sampling: Sampling
    # started before the turn was committed: it runs only on spare capacity,
    # pauses itself at its first audio frame and gives its place up to a
    # committed turn (`RequestHandle.promote()` makes it a committed turn)
    speculative: bool = False
    # whose request it is (a session's id): the scheduler shares the model
    # round robin across owners and caps what one owner may queue
    owner: str = ""
    # a speculative request pauses itself once it generated this many audio frames: what the
    # first audio chunk needs, so that a commit releases audio at once
    hold_at_frames: int = 1

    @property
    def priority(self) -> Priority:
        if self.speculative:
            return Priority.SPECULATIVE
        if self.conversation.mode is GenerateMode.TRANSCRIBE:
            return Priority.TRANSCRIPTION
        return Priority.TURN


class StepSink(Protocol):
    """Receives one request's output. Called on an engine thread; must not block."""

    def started(self, ts_ms: float) -> None:
        """The request got the model (its prefill begins)."""

    def steps(self, items: Sequence[TextToken | AudioFrame], ts_ms: float) -> None:
        """New steps, in generation order. A TextToken's `text` is the text it
        adds (already detokenized; empty while a UTF-8 character is incomplete)."""

    def finished(self, reason: EndReason | None, error: BaseException | None) -> None:
        """The last call: how generation ended, or the error that failed it."""


class RequestHandle:
    """A submitted request; `abort()` stops it at its next step.

    `pause()` holds it before its next step without giving up its place (a
    speculative response waits for its commit this way) until `resume()`;
    engines skip paused requests' rows. All methods are thread-safe."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.priority = request.priority  # SPECULATIVE until promote()
        self.stop = threading.Event()
        self._cond = threading.Condition()
        self._paused = False

    def promote(self) -> None:
        """The speculative request's turn was committed: it becomes a committed
        turn (its class and its claim on a place) and goes on."""
        with self._cond:
            if self.priority is Priority.SPECULATIVE:
                self.priority = Priority.TURN
        self.resume()

    def drop_speculation(self) -> bool:
        """Abort a request that is still speculative, in one step with the check (see
        `hold_speculation`); True if aborted."""
        with self._cond:
            if self.priority is not Priority.SPECULATIVE:
                return False
            self.stop.set()
        self.abort()  # idempotent: wakes whoever waits on the handle
        return True

    def hold_speculation(self) -> bool:
        """Pause a request that is still speculative (its first audio is ready), in one
        step with the check, so a `promote()` on another thread is never undone; True if paused."""
        with self._cond:
            if self.priority is not Priority.SPECULATIVE or self.stop.is_set():
                return False
            self._paused = True
            return True

    def abort(self) -> None:
        with self._cond:
            self.stop.set()
            self._cond.notify_all()

    @property
    def aborted(self) -> bool:
        return self.stop.is_set()

    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused and not self.stop.is_set()

    def wait_while_paused(self) -> None:
        """Block the calling engine thread while paused (returns at once on abort)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._paused or self.stop.is_set())


@dataclass
class EngineStats:
    """Counters an engine keeps (read without locking: approximate by design)."""

    steps: int = 0  # model steps (one batched forward counts once)
    rows: int = 0  # rows advanced, summed over steps
    waiting: int = 0  # requests waiting for a place in the batch now
    running: int = 0  # requests generating now
    suspended: int = 0  # committed responses that gave their place up to a waiting turn, so far
    speculative: int = 0  # speculative requests that got a place, so far


class TextStream:
    """Incremental detokenization on the engine side: token ids in, text out.

    A token that leaves a UTF-8 character incomplete yields "" and is held
    until the character is whole, so no text delta ever splits a character."""

    def __init__(self, detokenize: Callable[[Sequence[int]], str]) -> None:
        self._detokenize = detokenize
        self._held: list[int] = []

    def push(self, token_id: int) -> str:
        self._held.append(token_id)
        text = self._detokenize(self._held)
        if text.endswith("\ufffd"):
            return ""
        self._held = []
        return text


class FatalEngineError(Exception):
    """The model can no longer run (a device error): the engine stops and reports it."""


class EngineBusy(Exception):
    """A request or edit refused by the engine's caps; the message says which."""


class Engine(ABC):
    """Runs every conversation of a process on one backend's model."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.stats = EngineStats()

    @property
    def failure(self) -> BaseException | None:
        """Why the engine stopped for good (None while it runs)."""
        return None

    @property
    def name(self) -> str:
        return type(self).__name__

    def start(self) -> None:  # noqa: B027 - optional hook
        """Start engine threads (after the backend has loaded)."""

    @abstractmethod
    def open(self, system_prompt: str, mode: GenerateMode = GenerateMode.CHAT) -> ConversationRef:
        """A new conversation. Returns at once; the model-side state is
        created on an engine thread before the conversation's first operation."""

    @abstractmethod
    def submit(self, request: GenerationRequest, sink: StepSink) -> RequestHandle:
        """Queue a generation. Never blocks; a request beyond the engine's
        capacity waits in FIFO order (it is never refused for that)."""

    @abstractmethod
    def edit(
        self, conversation: ConversationRef, op: Callable[[Conversation], T], coalesce: str | None = None
    ) -> concurrent.futures.Future[T]:
        """Apply `op` to the conversation's state on the engine's thread, after
        everything submitted for it before; the future has its result or error.
        An edit with a `coalesce` key replaces a queued, not yet applied edit of
        the conversation with the same key (whose future then gets this one's outcome)."""

    @abstractmethod
    def release(self, conversation: ConversationRef) -> None:
        """Forget a conversation and free its model state (after its queued work)."""

    @abstractmethod
    def close(self, timeout: float) -> bool:
        """Abort everything, stop accepting work and wait up to `timeout`
        seconds for the engine's threads; True when they all stopped. The
        caller closes the backend only after this."""

"""The model engine: the one way the service runs a backend's model.

The pipeline never drives a model itself. It opens conversations, submits
generation requests and history edits to the process's `Engine`, and receives
each request's steps through a `StepSink`. Every engine keeps these rules:

* One thread at a time touches a conversation's model state (its history and
  cache), and a conversation's operations (open, edits, generations) take
  effect in the order they were submitted. An edit submitted after a request
  applies after that request has finished.
* Sinks are called on engine threads and must not block: the pipeline's sink
  hands everything to the event loop with `call_soon_threadsafe`.
* `RequestHandle.abort()` is thread-safe and idempotent; the request finishes
  with `EndReason.STOPPED` at its next model step.
* A failure fails that request only (`finished(None, error)`), never the
  engine; nothing a request does can stall the others for more than a step.

Two implementations:

* `ThreadedEngine` (here, for every backend): each conversation is a lane of
  jobs run in order on a shared thread pool; a generation is one job that
  iterates the backend's `Conversation.generate`. With LFM2 the responses then
  take the model in turns, step by step (the serial engine).
* `BatchedLFM2Engine` (`service.backends.lfm2_engine`): one engine thread owns
  the model and advances every generating conversation in one batched forward.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from service.backends.base import (
    AudioFrame,
    Backend,
    Conversation,
    EndReason,
    Finished,
    GenerateMode,
    Sampling,
    TextToken,
)
from service.clock import now_ms

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


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Close the user turn `user` and generate the assistant's answer."""

    conversation: ConversationRef
    user: UserTurn
    sampling: Sampling
    # started before the turn was committed: an engine admits committed
    # requests first, so speculation never delays a committed response
    speculative: bool = False


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
        self.stop = threading.Event()
        self._cond = threading.Condition()
        self._paused = False

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


class Engine(ABC):
    """Runs every conversation of a process on one backend's model."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.stats = EngineStats()

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
    def edit(self, conversation: ConversationRef, op: Callable[[Conversation], T]) -> concurrent.futures.Future[T]:
        """Apply `op` to the conversation's state on the engine's thread, after
        everything submitted for it before; the future has its result or error."""

    @abstractmethod
    def release(self, conversation: ConversationRef) -> None:
        """Forget a conversation and free its model state (after its queued work)."""

    @abstractmethod
    def close(self, timeout: float) -> bool:
        """Abort everything, stop accepting work and wait up to `timeout`
        seconds for the engine's threads; True when they all stopped. The
        caller closes the backend only after this."""


def run_generation(
    backend: Backend, state: Conversation, request: GenerationRequest, handle: RequestHandle, sink: StepSink
) -> None:
    """Serve one request by iterating `state.generate` in this thread."""
    end: EndReason | None = None
    error: BaseException | None = None
    try:
        sink.started(now_ms())
        text = TextStream(backend.detokenize)
        user = request.user
        if user.audio is not None and len(user.audio):
            state.add_user_audio(user.audio, user.audio_rate)
        if user.text:
            state.add_user_text(user.text)
        for step in state.generate(request.sampling, handle.stop):
            handle.wait_while_paused()
            if isinstance(step, Finished):
                end = step.reason
                break
            if isinstance(step, TextToken):
                step = TextToken(step.token_id, text.push(step.token_id))
            sink.steps((step,), now_ms())
    except Exception as exc:  # noqa: BLE001 - a model failure fails this request only; the sink reports it
        error = exc
    finally:
        sink.finished(end, error)


class _Lane:
    """Runs one conversation's jobs in submission order, one at a time, on a shared pool."""

    def __init__(self, pool: concurrent.futures.Executor) -> None:
        self._pool = pool
        self._jobs: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._running = False

    def run(self, job: Callable[[], None]) -> bool:
        """Queue `job`; False when the pool no longer takes work (shutdown)."""
        with self._lock:
            self._jobs.append(job)
            if self._running:
                return True
            self._running = True
        try:
            self._pool.submit(self._drain)
        except RuntimeError:  # the engine was closed
            with self._lock:
                self._jobs.clear()
                self._running = False
            return False
        return True

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._running = False
                    return
                job = self._jobs.popleft()
            job()  # jobs report through futures and sinks; they never raise


class ThreadedEngine(Engine):
    """Each conversation a lane of jobs on a shared thread pool.

    A generation occupies one pool thread for the whole response and drives
    the backend's synchronous `Conversation.generate`; concurrency between
    conversations is whatever the backend allows (LFM2 takes the model in
    turns per step)."""

    def __init__(self, backend: Backend, workers: int) -> None:
        super().__init__(backend)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="engine")
        self._lanes: dict[int, _Lane] = {}
        self._handles: set[RequestHandle] = set()
        # queued work not started yet: close() answers what the pool will never run
        self._queued: dict[RequestHandle, StepSink] = {}
        self._queued_edits: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def name(self) -> str:
        return "serial"

    def _lane(self, conversation: ConversationRef) -> _Lane | None:
        with self._lock:
            return None if self._closed else self._lanes.get(conversation.id)

    def open(self, system_prompt: str, mode: GenerateMode = GenerateMode.CHAT) -> ConversationRef:
        ref = ConversationRef(system_prompt, mode)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._lanes[ref.id] = lane = _Lane(self._pool)

        def create() -> None:
            try:
                ref.state = self.backend.new_conversation(system_prompt, mode)
            except Exception:  # noqa: BLE001 - later operations on the conversation report it
                log.exception("cannot create %r", ref)

        lane.run(create)
        return ref

    def submit(self, request: GenerationRequest, sink: StepSink) -> RequestHandle:
        handle = RequestHandle(request)
        lane = self._lane(request.conversation)
        if lane is None:
            sink.finished(None, RuntimeError("the engine is closed or the conversation was released"))
            return handle
        with self._lock:
            self._handles.add(handle)
            self._queued[handle] = sink
            self.stats.waiting += 1

        def generate() -> None:
            with self._lock:
                if self._queued.pop(handle, None) is None:
                    return  # close() already finished it
                self.stats.waiting -= 1
                self.stats.running += 1
            try:
                state = request.conversation.state
                if state is None:
                    sink.started(now_ms())
                    sink.finished(None, RuntimeError("the conversation could not be created"))
                    return
                run_generation(self.backend, state, request, handle, _Counting(sink, self.stats))
            finally:
                with self._lock:
                    self.stats.running -= 1
                    self._handles.discard(handle)

        if not lane.run(generate):
            with self._lock:
                queued = self._queued.pop(handle, None) is not None
            if queued:
                sink.finished(None, RuntimeError("the engine is closed"))
        return handle

    def edit(self, conversation: ConversationRef, op: Callable[[Conversation], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        lane = self._lane(conversation)
        if lane is None:
            future.set_exception(RuntimeError("the engine is closed or the conversation was released"))
            return future

        with self._lock:
            self._queued_edits.add(future)

        def apply() -> None:
            with self._lock:
                self._queued_edits.discard(future)
                if future.done() or not future.set_running_or_notify_cancel():
                    return  # close() answered it, or the caller cancelled it
            try:
                state = conversation.state
                if state is None:
                    raise RuntimeError("the conversation could not be created")
                future.set_result(op(state))
            except Exception as exc:  # noqa: BLE001 - delivered to the caller through the future
                future.set_exception(exc)

        if not lane.run(apply):
            with self._lock:
                self._queued_edits.discard(future)
                if not future.done():
                    future.set_exception(RuntimeError("the engine is closed"))
        return future

    def release(self, conversation: ConversationRef) -> None:
        with self._lock:
            lane = self._lanes.pop(conversation.id, None)
        if lane is not None:
            lane.run(lambda: setattr(conversation, "state", None))

    def close(self, timeout: float) -> bool:
        with self._lock:
            self._closed = True
            handles = list(self._handles)
        for handle in handles:
            handle.abort()
        done = threading.Event()

        def shutdown() -> None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            done.set()

        threading.Thread(target=shutdown, name="engine-shutdown", daemon=True).start()
        stopped = done.wait(timeout)
        if not stopped:
            log.warning("engine threads still busy after %.1f s", timeout)
        # what the pool dropped unstarted still gets its answer, as with the batched engine
        with self._lock:
            queued, self._queued = list(self._queued.values()), {}
            edits = [f for f in self._queued_edits if not f.done() and not f.running()]
            self._queued_edits.clear()
            for future in edits:
                future.set_exception(RuntimeError("the engine is closed"))
        for sink in queued:
            sink.finished(EndReason.STOPPED, None)
        return stopped


class _Counting:
    """A sink wrapper that counts model steps for `EngineStats`."""

    def __init__(self, sink: StepSink, stats: EngineStats) -> None:
        self._sink, self._stats = sink, stats

    def started(self, ts_ms: float) -> None:
        self._sink.started(ts_ms)

    def steps(self, items: Sequence[TextToken | AudioFrame], ts_ms: float) -> None:
        self._stats.steps += 1
        self._stats.rows += len(items)
        self._sink.steps(items, ts_ms)

    def finished(self, reason: EndReason | None, error: BaseException | None) -> None:
        self._sink.finished(reason, error)

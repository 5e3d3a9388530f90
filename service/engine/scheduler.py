"""The scheduler: one engine thread that shares one model among every conversation.

`open`, `submit`, `edit` and `release` only enqueue (thread-safe, never block).
One engine thread owns every conversation's model state and, each iteration:

1. applies queued operations in order per conversation (open, history edits,
   release); a conversation with a request waiting or running holds its later
   operations until that request finished;
2. admits waiting requests while fewer than `max_batch` rows are in the batch,
   by class: committed turns, then transcriptions, then speculative responses
   (`Priority`), round robin across owners (sessions) within a class. When the
   batch is full and a committed turn waits, a speculative row gives its place
   up (paused ones first): a committed turn never waits behind a speculation;
3. asks the runner to prefill admitted rows (a budget of positions while rows
   decode, so a long turn delays the others by about one step per iteration);
4. asks the runner for one step of every decoding row that is not paused, and
   delivers each row's step to its sink. A speculative row runs on a fork of its
   conversation and pauses itself once the frames of its first audio chunk exist
   (`hold_at_frames`); `RequestHandle.promote()` makes it a committed turn.

Caps, each with its policy (nothing a client does grows the engine's queues):
* edits per conversation: `max_pending_edits` queued at once, beyond which an
  edit fails with `EngineBusy`; an edit with a `coalesce` key replaces the queued
  one with that key (truncations of one response collapse into the latest);
* transcriptions per owner: `max_queued_transcriptions` waiting, beyond which a
  new one fails with `EngineBusy` (the session reports the transcript as failed);
* one request per conversation at a time (the lane), so one running response
  per session, plus its transcriptions;
* a wait for a place is bounded: after `max_wait_s` the request fails with
  `EngineBusy`; `stats.waiting` reports how many wait now. A committed turn
  that finds the batch full of committed responses waits at most about
  `preempt_after_s`: the response that has held its place longest (and at
  least that long) is suspended, and resumes where it stopped once a place is
  free (`stats.suspended` counts them);
* a conversation that outgrew the model (`Runner.fits`) fails its request.

A failure fails its request only. A `FatalEngineError` from the runner, or any
error that escapes the loop, stops the engine: every request and edit ends with
it, `failure` holds it and the failure callbacks run (the server goes
NOT_SERVING and exits so its platform restarts it).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.backends.base import AudioFrame, Conversation, EndReason, GenerateMode, is_end_of_audio
from service.clock import now_ms
from service.engine.api import (
    ConversationRef,
    Engine,
    EngineBusy,
    FatalEngineError,
    GenerationRequest,
    Priority,
    RequestHandle,
    StepSink,
)
from service.engine.runner import Row, Runner, StepOut

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Handle(RequestHandle):
    """A handle that wakes the engine thread when it resumes or aborts: a
    paused row is skipped, and with only paused rows the thread sleeps."""

    def __init__(self, request: GenerationRequest, wake: Callable[[], None]) -> None:
        super().__init__(request)
        self._wake = wake

    def abort(self) -> None:
        super().abort()
        self._wake()

    def resume(self) -> None:
        super().resume()
        self._wake()


@dataclass(eq=False)
class _Op:
    """One queued operation of a conversation."""

    kind: str  # "submit", "edit" or "release"
    conversation: int
    handle: RequestHandle | None = None
    sink: StepSink | None = None
    fn: Callable[[Conversation], Any] | None = None
    futures: list[concurrent.futures.Future[Any]] = field(default_factory=list)
    key: str | None = None
    queued_at: float = 0.0  # monotonic seconds, for the wait bound


@dataclass(eq=False)
class _Lane:
    """One conversation on the engine thread: its operations in order; while
    `busy` (a request of it waits or runs) the later ones wait."""

    ref: ConversationRef
    ops: deque[_Op] = field(default_factory=deque)
    busy: bool = False
    error: BaseException | None = None  # the conversation could not be created
    row: Row | None = None  # its request holding a place (or suspended)
    fork: tuple[RequestHandle, object] | None = None  # a speculation that ended by itself, not yet adopted


class _Waiting:
    """Requests waiting for a place: a FIFO per owner per class, owners served round robin."""

    def __init__(self) -> None:
        self._classes: dict[Priority, dict[str, deque[tuple[_Lane, _Op]]]] = {p: {} for p in Priority}

    def __len__(self) -> int:
        return sum(len(q) for owners in self._classes.values() for q in owners.values())

    def __iter__(self):  # type: ignore[no-untyped-def]
        for owners in self._classes.values():
            for queue in owners.values():
                yield from queue

    def add(self, lane: _Lane, op: _Op) -> None:
        assert op.handle is not None
        self._classes[op.handle.priority].setdefault(op.handle.request.owner, deque()).append((lane, op))

    def waiting(self, priority: Priority) -> bool:
        return bool(self._classes[priority])

    def pop(self) -> tuple[_Lane, _Op] | None:
        for owners in self._classes.values():
            for owner, queue in owners.items():
                item = queue.popleft()
                del owners[owner]
                if queue:
                    owners[owner] = queue  # to the back: the next owner goes first
                return item
        return None

    def take(self, keep: Callable[[_Op], bool]) -> list[tuple[_Lane, _Op]]:
        """Remove and return every entry for which `keep` is False."""
        taken = []
        for owners in self._classes.values():
            for owner in list(owners):
                queue = owners[owner]
                kept = deque(e for e in queue if keep(e[1]))
                taken += [e for e in queue if not keep(e[1])]
                if kept:
                    owners[owner] = kept
                else:
                    del owners[owner]
        return taken

    def regroup(self) -> None:
        """Move promoted speculative requests into the committed class."""
        queues = self._classes[Priority.SPECULATIVE].values()
        moved = [
            (lane, op)
            for queue in queues
            for lane, op in queue
            if op.handle and op.handle.priority < Priority.SPECULATIVE
        ]
        if moved:
            ids = {id(op) for _, op in moved}
            self.take(lambda op: id(op) not in ids)
            for lane, op in moved:
                self.add(lane, op)


class Scheduler(Engine):
    """Every generating conversation of the process on one model, in batched steps."""

    def __init__(
        self,
        runner: Runner,
        *,
        max_batch: int,
        max_wait_s: float = 120.0,
        max_pending_edits: int = 32,
        max_queued_transcriptions: int = 2,
        preempt_after_s: float | None = 2.0,
        name: str = "batched",
        threaded: bool = True,
    ) -> None:
        super().__init__(runner.backend)
        self.runner = runner
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max_wait_s
        self.max_pending_edits = max_pending_edits
        self.max_queued_transcriptions = max_queued_transcriptions
        self.preempt_after_s = preempt_after_s
        self._name = name
        self._cond = threading.Condition()
        # Filled by any thread, drained by the engine thread every iteration; bounded by the caps in `_post`.
        self._inbox: deque[_Op] = deque()
        self._open_ids: set[int] = set()
        self._lanes_to_create: dict[int, ConversationRef] = {}
        self._pending_edits: dict[int, int] = {}  # per conversation: edits queued, not applied
        self._queued_transcriptions: dict[str, int] = {}  # per owner: transcriptions not started
        self._closed = False
        self._failure: BaseException | None = None
        self._on_failure: list[Callable[[BaseException], None]] = []
        self._thread: threading.Thread | None = None
        self._driven = not threaded  # iterations run by `drive` in the caller's thread (warm-up, tests)
        # engine-thread state
        self._lanes: dict[int, _Lane] = {}
        self._ready: dict[int, _Lane] = {}  # lanes whose next operation may run (insertion order)
        self._waiting = _Waiting()
        self._prefilling: list[Row] = []
        self._decoding: list[Row] = []
        self._suspended: deque[Row] = deque()  # committed responses that gave their place up for a while

    @property
    def name(self) -> str:
        return self._name

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(error)` (on the engine thread) if the engine stops for good."""
        self._on_failure.append(callback)

    # -- any thread ---------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._closed and not self._driven:
                self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
                self._thread.start()

    def _refused(self) -> BaseException:
        return self._failure or RuntimeError("the engine is closed or the conversation was released")

    def open(self, system_prompt: str, mode: GenerateMode = GenerateMode.CHAT) -> ConversationRef:
        ref = ConversationRef(system_prompt, mode)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed") from self._failure
            self._open_ids.add(ref.id)
            self._inbox.append(_Op("open", ref.id))
            self._lanes_to_create[ref.id] = ref
            self._cond.notify()
        self.start()
        return ref

    def submit(self, request: GenerationRequest, sink: StepSink) -> RequestHandle:
        handle = _Handle(request, self._wake)
        conversation = request.conversation.id
        error: BaseException | None = None
        with self._cond:
            if self._closed or conversation not in self._open_ids:
                error = self._refused()
            elif handle.priority is Priority.TRANSCRIPTION and (
                self._queued_transcriptions.get(request.owner, 0) >= self.max_queued_transcriptions
            ):
                error = EngineBusy(f"more than {self.max_queued_transcriptions} transcriptions queued for one session")
            else:
                if handle.priority is Priority.TRANSCRIPTION:
                    self._queued_transcriptions[request.owner] = self._queued_transcriptions.get(request.owner, 0) + 1
                self.stats.waiting += 1
                self._inbox.append(_Op("submit", conversation, handle, sink, queued_at=time.monotonic()))
                self._cond.notify()
        if error is not None:
            self._report(sink, None, error)
            return handle
        self.start()
        return handle

    def edit(
        self, conversation: ConversationRef, op: Callable[[Conversation], T], coalesce: str | None = None
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._closed or conversation.id not in self._open_ids:
                future.set_exception(self._refused())
                return future
            if coalesce is not None:
                queued = next((o for o in self._inbox if o.conversation == conversation.id and o.key == coalesce), None)
                if queued is not None:  # not applied yet: the newer edit takes its place
                    queued.fn = op
                    queued.futures.append(future)
                    return future
            if self._pending_edits.get(conversation.id, 0) >= self.max_pending_edits:
                future.set_exception(EngineBusy(f"more than {self.max_pending_edits} edits queued for a conversation"))
                return future
            self._pending_edits[conversation.id] = self._pending_edits.get(conversation.id, 0) + 1
            self._inbox.append(_Op("edit", conversation.id, fn=op, futures=[future], key=coalesce))
            self._cond.notify()
        self.start()
        return future

    def release(self, conversation: ConversationRef) -> None:
        with self._cond:
            if self._closed or conversation.id not in self._open_ids:
                return
            self._open_ids.discard(conversation.id)
            self._inbox.append(_Op("release", conversation.id))
            self._cond.notify()

    def close(self, timeout: float) -> bool:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is None:
            with self.runner.engine_thread():
                self._accept_inbox()
                self._shutdown(None)
            return True
        thread.join(timeout)
        stopped = not thread.is_alive()
        if not stopped:
            log.warning("engine thread still busy after %.1f s", timeout)
        return stopped

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the engine thread ----------------------------------------------------------
    def _run(self) -> None:
        try:
            with self.runner.engine_thread():
                while self._loop_once():
                    pass
        except BaseException as exc:  # noqa: BLE001 - the engine is dead: tell everyone, once
            self._die(exc)

    def _die(self, error: BaseException) -> None:
        log.critical("the engine stopped: %r", error, exc_info=error)
        with self._cond:
            self._failure = error
            self._closed = True
        try:
            with self.runner.engine_thread():
                self._accept_inbox()
                self._shutdown(error)
        except BaseException:  # noqa: BLE001 - the callbacks below must still run
            log.exception("cannot finish the requests of a dead engine")
        for callback in self._on_failure:
            try:
                callback(error)
            except Exception:  # noqa: BLE001 - one callback's failure must not skip the others
                log.exception("engine failure callback failed")

    def _loop_once(self) -> bool:
        with self._cond:
            while not self._inbox and not self._closed and not self._has_work():
                self._cond.wait(timeout=self._next_expiry())
            closed = self._closed
        self._accept_inbox()
        if closed:
            self._shutdown(None)
            return False
        try:
            self._iterate()
        except FatalEngineError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the engine: fail the rows in flight
            log.exception("engine iteration failed")
            for row in [*self._prefilling, *self._decoding]:
                self._finish(row, None, exc)
        return True

    def _next_expiry(self) -> float | None:
        """Seconds until the oldest waiting request's wait bound (None: nothing waits)."""
        oldest = min((op.queued_at for _, op in self._waiting), default=None)
        return None if oldest is None else max(0.01, oldest + self.max_wait_s - time.monotonic())

    def _has_work(self) -> bool:
        rows = [*self._prefilling, *self._decoding]
        if self._ready or any(not row.handle.paused for row in rows):
            return True
        if any(row.handle.aborted for row in rows) or any(op.handle.aborted for _, op in self._waiting if op.handle):
            return True
        return bool(len(self._waiting) or self._suspended) and len(rows) < self.max_batch

    def _accept_inbox(self) -> None:
        with self._cond:
            ops = list(self._inbox)
            self._inbox.clear()
        for op in ops:
            if op.kind == "open":
                ref = self._lanes_to_create.pop(op.conversation)
                lane = self._lanes[ref.id] = _Lane(ref)
                try:
                    ref.state = self.runner.open(ref)
                except Exception as exc:  # noqa: BLE001 - later operations on the conversation report it
                    log.exception("cannot create %r", ref)
                    lane.error = exc
                continue
            lane_or_none = self._lanes.get(op.conversation)
            if lane_or_none is None:  # released before: the front end refuses that, so only a race at close
                self._refuse(op, KeyError(f"conversation {op.conversation} is not open"))
                continue
            if op.kind == "edit" and op.key is not None:
                queued = next((o for o in lane_or_none.ops if o.kind == "edit" and o.key == op.key), None)
                if queued is not None:  # the newer edit replaces the queued one
                    queued.fn = op.fn
                    queued.futures += op.futures
                    self._edit_done(op.conversation)
                    continue
            lane_or_none.ops.append(op)
            self._ready[lane_or_none.ref.id] = lane_or_none

    def _edit_done(self, conversation: int) -> None:
        with self._cond:
            left = self._pending_edits.get(conversation, 1) - 1
            if left > 0:
                self._pending_edits[conversation] = left
            else:
                self._pending_edits.pop(conversation, None)

    def _unwait(self, op: _Op) -> None:
        assert op.handle is not None
        with self._cond:
            self.stats.waiting -= 1
            owner = op.handle.request.owner
            if op.handle.request.priority is Priority.TRANSCRIPTION:
                left = self._queued_transcriptions.get(owner, 1) - 1
                if left > 0:
                    self._queued_transcriptions[owner] = left
                else:
                    self._queued_transcriptions.pop(owner, None)

    def _refuse(self, op: _Op, error: BaseException) -> None:
        if op.kind == "submit":
            assert op.sink is not None and op.handle is not None
            op.handle.abort()
            self._unwait(op)
            self._report(op.sink, None, error)
        elif op.kind == "edit":
            self._edit_done(op.conversation)
            for future in op.futures:
                if future.set_running_or_notify_cancel():
                    future.set_exception(error)

    @staticmethod
    def _report(sink: StepSink, reason: EndReason | None, error: BaseException | None) -> None:
        try:
            sink.started(now_ms())
            sink.finished(reason, error)
        except Exception:  # noqa: BLE001 - a sink's failure must not stop the engine
            log.exception("sink failed")

    def _iterate(self) -> None:
        self._run_lanes()
        self._expire()
        self._admit()
        self._stop_aborted()
        if not (self._prefilling or self._decoding):
            self.runner.idle()
            return
        started = time.perf_counter()
        with self.runner.iteration():
            decoding = any(not row.handle.paused for row in self._decoding)
            self._prefilling.sort(key=lambda r: r.handle.priority)  # stable: arrival order within a class
            prefilling = [row for row in self._prefilling if not row.handle.paused]
            if prefilling:
                budget = self.runner.prefill_budget() if decoding else float("inf")
                for row, error in self.runner.prefill(prefilling, budget):
                    self._prefilling.remove(row)
                    if error is not None:
                        log.warning("prefill failed for %r: %r", row, error)
                        self._finish(row, None, error)
                    else:
                        self._decoding.append(row)
            active = [row for row in self._decoding if not row.handle.paused]
            outs = self.runner.step(active) if active else []
        self._deliver(outs)
        self.stats.running = len(self._prefilling) + len(self._decoding)
        log.debug("iteration: %d rows stepped in %.1f ms", len(outs), (time.perf_counter() - started) * 1000)

    def _deliver(self, outs: list[StepOut]) -> None:
        if outs:
            self.stats.steps += 1
            self.stats.rows += len(outs)
        ts = now_ms()
        for out in outs:
            row = out.row
            if out.item is not None:
                try:
                    row.sink.steps((out.item,), ts)
                except Exception as exc:  # noqa: BLE001 - a failing sink fails its request only
                    self._finish(row, None, exc)
                    continue
                if isinstance(out.item, AudioFrame) and not is_end_of_audio(out.item.codes):
                    row.audio_frames += 1
                    if row.audio_frames == row.request.hold_at_frames:
                        row.handle.hold_speculation()  # a speculation goes no further than its first chunk
            if out.end is not None or out.error is not None:
                self._finish(row, out.end, out.error)

    # -- operations per conversation --------------------------------------------------
    def _run_lanes(self) -> None:
        for key, lane in list(self._ready.items()):
            fork = lane.row
            if lane.busy and fork is not None and any(op.kind == "edit" for op in lane.ops):
                fork.handle.drop_speculation()  # an edit to the trunk drops a live fork; it applies after
            while lane.ops and not lane.busy:
                self._settle_fork(lane)
                op = lane.ops.popleft()
                if op.kind == "edit":
                    self._apply_edit(lane, op)
                elif op.kind == "submit":
                    assert op.sink is not None and op.handle is not None
                    if lane.ref.state is None:
                        self._unwait(op)
                        self._report(op.sink, None, RuntimeError("the conversation could not be created"))
                    else:
                        lane.busy = True
                        self._waiting.add(lane, op)
                else:  # release
                    lane.ref.state = None
                    self._lanes.pop(key, None)
                    for rest in lane.ops:
                        self._refuse(rest, KeyError(f"{lane.ref!r} was released"))
                    lane.ops.clear()
            self._ready.pop(key, None)

    def _apply_edit(self, lane: _Lane, op: _Op) -> None:
        self._edit_done(op.conversation)
        futures = [f for f in op.futures if f.set_running_or_notify_cancel()]
        if not futures:
            return
        try:
            state = lane.ref.state
            if state is None:
                raise RuntimeError("the conversation could not be created")
            assert op.fn is not None
            with self.runner.editing():
                result = op.fn(state)
        except Exception as exc:  # noqa: BLE001 - delivered to the caller through the future
            for future in futures:
                future.set_exception(exc)
        else:
            for future in futures:
                future.set_result(result)

    # -- admission ------------------------------------------------------------------
    def _expire(self) -> None:
        now = time.monotonic()
        expired = self._waiting.take(lambda op: not (op.handle is not None and (
            op.handle.aborted or now - op.queued_at > self.max_wait_s)))  # fmt: skip
        for lane, op in expired:
            assert op.handle is not None and op.sink is not None
            self._unwait(op)
            if op.handle.aborted:
                self._report(op.sink, EndReason.STOPPED, None)
            else:
                log.warning("%r waited %.0f s for a place in the model", lane.ref, now - op.queued_at)
                self._report(op.sink, None, EngineBusy(f"no place in the model for {self.max_wait_s:.0f} s"))
            self._lane_free(lane)

    def _admit(self) -> None:
        self._waiting.regroup()
        while len(self._prefilling) + len(self._decoding) < self.max_batch:
            if not self._waiting.waiting(Priority.TURN) and self._suspended:
                self._resume(self._suspended.popleft())  # after new committed turns, before the other classes
                continue
            item = self._waiting.pop()
            if item is None:
                return
            self._start(*item)
        if self._waiting.waiting(Priority.TURN):
            self._make_room()

    def _make_room(self) -> None:
        """The batch is full and a committed turn waits. A speculative row gives its place up
        (paused ones first; it ends as STOPPED at the next iteration). Failing that, the
        committed response that has held its place longest gives it up for a while, once it
        held it `preempt_after_s`: it is suspended (the runner keeps its state and cache) and
        resumes, where it stopped, when a place is free and no new committed turn waits."""
        rows = [*self._decoding, *self._prefilling]
        spec = [r for r in rows if r.handle.priority is Priority.SPECULATIVE and not r.handle.aborted]
        victim = next((r for r in spec if r.handle.paused), spec[0] if spec else None)
        if victim is not None:
            victim.handle.abort()
            return
        if self.preempt_after_s is None:
            return
        now = time.monotonic()
        held = [r for r in self._decoding if now - r.placed_at >= self.preempt_after_s and self.runner.can_suspend(r)]
        if held:
            row = min(held, key=lambda r: r.placed_at)
            self._decoding.remove(row)
            self.runner.suspend(row)
            self._suspended.append(row)
            self.stats.suspended += 1
            log.debug("suspended %r for a waiting committed turn", row)

    def _resume(self, row: Row) -> None:
        if row.handle.aborted:
            self._finish(row, EndReason.STOPPED, None)
            return
        try:
            self.runner.resume(row)
        except FatalEngineError:
            raise
        except Exception as exc:  # noqa: BLE001 - fails this request only
            self._finish(row, None, exc)
            return
        row.placed_at = time.monotonic()
        self._decoding.append(row)

    def _start(self, lane: _Lane, op: _Op) -> None:
        """Give a request its row: add the user turn and open the response."""
        assert op.handle is not None and op.sink is not None
        self._unwait(op)
        row = Row(lane.ref, op.handle, op.sink)
        row.model = None
        try:
            op.sink.started(now_ms())
            too_long = self.runner.fits(row)
            if too_long is not None:
                raise EngineBusy(too_long)
            with self.runner.editing():
                if op.handle.priority is Priority.SPECULATIVE:
                    row.fork = row.state.snapshot()  # the trunk: the speculation runs on a fork of it
                takes_steps = self.runner.start(row)
        except Exception as exc:  # noqa: BLE001 - fails this request only
            self._end(row, None, exc)
            return
        lane.row = row
        if op.handle.aborted:
            self._finish(row, EndReason.STOPPED, None)
        elif not takes_steps:
            self._finish(row, EndReason.MAX_TOKENS, None)
        else:
            row.placed_at = time.monotonic()
            self.stats.speculative += row.handle.priority is Priority.SPECULATIVE
            self._prefilling.append(row)

    def _stop_aborted(self) -> None:
        for row in [*self._prefilling, *self._decoding, *self._suspended]:
            if row.handle.aborted:
                self._finish(row, EndReason.STOPPED, None)

    # -- the end of a request -----------------------------------------------------------
    def _finish(self, row: Row, reason: EndReason | None, error: BaseException | None) -> None:
        """Take `row` out of the batch, keep or reset its conversation's cache,
        and report the end to its sink (exactly once: a row is finished once)."""
        if row in self._prefilling:
            self._prefilling.remove(row)
        if row in self._decoding:
            self._decoding.remove(row)
        if row in self._suspended:
            self._suspended.remove(row)
        try:
            self.runner.remove(row, keep_cache=error is None)
        except FatalEngineError:
            raise
        except Exception:  # noqa: BLE001 - bookkeeping must not keep the sink from hearing the end
            log.exception("cannot release %r", row)
        self._end(row, reason, error)

    def _end(self, row: Row, reason: EndReason | None, error: BaseException | None) -> None:
        lane = self._lanes.get(row.ref.id)
        if row.fork is not None and row.handle.priority is Priority.SPECULATIVE:
            if lane is not None and error is None and reason in (EndReason.END_OF_TURN, EndReason.MAX_TOKENS):
                # it ended by itself before its commit: undecided until a promote() adopts it or
                # the next operation on the conversation finds it still speculative and drops it
                lane.fork = (row.handle, row.fork)
            else:  # stopped or failed before its commit: the conversation is its trunk again
                self._drop_fork(row.state, row.fork)
            row.fork = None
        try:
            row.sink.finished(reason, error)
        except Exception:  # noqa: BLE001 - a sink's failure must not stop the engine
            log.exception("sink failed")
        if lane is not None:
            lane.row = None
            self._lane_free(lane)
        self.stats.running = len(self._prefilling) + len(self._decoding)

    def _drop_fork(self, state: Conversation, fork: object) -> None:
        try:
            with self.runner.editing():
                state.restore(fork)
        except Exception:  # noqa: BLE001 - the request's sink must still hear its end
            log.exception("cannot drop a speculation's fork")

    def _settle_fork(self, lane: _Lane) -> None:
        """Before the next operation on a conversation: adopt an ended speculation that was
        promoted, drop one that was not (the operation applies to the trunk)."""
        if lane.fork is None:
            return
        (handle, fork), lane.fork = lane.fork, None
        if handle.priority is Priority.SPECULATIVE and lane.ref.state is not None:
            self._drop_fork(lane.ref.state, fork)

    def _lane_free(self, lane: _Lane) -> None:
        lane.busy = False
        if lane.ops:
            self._ready[lane.ref.id] = lane

    def _shutdown(self, error: BaseException | None) -> None:
        """Closing: every request ends (stopped, or with the engine's failure), every edit fails."""
        reason = None if error is not None else EndReason.STOPPED
        for row in [*self._prefilling, *self._decoding, *self._suspended]:
            row.handle.abort()
            try:
                self.runner.remove(row, keep_cache=False)
            except Exception:  # noqa: BLE001 - every sink must still hear its end
                log.exception("cannot release %r", row)
            self._end(row, reason, error)
        self._prefilling.clear()
        self._decoding.clear()
        self._suspended.clear()
        for _, op in self._waiting.take(lambda op: False):
            self._refuse_submit(op, reason, error)
        closed = error or RuntimeError("the engine is closed")
        for lane in self._lanes.values():
            for op in lane.ops:
                if op.kind == "submit":
                    self._refuse_submit(op, reason, error)
                else:
                    self._refuse(op, closed)
            lane.ops.clear()
            lane.ref.state = None
        self._lanes.clear()
        self._ready.clear()
        self.stats.running = 0

    def _refuse_submit(self, op: _Op, reason: EndReason | None, error: BaseException | None) -> None:
        assert op.handle is not None and op.sink is not None
        op.handle.abort()
        self._unwait(op)
        self._report(op.sink, reason, error)

    def drive(self, until: Callable[[], bool]) -> None:
        """Run iterations in the calling thread until `until()` (instead of `start()`)."""
        if not self._driven:
            raise RuntimeError("drive() is for an engine made with threaded=False")
        with self.runner.engine_thread():
            while not until():
                self._accept_inbox()
                self._iterate()

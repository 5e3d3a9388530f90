"""Turn detection shared fairly: a few worker threads, served round robin between sessions.

Voice activity and end-of-turn detection run models (Silero on every 32 ms window, cheap; Smart
Turn on every judged pause, a judgement costing tens of ms of CPU) in a couple of worker threads that
every session shares. Handing each audio message to a FIFO executor let one session hold the threads
for as long as its message took: a client that sends long messages full of short pauses (semantic
mode judges every pause) delayed a server-VAD user's end of speech -> commit by seconds instead of
a fraction of one (docs/limits-hardening.md has the figures), and the reader of each stream waited
for its own push, so the waiting grew with every message.

Here each session has one `TurnFeed`:

* audio the session has received but not yet detected is one pending buffer: a new message joins
  it (coalesced, never queued as a job of its own), so a session has at most one job queued or
  running, whatever it sends. At most `max_pending_ms` wait; a reader that would add to a fuller
  buffer waits for room (its stream's flow control then pushes back on the client);
* a job detects at most `JOB_AUDIO_MS` of audio, in 32 ms slices, and stops after the slice in
  which the end-of-turn model judged: one judgement at most. Then the session goes to the back
  of the queue if it has more audio;
* sessions are served in the order their audio arrived, one job at a time (round robin). A job
  waits for at most one job of each other session, so a session that keeps pausing delays
  another's end of turn by at most one judgement, however much it sends.

A job's events go back to the session on the event loop, in order, as the job ends (`on_events`).
The audio's arrival times are kept with it: `heard_ts` dates a position of the input timeline by
when its audio arrived, not by when a thread got to it, so the server's speech end -> commit
metric includes the time audio waited for detection.

All bookkeeping runs on the event loop; a worker thread touches only its own job's bytes and the
session's tracker, which nothing else uses while a job of the session runs (`settle` first).
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from service.clock import now_ms
from service.turns import TurnEvent, TurnTracker

JOB_AUDIO_MS: Final = 480  # most audio one job detects before other sessions get a turn
SLICE_MS: Final = 32  # one Silero window: a slice holds at most one end-of-turn judgement
MAX_PENDING_MS: Final = 2_000  # audio a session may have waiting before its reader waits


@dataclass(slots=True)
class _Job:
    """One session's turn in a worker thread (the thread reads `data`, nothing else writes it)."""

    data: bytes
    slice_bytes: int
    consumed: int = 0
    events: list[TurnEvent] | None = None

    def run(self, tracker: TurnTracker) -> None:
        events: list[TurnEvent] = []
        judged = tracker.end_of_turn_judgements
        while self.consumed < len(self.data):
            piece = self.data[self.consumed : self.consumed + self.slice_bytes]
            events.extend(tracker.push(piece))
            self.consumed += len(piece)
            if tracker.end_of_turn_judgements != judged:
                break  # one judgement per job: other sessions go first now
        self.events = events


class TurnFeed:
    """One session's way into the `TurnPool`: `put` its audio, `settle` before using the tracker."""

    def __init__(
        self,
        pool: TurnPool,
        tracker: TurnTracker,
        on_events: Callable[[list[TurnEvent]], None],
        max_pending_ms: int = MAX_PENDING_MS,
    ) -> None:
        self._pool = pool
        self.tracker = tracker
        self._on_events = on_events
        self._max_pending_ms = max_pending_ms
        # Overflow policy: audio is never dropped; past max_pending_ms `put` waits for room.
        self._pending = bytearray()
        self._pending_rate = tracker.input_rate_hz  # the rate of the pending bytes (settled at changes)
        # (end of a message on the input timeline in ms, when it arrived): for messages not yet fully
        # detected, and the one the last job ended in
        self._arrivals: deque[tuple[float, float]] = deque()
        self._received_ms = float(tracker.input_ms)
        self._detected_ms = float(tracker.input_ms)
        self._busy = False  # a job queued or running
        self._settled = asyncio.Event()
        self._settled.set()
        self._room = asyncio.Event()
        self._room.set()
        self.error: BaseException | None = None
        self.closed = False
        self.jobs = 0

    @property
    def pending_ms(self) -> float:
        return len(self._pending) / 2 * 1000 / self._pending_rate

    async def put(self, pcm16: bytes) -> None:
        """Hand over a message of PCM16 audio at the tracker's input rate (an even number of bytes).

        Returns at once unless `max_pending_ms` already wait; raises what a job or `on_events`
        raised since the last call."""
        self._raise_error()
        rate = self.tracker.input_rate_hz
        if rate != self._pending_rate:
            await self.settle()  # a rate change (update_config) applies to audio after it
            self._pending_rate = rate
        while self.pending_ms >= self._max_pending_ms and not self.closed:
            self._room.clear()
            await self._room.wait()
            self._raise_error()
        if self.closed or not pcm16:
            return
        self._pending += pcm16
        self._received_ms += len(pcm16) / 2 * 1000 / rate
        self._arrivals.append((self._received_ms, now_ms()))
        if not self._busy:
            self._busy = True
            self._settled.clear()
            self._pool.schedule(self)

    async def settle(self) -> None:
        """Wait until all audio put so far is detected and its events handed over."""
        await self._settled.wait()
        self._raise_error()

    def close(self) -> None:
        """The session is over: drop what waits; a running job's events are discarded."""
        self.closed = True
        self._pending.clear()
        self._room.set()
        self._settled.set()

    def heard_ts(self, position_ms: float) -> float:
        """When the audio at `position_ms` of the input timeline was heard (`now_ms` clock), as
        dated by the arrival of the message the latest detected audio came in: input arrives in
        real time, so a position that message ends after was heard that much earlier."""
        if not self._arrivals:
            return now_ms() - (self._detected_ms - position_ms)
        end_ms, arrived = self._arrivals[0]
        return arrived - (end_ms - position_ms)

    # -- the pool's side ----------------------------------------------------------------------
    def next_job(self) -> _Job:
        slice_bytes = max(2, round(self._pending_rate * SLICE_MS / 1000) * 2)
        size = max(slice_bytes, round(self._pending_rate * JOB_AUDIO_MS / 1000) * 2)
        return _Job(bytes(self._pending[:size]), slice_bytes)

    def job_done(self, job: _Job, error: BaseException | None) -> bool:
        """On the loop, after `job` ran: hand its events over; True when more audio waits."""
        self.jobs += 1
        if self.closed:
            return False
        if error is None:
            del self._pending[: job.consumed]
            self._detected_ms += job.consumed / 2 * 1000 / self._pending_rate
            while len(self._arrivals) > 1 and self._arrivals[0][0] < self._detected_ms - 1e-6:
                self._arrivals.popleft()
            if self.pending_ms < self._max_pending_ms:
                self._room.set()
            try:
                if job.events:
                    self._on_events(job.events)
            except Exception as exc:  # noqa: BLE001 - raised again in the session's reader (put/settle)
                error = exc
        if error is not None:
            self.error = error
            self.close()
            return False
        if self._pending:
            return True
        self._busy = False
        self._settled.set()
        return False

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error


class TurnPool:
    """`workers` threads for turn detection, shared round robin by every session's `TurnFeed`."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="turns")
        self._ready: deque[TurnFeed] = deque()  # feeds with audio waiting, each at most once
        self._running = 0
        self._shut = False

    def feed(
        self, tracker: TurnTracker, on_events: Callable[[list[TurnEvent]], None], max_pending_ms: int = MAX_PENDING_MS
    ) -> TurnFeed:
        return TurnFeed(self, tracker, on_events, max_pending_ms)

    @property
    def waiting(self) -> int:
        """Sessions whose audio waits for a thread now."""
        return len(self._ready)

    def schedule(self, feed: TurnFeed) -> None:
        if self._shut:
            feed.error = RuntimeError("turn detection stopped")
            feed.close()
            return
        self._ready.append(feed)
        self._start()

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running < self.workers and self._ready:
            feed = self._ready.popleft()
            if feed.closed:
                continue
            job = feed.next_job()
            self._running += 1
            future = loop.run_in_executor(self._executor, job.run, feed.tracker)
            future.add_done_callback(functools.partial(self._done, feed, job))

    def _done(self, feed: TurnFeed, job: _Job, future: asyncio.Future[None]) -> None:
        self._running -= 1
        error = None if future.cancelled() else future.exception()
        if future.cancelled():
            error = RuntimeError("turn detection stopped")
        if feed.job_done(job, error) and not self._shut:
            self._ready.append(feed)
        if not self._shut:
            self._start()

    def shutdown(self, wait: bool = False, cancel_futures: bool = True) -> None:
        """Stop the threads (as `Executor.shutdown`); feeds that put audio later fail."""
        self._shut = True
        self._ready.clear()
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)

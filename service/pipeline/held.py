"""The held output of a speculative response."""

from __future__ import annotations

import dataclasses

from service.clock import now_ms
from service.events import AudioChunk, Event, EventSink, Later, TextDelta
from service.outbox import SlowReader, WriteStats

_MAX_HELD_EVENTS = 256  # a held response pauses at its first audio: far fewer events than this


class HeldOutput:
    """The event sink of a speculative response: events wait here until `release`.

    Bounded: a held response is paused at its first audio, so it holds a few
    text deltas and one or two chunks; past `_MAX_HELD_EVENTS` the response is
    failed as a slow reader would be (it cannot happen with a sane backend)."""

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._held: list[tuple[Event | Later, WriteStats | None]] = []
        self.released = False

    @property
    def high_water(self) -> int:
        return self._sink.high_water

    def put(self, event: Event | Later, stats: WriteStats | None = None) -> None:
        if self.released:
            self._sink.put(event, stats)
            return
        if len(self._held) >= _MAX_HELD_EVENTS:
            raise SlowReader(f"a speculative response held more than {_MAX_HELD_EVENTS} events")
        self._held.append((event, stats))

    def purge(self, response_id: str) -> int:
        if self.released:
            return self._sink.purge(response_id)
        dropped = len(self._held)
        self._held = []
        return dropped

    def release(self) -> None:
        """Send everything held, in order; later events go straight out."""
        held, self._held = self._held, []
        self.released = True
        now = now_ms()
        for event, stats in held:
            if isinstance(event, TextDelta | AudioChunk) and event.ready_ts_ms:
                event = dataclasses.replace(event, ready_ts_ms=now)  # server latency counts from the release
            self._sink.put(event, stats)

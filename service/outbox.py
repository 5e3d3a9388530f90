"""The single ordered queue between a session's producers and its stream writer.

Producers (the session, the text consumer, the audio consumer) put events; the
stream's one writer takes them in order, stamps `ts_ms` and `seq`, and writes
them. Putting never blocks, so a client that reads slowly can never
stall generation, and what waits for the writer is bounded whatever the client
does. Overflow policy:
- media, when the client is behind: a TextDelta is merged into a TextDelta of
  the same response at the tail (counted as `text_coalesced`), an AudioChunk
  into the AudioChunk of the same response at the tail when it follows it
  without a gap and the merged chunk stays within `max_merged_audio_ms`
  (counted as `audio_merged`; merged chunks are whole multiples of chunk_ms and
  keep the first piece's `offset_ms`). Merged pieces wait as a list and become
  one message when the writer takes them, so merging costs linear memory.
  The client is behind when `max_items` events are queued and the write in
  flight has waited on it (HTTP/2 flow control: the client does not read) for
  `behind_after_ms` or more; the writer reports each write's start (`get`) and
  completion (`written`). A burst of events (a model faster than real time,
  the held events of a speculative response released at its commit) queues
  without merging, so a client that reads promptly gets `chunk_ms` chunks
  whatever the model's speed. Past `max_backlog` queued events (three
  quarters of `max_entries` by default) media are merged whatever the writes
  do, so that a client that reads, but more slowly than the audio is produced
  (at playback speed, say), loses its response to the audio bound below rather
  than its stream to the event cap;
- audio is also bounded in time: past `max_audio_ms` waiting, `put` raises
  `SlowReader` and the producer fails the response;
- errors (which a client provokes once per bad request): at most `max_errors`
  wait as they are; further errors are counted into one summary Error
  (RESOURCE_EXHAUSTED, "N more errors were dropped ...") queued where the
  first dropped one would have been and built when written, so it counts every
  error dropped until then (total in `errors_dropped`). The session survives;
- any event, past `max_entries` queued (a client that keeps provoking events
  and reads nothing): the stream ends with RESOURCE_EXHAUSTED as an urgent end
  (`overflowed` is set).
A `StreamEnd` is never refused by a cap. It is written after what is queued,
or, put with `urgent=True`, instead of it: the queue is dropped and the end
goes first. Once an end is queued nothing more is accepted (the writer stops at
it). `ended` is set and `end` tells which end, also for the outbox's own
overflow end: a writer stuck behind a client that does not read watches them to
cut the call after a grace.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from service.clock import now_ms
from voicechat.v1 import voicechat_pb2 as pb

__all__ = ["Outbox", "SlowReader", "StreamEnd", "WriteStats"]


class SlowReader(Exception):
    """The client is not reading: too much audio waits to be written."""


@dataclass
class StreamEnd:
    """In-band end of the stream with a gRPC status (put last)."""

    code: grpc.StatusCode | None  # None ends the stream with OK
    details: str = ""


@dataclass
class WriteStats:
    """What the writer observed for one response (filled as events go out)."""

    first_text_ts: float = 0.0
    first_audio_ts: float = 0.0
    audio_ms_written: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # ready -> written (tracing only)
    step_latencies_ms: list[float] = field(default_factory=list)  # model step -> written (tracing only)
    text_coalesced: int = 0
    audio_merged: int = 0


Item = pb.ConverseResponse | Callable[[], pb.ConverseResponse] | StreamEnd

_SUMMARY = "error_summary"

# A write to a client that reads completes within a few ms (loop and thread
# scheduling on a busy host included); one that waits this long waits on the
# client's flow-control window.
BEHIND_AFTER_MS = 100.0  # the kind of the summary entry of dropped errors


@dataclass
class _Entry:
    item: Item
    stats: WriteStats | None
    response_id: str = ""
    kind: str | None = None  # the event of a ConverseResponse item; None for ends and callables
    audio_ms: int = 0  # audio this entry holds
    pcm: list[bytes] | None = None  # merged audio pieces, joined when written
    text: list[str] | None = None  # merged text pieces, joined when written


@dataclass
class _ErrorSummary:
    """Errors dropped past the cap, written as one Error."""

    count: int = 0
    last: pb.Error = field(default_factory=pb.Error)

    def event(self) -> pb.ConverseResponse:
        last = self.last
        return pb.ConverseResponse(
            error=pb.Error(
                code=grpc.StatusCode.RESOURCE_EXHAUSTED.name,
                message=(
                    f"{self.count} more errors were dropped: requests fail faster than the client reads; "
                    f"the last was {last.code}: {last.message}"
                ),
            )
        )


class Outbox:
    def __init__(
        self,
        max_items: int = 64,
        max_audio_ms: int = 20_000,
        *,
        max_merged_audio_ms: int = 1000,
        max_errors: int = 32,
        max_entries: int = 1024,
        behind_after_ms: float = BEHIND_AFTER_MS,
        max_backlog: int | None = None,
    ) -> None:
        self._entries: deque[_Entry] = deque()
        self._ready = asyncio.Event()
        self._max_items = max_items
        self._max_audio_ms = max_audio_ms
        self._max_merged_audio_ms = max_merged_audio_ms
        self._max_errors = max_errors
        self._max_entries = max_entries
        self._behind_after_s = behind_after_ms / 1000
        self._max_backlog = max_entries * 3 // 4 if max_backlog is None else max_backlog
        self._write_started = 0.0  # monotonic time the write in flight started; 0.0 when none is
        self._audio_ms = 0
        self._errors = 0  # error events queued as they are
        self._summary: _ErrorSummary | None = None  # the summary waiting to be written
        self._end: StreamEnd | None = None
        self._final = False  # an urgent end is queued, or the writer took an end
        self._seq = 0
        self.high_water = 0
        self.errors_dropped = 0  # errors counted into summaries, over the stream
        self.overflowed = False  # the stream was ended for too many queued events
        self.ended = asyncio.Event()  # set once a StreamEnd is queued
        self.closed = False

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pending_audio_ms(self) -> int:
        return self._audio_ms

    @property
    def behind(self) -> bool:
        """The client is behind: the write in flight has waited on it for
        `behind_after_ms` or more (or past `max_backlog` events are queued)."""
        if len(self._entries) >= self._max_backlog:
            return True
        started = self._write_started
        return bool(started) and time.monotonic() - started >= self._behind_after_s

    def written(self) -> None:
        """The writer's write of the event `get` returned has completed."""
        self._write_started = 0.0

    @property
    def end(self) -> StreamEnd | None:
        """The end queued (or written), if any."""
        return self._end

    def put(self, item: Item, stats: WriteStats | None = None, response_id: str = "", *, urgent: bool = False) -> None:
        """Queue an event; never blocks. `urgent` (a StreamEnd only) drops what is queued and goes first."""
        if isinstance(item, StreamEnd):
            self._put_end(item, urgent)
            return
        if urgent:
            raise TypeError("only a StreamEnd can be urgent")
        if self.closed or self._end is not None:
            return  # nothing after an end is ever written
        kind = item.WhichOneof("event") if isinstance(item, pb.ConverseResponse) else None
        entry = _Entry(item, stats, response_id, kind)
        if isinstance(item, pb.ConverseResponse):
            if kind == "audio_chunk":
                entry.audio_ms = item.audio_chunk.duration_ms
                if self._audio_ms + entry.audio_ms > self._max_audio_ms:
                    raise SlowReader(
                        f"the client is not reading: more than {self._max_audio_ms} ms of audio wait to be sent"
                    )
                self._audio_ms += entry.audio_ms
                if self._merging() and self._merge_audio(item.audio_chunk, stats):
                    return
            elif kind == "text_delta":
                if self._merging() and self._merge_text(item.text_delta, stats):
                    return
            elif kind == "error":
                if self._summary is not None or self._errors >= self._max_errors:
                    self._drop_error(item.error)
                    return
                self._errors += 1
        if len(self._entries) >= self._max_entries:
            self.overflowed = True
            details = f"the client is not reading: more than {self._max_entries} events wait to be sent"
            self._put_end(StreamEnd(grpc.StatusCode.RESOURCE_EXHAUSTED, details), urgent=True)
            return
        self._append(entry)

    def _merging(self) -> bool:
        return len(self._entries) >= self._max_items and self.behind

    def _append(self, entry: _Entry) -> None:
        self._entries.append(entry)
        self.high_water = max(self.high_water, len(self._entries))
        self._ready.set()

    def _put_end(self, end: StreamEnd, urgent: bool) -> None:
        if self.closed or self._final or (self._end is not None and not urgent):
            return
        if urgent:
            self._entries.clear()
            self._audio_ms = 0
            self._errors = 0
            self._summary = None
            self._final = True
        self._end = end
        self._append(_Entry(end, None))
        self.ended.set()

    def _merge_text(self, delta: pb.TextDelta, stats: WriteStats | None) -> bool:
        if not self._entries:
            return False
        entry = self._entries[-1]
        tail = entry.item
        if entry.kind != "text_delta" or not isinstance(tail, pb.ConverseResponse):
            return False
        head = tail.text_delta
        if head.response_id != delta.response_id:
            return False
        if entry.text is None:
            entry.text = [head.text]
        entry.text.append(delta.text)
        head.source_ts_ms = delta.source_ts_ms
        if stats:
            stats.text_coalesced += 1
        return True

    def _merge_audio(self, chunk: pb.AudioChunk, stats: WriteStats | None) -> bool:
        if not self._entries:
            return False
        entry = self._entries[-1]
        tail = entry.item
        if entry.kind != "audio_chunk" or not isinstance(tail, pb.ConverseResponse):
            return False
        head = tail.audio_chunk
        if (
            head.response_id != chunk.response_id
            or head.sample_rate_hz != chunk.sample_rate_hz
            or head.offset_ms + head.duration_ms != chunk.offset_ms
            or head.duration_ms + chunk.duration_ms > self._max_merged_audio_ms
        ):
            return False
        # appending to the message's bytes field would copy the merged audio
        # on every merge (and upb keeps each copy until the message dies)
        if entry.pcm is None:
            entry.pcm = [head.pcm16]
        entry.pcm.append(chunk.pcm16)
        head.duration_ms += chunk.duration_ms
        head.source_ts_ms = chunk.source_ts_ms
        entry.audio_ms += chunk.duration_ms
        if stats:
            stats.audio_merged += 1
        return True

    def _drop_error(self, error: pb.Error) -> None:
        self.errors_dropped += 1
        if self._summary is None:
            self._summary = _ErrorSummary()
            self._append(_Entry(self._summary.event, None, kind=_SUMMARY))
        self._summary.count += 1
        self._summary.last = error

    def purge(self, response_id: str) -> int:
        """Drop the queued text and audio of a response (barge-in, cancel)."""
        keep: deque[_Entry] = deque()
        dropped = 0
        for entry in self._entries:
            if entry.kind in ("text_delta", "audio_chunk") and entry.response_id == response_id:
                self._audio_ms -= entry.audio_ms
                dropped += 1
                continue
            keep.append(entry)
        self._entries = keep
        return dropped

    async def get(self) -> pb.ConverseResponse | StreamEnd:
        """Next event, stamped with `ts_ms` and `seq`; records write stats."""
        while not self._entries:
            self._ready.clear()
            await self._ready.wait()
        entry = self._entries.popleft()
        item = entry.item
        if isinstance(item, StreamEnd):
            self._final = True
            return item
        event = item() if callable(item) else item
        if entry.kind == _SUMMARY:
            self._summary = None
        elif entry.kind == "error":
            self._errors -= 1
        elif entry.pcm is not None:
            event.audio_chunk.pcm16 = b"".join(entry.pcm)
        elif entry.text is not None:
            event.text_delta.text = "".join(entry.text)
        self._audio_ms -= entry.audio_ms
        self._write_started = time.monotonic()
        ts = now_ms()
        self._seq += 1
        event.seq = self._seq
        event.ts_ms = int(ts)
        kind = event.WhichOneof("event")
        stats = entry.stats
        if kind == "audio_chunk" and stats:
            stats.audio_ms_written += event.audio_chunk.duration_ms
            stats.first_audio_ts = stats.first_audio_ts or ts
            _record(stats, ts, event.audio_chunk)
        elif kind == "text_delta" and stats:
            stats.first_text_ts = stats.first_text_ts or ts
            _record(stats, ts, event.text_delta)
        return event


def _record(stats: WriteStats, ts: float, media: pb.TextDelta | pb.AudioChunk) -> None:
    if media.ready_ts_ms:
        stats.latencies_ms.append(ts - media.ready_ts_ms)
    if media.source_ts_ms:
        stats.step_latencies_ms.append(ts - media.source_ts_ms)

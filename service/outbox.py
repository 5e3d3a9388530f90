"""The single ordered queue between a session's producers and its stream writer.

Producers (the session, the text consumer, the audio consumer) put events; the
one writer (the servicer's response generator) takes them in order, stamps
`ts_ms` and `seq`, and writes them. Putting never blocks, so a client that reads
slowly can never stall generation. Overflow policy, when more than `max_items`
events wait:
- a TextDelta is merged into a TextDelta of the same response at the tail
  (counted as `text_coalesced`);
- an AudioChunk is merged into an AudioChunk of the same response at the tail
  (counted as `audio_merged`; merged chunks are whole multiples of chunk_ms);
- other events are always queued (their number is bounded by the protocol).
Audio waiting for the writer is also bounded in time: past `max_audio_ms`
`put` raises `SlowReader` and the producer fails the response.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from service.clock import now_ms
from voicechat.v1 import voicechat_pb2 as pb


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


@dataclass
class _Entry:
    item: Item
    stats: WriteStats | None
    response_id: str = ""


class Outbox:
    def __init__(self, max_items: int = 64, max_audio_ms: int = 20_000) -> None:
        self._entries: deque[_Entry] = deque()
        self._ready = asyncio.Event()
        self._max_items = max_items
        self._max_audio_ms = max_audio_ms
        self._audio_ms = 0
        self._seq = 0
        self.high_water = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pending_audio_ms(self) -> int:
        return self._audio_ms

    def put(self, item: Item, stats: WriteStats | None = None, response_id: str = "") -> None:
        if self.closed:
            return
        if isinstance(item, pb.ConverseResponse):
            kind = item.WhichOneof("event")
            if kind == "audio_chunk":
                if self._audio_ms + item.audio_chunk.duration_ms > self._max_audio_ms:
                    raise SlowReader(
                        f"the client is not reading: more than {self._max_audio_ms} ms of audio wait to be sent"
                    )
                self._audio_ms += item.audio_chunk.duration_ms
            if len(self._entries) >= self._max_items and self._merge(item, kind, stats):
                return
        self._entries.append(_Entry(item, stats, response_id))
        self.high_water = max(self.high_water, len(self._entries))
        self._ready.set()

    def _merge(self, item: pb.ConverseResponse, kind: str | None, stats: WriteStats | None) -> bool:
        tail = self._entries[-1].item
        if not isinstance(tail, pb.ConverseResponse) or tail.WhichOneof("event") != kind:
            return False
        if kind == "text_delta" and tail.text_delta.response_id == item.text_delta.response_id:
            tail.text_delta.text += item.text_delta.text
            tail.text_delta.source_ts_ms = item.text_delta.source_ts_ms
            if stats:
                stats.text_coalesced += 1
            return True
        if kind == "audio_chunk" and tail.audio_chunk.response_id == item.audio_chunk.response_id:
            tail.audio_chunk.pcm16 += item.audio_chunk.pcm16
            tail.audio_chunk.duration_ms += item.audio_chunk.duration_ms
            tail.audio_chunk.source_ts_ms = item.audio_chunk.source_ts_ms
            if stats:
                stats.audio_merged += 1
            return True
        return False

    def purge(self, response_id: str) -> int:
        """Drop the queued text and audio of a response (barge-in, cancel)."""
        keep: deque[_Entry] = deque()
        dropped = 0
        for entry in self._entries:
            item = entry.item
            if (
                isinstance(item, pb.ConverseResponse)
                and item.WhichOneof("event") in ("text_delta", "audio_chunk")
                and entry.response_id == response_id
            ):
                if item.WhichOneof("event") == "audio_chunk":
                    self._audio_ms -= item.audio_chunk.duration_ms
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
            return item
        event = item() if callable(item) else item
        ts = now_ms()
        self._seq += 1
        event.seq = self._seq
        event.ts_ms = int(ts)
        kind = event.WhichOneof("event")
        stats = entry.stats
        if kind == "audio_chunk":
            self._audio_ms -= event.audio_chunk.duration_ms
            if stats:
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

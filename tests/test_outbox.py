"""The outbox's bounds: media is merged only when the client is behind (a write
waits on it, or the backlog is huge), merged media is exact and costs linear
memory, errors past the cap become one counted summary, too many queued events
end the stream, and an end is never refused and can jump the queue."""

from __future__ import annotations

import asyncio
import gc
import re
import tracemalloc

import grpc
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.outbox import Outbox, StreamEnd, WriteStats
from voicechat.v1 import voicechat_pb2 as pb

BYTES_PER_MS = 48  # 24 kHz PCM16


def _chunk(response_id: str, offset_ms: int, ms: int, fill: int = 0) -> pb.ConverseResponse:
    pcm = bytes((fill + i) % 256 for i in range(ms * BYTES_PER_MS))
    return pb.ConverseResponse(
        audio_chunk=pb.AudioChunk(
            response_id=response_id, pcm16=pcm, sample_rate_hz=24_000, duration_ms=ms, offset_ms=offset_ms
        )
    )


def _error(i: int) -> pb.ConverseResponse:
    return pb.ConverseResponse(error=pb.Error(code="FAILED_PRECONDITION", message=f"bad request {i}", field="x"))


def _event(**fields: object) -> pb.ConverseResponse:
    return pb.ConverseResponse(**fields)  # type: ignore[arg-type]


async def _stuck_write(outbox: Outbox) -> None:
    """Start a write that never completes: the client reads nothing (with
    `behind_after_ms=0` the outbox counts it as behind at once)."""
    outbox.put(_event(session_started=pb.SessionStarted(session_id="s")))
    await outbox.get()


async def _drain(outbox: Outbox) -> list[pb.ConverseResponse | StreamEnd]:
    out: list[pb.ConverseResponse | StreamEnd] = []
    while len(outbox):
        out.append(await outbox.get())
    return out


# -- merged media is exact ------------------------------------------------------

# an operation: ("audio", response, ms) | ("text", response, piece) | ("get", n)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("audio"), st.sampled_from("ab"), st.integers(1, 120)),
        st.tuples(st.just("text"), st.sampled_from("ab"), st.text(max_size=4)),
        st.tuples(st.just("get"), st.integers(1, 6)),
        st.tuples(st.just("written")),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(operations=ops, max_items=st.integers(0, 6), max_merged=st.integers(40, 400))
async def test_writer_output_equals_input_for_any_backlog(
    operations: list[tuple], max_items: int, max_merged: int
) -> None:
    # every write waits on the client from `get` until "written": merging is on meanwhile
    outbox = Outbox(max_items=max_items, max_audio_ms=10**9, max_merged_audio_ms=max_merged, behind_after_ms=0)
    stats = {r: WriteStats() for r in "ab"}
    sent_pcm = {r: b"" for r in "ab"}
    sent_text = {r: "" for r in "ab"}
    offset = {r: 0 for r in "ab"}
    out: list[pb.ConverseResponse | StreamEnd] = []
    for op in operations:
        if op[0] == "audio":
            _, r, ms = op
            event = _chunk(r, offset[r], ms, fill=len(sent_pcm[r]))
            sent_pcm[r] += event.audio_chunk.pcm16
            offset[r] += ms
            outbox.put(event, stats[r], r)
        elif op[0] == "text":
            _, r, piece = op
            sent_text[r] += piece
            outbox.put(_event(text_delta=pb.TextDelta(response_id=r, text=piece)), stats[r], r)
        elif op[0] == "written":
            outbox.written()
        else:
            for _ in range(min(op[1], len(outbox))):
                out.append(await outbox.get())
    out += await _drain(outbox)
    assert outbox.pending_audio_ms == 0
    events = [e for e in out if isinstance(e, pb.ConverseResponse)]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    for r in "ab":
        chunks = [
            e.audio_chunk for e in events if e.WhichOneof("event") == "audio_chunk" and e.audio_chunk.response_id == r
        ]
        assert b"".join(c.pcm16 for c in chunks) == sent_pcm[r]
        position = 0
        for c in chunks:
            assert c.offset_ms == position  # the first piece's offset, no gap, no overlap
            assert len(c.pcm16) == c.duration_ms * BYTES_PER_MS
            assert c.duration_ms <= max(max_merged, 120)
            position += c.duration_ms
        assert stats[r].audio_ms_written == offset[r]
        text = "".join(
            e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta" and e.text_delta.response_id == r
        )
        assert text == sent_text[r]


async def test_merged_audio_is_capped_at_one_second_per_event() -> None:
    outbox = Outbox(max_items=1, behind_after_ms=0)
    stats = WriteStats()
    await _stuck_write(outbox)
    outbox.put(_event(response_started=pb.ResponseStarted(response_id="r")))
    for i in range(100):  # 4 s of 40 ms chunks behind a reader that took nothing
        outbox.put(_chunk("r", 40 * i, 40), stats, "r")
    chunks = [e.audio_chunk for e in await _drain(outbox) if isinstance(e, pb.ConverseResponse) and e.audio_chunk.pcm16]
    assert [(c.offset_ms, c.duration_ms) for c in chunks] == [(0, 1000), (1000, 1000), (2000, 1000), (3000, 1000)]
    assert stats.audio_merged == 96 and stats.audio_ms_written == 4000


async def test_a_chunk_after_a_gap_is_not_merged() -> None:
    outbox = Outbox(max_items=0, behind_after_ms=0)
    await _stuck_write(outbox)
    outbox.put(_chunk("r", 0, 40), None, "r")
    outbox.put(_chunk("r", 80, 40), None, "r")  # 40 ms missing: merging would shift its audio
    outbox.put(_chunk("r", 120, 40), None, "r")
    chunks = [e.audio_chunk for e in await _drain(outbox) if isinstance(e, pb.ConverseResponse)]
    assert [(c.offset_ms, c.duration_ms) for c in chunks] == [(0, 40), (80, 80)]


async def test_purge_of_merged_audio_keeps_the_audio_account() -> None:
    outbox = Outbox(max_items=0, behind_after_ms=0)
    await _stuck_write(outbox)
    for i in range(10):
        outbox.put(_chunk("a", 40 * i, 40), None, "a")
    outbox.put(_chunk("b", 0, 40), None, "b")
    assert outbox.pending_audio_ms == 440
    assert outbox.purge("a") == 1  # one merged entry
    assert outbox.pending_audio_ms == 40
    assert (await outbox.get()).audio_chunk.response_id == "b"  # type: ignore[union-attr]
    assert outbox.pending_audio_ms == 0


# -- when media is merged --------------------------------------------------------------


def _durations(events: list[pb.ConverseResponse | StreamEnd]) -> list[int]:
    return [e.audio_chunk.duration_ms for e in events if isinstance(e, pb.ConverseResponse) and e.audio_chunk.pcm16]


async def test_a_burst_for_a_prompt_reader_is_not_merged() -> None:
    # a model faster than real time, or held events released at a commit: far more
    # than max_items at once, while the writer has no write waiting on the client
    outbox = Outbox(max_items=4)
    stats = WriteStats()
    for i in range(300):
        outbox.put(_chunk("r", 40 * i, 40), stats, "r")
        outbox.put(_event(text_delta=pb.TextDelta(response_id="r", text="x")), stats, "r")
    out = []
    while len(outbox):
        out.append(await outbox.get())
        outbox.written()  # the client reads promptly
    assert _durations(out) == [40] * 300 and stats.audio_merged == 0 and stats.text_coalesced == 0


async def test_media_is_merged_once_a_write_has_waited_behind_after_ms() -> None:
    outbox = Outbox(max_items=2, behind_after_ms=50)
    outbox.put(_event(response_started=pb.ResponseStarted(response_id="r")))
    await outbox.get()  # a write starts
    for i in range(6):  # queued while the write is young: as they are
        outbox.put(_chunk("r", 40 * i, 40), None, "r")
    assert len(outbox) == 6 and not outbox.behind
    await asyncio.sleep(0.08)  # the write still waits: the client is behind
    assert outbox.behind
    for i in range(6, 12):
        outbox.put(_chunk("r", 40 * i, 40), None, "r")
    assert len(outbox) == 6  # the tail took them
    outbox.written()  # the client caught up: nothing more is merged
    assert not outbox.behind
    for i in range(12, 14):
        outbox.put(_chunk("r", 40 * i, 40), None, "r")
    out = []
    while len(outbox):
        out.append(await outbox.get())
        outbox.written()
    assert _durations(out) == [40] * 5 + [280] + [40] * 2


async def test_past_max_backlog_media_is_merged_whatever_the_writes_do() -> None:
    # a client that reads, but slower than the audio comes: no single write waits long
    outbox = Outbox(max_items=2, max_backlog=10)
    for i in range(30):
        outbox.put(_chunk("r", 40 * i, 40), None, "r")
    assert len(outbox) == 10
    assert _durations(await _drain(outbox)) == [40] * 9 + [21 * 40]


# -- merging costs linear memory ----------------------------------------------------


def _merge_backlog(seconds: int) -> Outbox:
    """A backlog of `seconds` of 40 ms chunks merged into one entry (no size cap:
    the worst case for copies)."""
    outbox = Outbox(max_items=0, max_audio_ms=10**9, max_merged_audio_ms=10**9, max_backlog=0)
    pcm = bytes(40 * BYTES_PER_MS)
    for i in range(seconds * 25):
        outbox.put(
            _event(audio_chunk=pb.AudioChunk(response_id="r", pcm16=pcm, duration_ms=40, offset_ms=40 * i)), None, "r"
        )
    assert len(outbox) == 1
    return outbox


async def _peak_python_bytes(seconds: int) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        outbox = _merge_backlog(seconds)
        event = await outbox.get()
        assert isinstance(event, pb.ConverseResponse) and len(event.audio_chunk.pcm16) == seconds * 48_000
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_merging_a_backlog_allocates_linear_python_memory() -> None:
    small, large = await _peak_python_bytes(10), await _peak_python_bytes(40)
    # linear: 4x the audio costs ~4x the memory (quadratic would be ~16x)
    assert 3 < large / small < 6, (small, large)
    assert large < 4 * 40 * 48_000  # the pieces, the joined message, and little else


async def test_merging_a_backlog_does_not_grow_the_process() -> None:
    # protobuf's own allocations (upb arenas) are invisible to tracemalloc: RSS
    # shows them. Appending to the message instead would keep every
    # intermediate copy: ~1 GB for 40 s of audio
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    outbox = _merge_backlog(40)
    merged = process.memory_info().rss
    event = await outbox.get()
    written = process.memory_info().rss
    assert isinstance(event, pb.ConverseResponse) and event.audio_chunk.duration_ms == 40_000
    grown_mb = (max(merged, written) - before) / 2**20
    print(f"merging 40 s of audio grew RSS by {grown_mb:.1f} MiB")
    assert grown_mb < 32


# -- the error cap ----------------------------------------------------------------


def _summary_count(event: pb.ConverseResponse) -> int:
    match = re.match(r"(\d+) more errors were dropped", event.error.message)
    assert match and event.error.code == "RESOURCE_EXHAUSTED", event.error
    return int(match.group(1))


async def test_errors_past_the_cap_become_one_counted_summary() -> None:
    outbox = Outbox()
    outbox.put(_event(session_started=pb.SessionStarted(session_id="s")))
    for i in range(100_000):
        outbox.put(_error(i))
    assert len(outbox) == 1 + 32 + 1
    assert outbox.errors_dropped == 100_000 - 32
    events = await _drain(outbox)
    errors = [e for e in events if isinstance(e, pb.ConverseResponse) and e.WhichOneof("event") == "error"]
    assert [e.error.message for e in errors[:32]] == [f"bad request {i}" for i in range(32)]
    assert _summary_count(errors[32]) == 100_000 - 32
    assert "the last was FAILED_PRECONDITION: bad request 99999" in errors[32].error.message
    # the writer caught up: errors are queued as they are again
    outbox.put(_error(7))
    assert (await outbox.get()).error.message == "bad request 7"  # type: ignore[union-attr]


async def test_the_summary_counts_errors_dropped_until_it_is_written() -> None:
    outbox = Outbox(max_errors=2)
    for i in range(4):
        outbox.put(_error(i))
    outbox.put(_event(turn_committed=pb.TurnCommitted(turn_id="turn_1")))
    first = await outbox.get()
    assert first.error.message == "bad request 0"  # type: ignore[union-attr]
    for i in range(4, 10):  # a summary waits: these are counted into it
        outbox.put(_error(i))
    events = [e for e in await _drain(outbox) if isinstance(e, pb.ConverseResponse)]
    assert [e.WhichOneof("event") for e in events] == ["error", "error", "turn_committed"]
    assert events[0].error.message == "bad request 1"
    assert _summary_count(events[1]) == 8
    assert outbox.errors_dropped == 8


# -- the event cap and the end ------------------------------------------------------


async def test_too_many_queued_events_end_the_stream_with_resource_exhausted() -> None:
    outbox = Outbox(max_entries=50)
    for i in range(200):
        outbox.put(_event(speech_started=pb.SpeechStarted(audio_start_ms=i)))
    assert outbox.overflowed and outbox.ended.is_set()
    assert len(outbox) == 1  # what waited was dropped
    end = await outbox.get()
    assert isinstance(end, StreamEnd) and end.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than 50 events" in end.details


async def test_an_end_is_never_refused_by_a_cap() -> None:
    outbox = Outbox(max_entries=3, max_errors=1)
    for i in range(3):
        outbox.put(_event(speech_started=pb.SpeechStarted(audio_start_ms=i)))
    outbox.put(StreamEnd(None))
    events = await _drain(outbox)
    assert len(events) == 4 and events[-1] == StreamEnd(None) and not outbox.overflowed


async def test_an_end_is_written_after_what_is_queued_and_nothing_follows_it() -> None:
    outbox = Outbox()
    outbox.put(_event(response_started=pb.ResponseStarted(response_id="r")))
    outbox.put(_chunk("r", 0, 40), None, "r")
    outbox.put(StreamEnd(grpc.StatusCode.DEADLINE_EXCEEDED, "idle"))
    assert outbox.ended.is_set() and outbox.end == StreamEnd(grpc.StatusCode.DEADLINE_EXCEEDED, "idle")
    outbox.put(_error(1))  # never written: the writer stops at the end
    outbox.put(StreamEnd(None))  # the first end wins
    events = await _drain(outbox)
    assert [e.WhichOneof("event") if isinstance(e, pb.ConverseResponse) else e.code for e in events] == [
        "response_started",
        "audio_chunk",
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ]


async def test_an_urgent_end_drops_the_queue_and_goes_first() -> None:
    outbox = Outbox(max_items=2)
    outbox.put(_event(response_started=pb.ResponseStarted(response_id="r")))
    for i in range(50):
        outbox.put(_chunk("r", 40 * i, 40), None, "r")
        outbox.put(_error(i))
    outbox.put(StreamEnd(grpc.StatusCode.OK))  # an end queued behind all of it
    outbox.put(StreamEnd(grpc.StatusCode.OUT_OF_RANGE, "session limit"), urgent=True)
    assert len(outbox) == 1 and outbox.pending_audio_ms == 0
    outbox.put(StreamEnd(grpc.StatusCode.UNAVAILABLE, "later"), urgent=True)  # the urgent end stays
    outbox.put(_chunk("r", 2000, 40), None, "r")
    assert await outbox.get() == StreamEnd(grpc.StatusCode.OUT_OF_RANGE, "session limit")
    assert len(outbox) == 0
    with pytest.raises(TypeError):
        outbox.put(_error(0), urgent=True)


async def test_a_closed_outbox_accepts_nothing() -> None:
    outbox = Outbox()
    outbox.closed = True
    outbox.put(_error(0))
    outbox.put(StreamEnd(None), urgent=True)
    assert len(outbox) == 0 and not outbox.ended.is_set()

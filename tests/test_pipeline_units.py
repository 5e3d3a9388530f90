"""Units of the streaming pipeline: re-framing, streaming decode, code
sanitising, the outbox's overflow policy and the output policy's strides."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.audio import PcmReframer
from service.backends.base import (
    END_OF_AUDIO_CODE,
    MAX_AUDIO_CODE,
    AssistantTurn,
    AudioFrame,
    TextToken,
    sanitize_mimi_codes,
)
from service.backends.scripted import ScriptedBackend, decode_tokens, encode_text, frame_codes
from service.outbox import Outbox, SlowReader, WriteStats
from service.pipeline import OutputPolicy
from voicechat.v1 import voicechat_pb2 as pb


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=4000).map(lambda b: b[: len(b) // 2 * 2]),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    chunk=st.integers(min_value=1, max_value=500),
)
def test_reframing_is_lossless_for_any_split(data: bytes, cuts: list[int], chunk: int) -> None:
    reframer = PcmReframer(chunk)
    points = sorted({c // 2 * 2 for c in cuts if c <= len(data)} | {0, len(data)})
    out: list[bytes] = []
    for a, b in zip(points, points[1:], strict=False):
        out += reframer.push(data[a:b])
    tail = reframer.flush()
    assert all(len(c) == 2 * chunk for c in out)
    assert len(tail) < 2 * chunk
    assert b"".join(out) + tail == data


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=8))
def test_streaming_decode_equals_one_shot(batch_sizes: list[int]) -> None:
    frames = [frame_codes(c, i, 0.0) for i, c in enumerate("streaming decode " * 3)][: sum(batch_sizes)]
    backend = ScriptedBackend()
    one_shot = backend.new_decoder().decode(frames)
    decoder = backend.new_decoder()
    parts, start = [], 0
    for size in batch_sizes:
        parts.append(decoder.decode(frames[start : start + size]))
        start += size
    streamed = np.concatenate(parts + [decoder.flush()])
    # tolerance: float32 rounding of a phase carried across calls
    np.testing.assert_allclose(streamed, one_shot, atol=1e-5)


def test_sanitize_mimi_codes_maps_every_value_into_range() -> None:
    codes = np.array([-5, 0, 17, MAX_AUDIO_CODE, END_OF_AUDIO_CODE, 99_999, 3, 4])
    clean = sanitize_mimi_codes(codes)
    assert clean.dtype == np.int64
    assert clean.tolist() == [0, 0, 17, 2047, 2047, 2047, 3, 4]


def test_scripted_tokens_split_multibyte_characters_and_decode_back() -> None:
    text = "héllo 你好 🙂"
    ids = encode_text(text)
    assert decode_tokens(ids) == text
    partial = decode_tokens(ids[:3])
    assert partial.endswith("\ufffd")  # a split character is visible as U+FFFD


def test_assistant_turn_truncation_keeps_what_was_heard() -> None:
    eoa = np.full(8, END_OF_AUDIO_CODE)
    steps = [TextToken(1), TextToken(2), AudioFrame(np.zeros(8)), AudioFrame(np.ones(8)), TextToken(3),
             AudioFrame(np.ones(8) * 2), AudioFrame(eoa)]
    turn = AssistantTurn(steps)
    assert turn.audio_frames == 3
    assert turn.truncated(1).steps == steps[:3]
    assert turn.truncated(2).steps == steps[:5]
    assert turn.truncated(0).steps == steps[:2]


def test_output_policy_fast_path_then_doubling_strides() -> None:
    policy = OutputPolicy(chunk_samples=960, first_frames=2, max_stride=16)
    assert [policy.stride(i) for i in range(6)] == [2, 4, 8, 16, 16, 16]
    baseline = OutputPolicy(chunk_samples=None, first_frames=16, max_stride=16, adaptive=False)
    assert [baseline.stride(i) for i in range(3)] == [16, 16, 16]


def _chunk(response_id: str, ms: int, offset_ms: int = 0) -> pb.ConverseResponse:
    return pb.ConverseResponse(
        audio_chunk=pb.AudioChunk(response_id=response_id, pcm16=b"\0" * ms * 48, duration_ms=ms, offset_ms=offset_ms)
    )


async def test_outbox_coalesces_when_full_and_fails_past_the_audio_bound() -> None:
    # the client counts as behind from 4 queued events (`max_backlog`): full and behind, media merge
    outbox = Outbox(max_items=4, max_audio_ms=400, max_backlog=4)
    stats = WriteStats()
    for i in range(6):
        outbox.put(pb.ConverseResponse(text_delta=pb.TextDelta(response_id="r", text=str(i))), stats, "r")
    assert len(outbox) == 4 and stats.text_coalesced == 2
    for i in range(5):
        outbox.put(_chunk("r", 40, 40 * i), stats, "r")
    assert len(outbox) == 5 and stats.audio_merged == 4 and outbox.pending_audio_ms == 200
    texts = [(await outbox.get()).text_delta.text for _ in range(4)]
    assert "".join(texts) == "012345"
    merged = await outbox.get()
    assert merged.audio_chunk.duration_ms == 200 and len(merged.audio_chunk.pcm16) == 200 * 48
    assert [merged.seq, merged.ts_ms > 0] == [5, True]
    for i in range(5, 15):
        outbox.put(_chunk("r", 40, 40 * i), stats, "r")
    with pytest.raises(SlowReader):
        outbox.put(_chunk("r", 40, 600), stats, "r")


async def test_outbox_purge_drops_only_that_responses_media() -> None:
    outbox = Outbox()
    outbox.put(pb.ConverseResponse(response_started=pb.ResponseStarted(response_id="a")))
    outbox.put(_chunk("a", 40), None, "a")
    outbox.put(_chunk("b", 40), None, "b")
    assert outbox.purge("a") == 1
    assert outbox.pending_audio_ms == 40
    assert (await outbox.get()).WhichOneof("event") == "response_started"
    assert (await outbox.get()).audio_chunk.response_id == "b"

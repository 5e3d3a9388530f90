"""Streaming resampler: chunking must not change the output, and it must really filter."""

from __future__ import annotations

import numpy as np
import pytest
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from service.resample import StreamResampler, pcm16_to_float32


def _stream(resampler: StreamResampler, signal: np.ndarray, cuts: list[int]) -> np.ndarray:
    bounds = [0, *sorted(set(cuts)), signal.size]
    parts = [resampler.process(signal[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return np.concatenate([*parts, resampler.flush()])


def _tone(frequency_hz: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency_hz * t)).astype(np.float32)


def _peak_hz(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(signal.size)))
    return float(np.fft.rfftfreq(signal.size, 1 / rate)[np.argmax(spectrum)])


@settings(max_examples=60, deadline=None)
@given(
    rate=st.sampled_from([8_000, 20_011, 24_000, 44_100, 48_000]),  # files come at any rate
    seed=st.integers(0, 2**32 - 1),
    length=st.integers(0, 6_000),
    cuts=st.lists(st.integers(0, 6_000), max_size=12),
)
def test_streaming_over_any_split_equals_one_shot(rate: int, seed: int, length: int, cuts: list[int]) -> None:
    signal = (np.random.default_rng(seed).standard_normal(length) * 0.2).astype(np.float32)
    streamed = _stream(StreamResampler(rate), signal, [c for c in cuts if c <= length])
    reference = soxr.resample(signal, rate, 16_000)
    assert streamed.dtype == np.float32
    assert streamed.shape == reference.shape
    np.testing.assert_allclose(streamed, reference, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(pcm=st.binary(max_size=4_000).map(lambda b: b[: len(b) // 2 * 2]), cut=st.integers(0, 2_000))
def test_16k_passes_through_unchanged(pcm: bytes, cut: int) -> None:
    resampler = StreamResampler(16_000)
    assert resampler.passthrough
    cut = min(cut * 2, len(pcm))
    out = np.concatenate([resampler.process_pcm16(pcm[:cut]), resampler.process_pcm16(pcm[cut:]), resampler.flush()])
    np.testing.assert_array_equal(out, np.frombuffer(pcm, dtype="<i2") / np.float32(32768))


def test_pcm16_decoding_scale_and_byte_order() -> None:
    pcm = np.array([-32768, -16384, 0, 1, 16384, 32767], dtype="<i2").tobytes()
    np.testing.assert_array_equal(
        pcm16_to_float32(pcm), np.array([-1.0, -0.5, 0.0, 1 / 32768, 0.5, 32767 / 32768], np.float32)
    )
    # Little-endian: the low byte comes first.
    assert pcm16_to_float32(b"\x01\x00")[0] == np.float32(1 / 32768)


@pytest.mark.parametrize("rate", [24_000, 48_000])
def test_tone_keeps_frequency_and_level(rate: int) -> None:
    tone = _tone(1_000, rate, 1.0)
    resampler = StreamResampler(rate)
    out = _stream(resampler, tone, list(range(0, tone.size, 441)))  # odd chunk size, like 10 ms at 44.1k
    assert out.size == 16_000
    assert abs(_peak_hz(out, 16_000) - 1_000) <= 1.0  # FFT bins are 1 Hz wide over one second
    # Away from the edges the sine keeps its amplitude (0.5) within 1 %.
    assert np.max(np.abs(out[1_000:-1_000])) == pytest.approx(0.5, rel=0.01)


def test_tone_above_new_nyquist_is_filtered_not_folded() -> None:
    # A 12 kHz tone cannot exist at 16 kHz; dropping samples would fold it to 4 kHz at full level.
    tone = _tone(12_000, 48_000, 1.0)
    out = _stream(StreamResampler(48_000), tone, list(range(0, tone.size, 960)))
    assert np.sqrt(np.mean(out[1_000:-1_000] ** 2)) < 0.5 / np.sqrt(2) * 10 ** (-60 / 20)


def test_flush_starts_a_fresh_stream() -> None:
    tone = _tone(440, 48_000, 0.25)
    resampler = StreamResampler(48_000)
    first = _stream(resampler, tone, [1234])
    second = _stream(resampler, tone, [999, 2000])
    np.testing.assert_array_equal(first, second)

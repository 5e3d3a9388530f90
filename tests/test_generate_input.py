"""Uploaded audio files (Generate's `audio`) are checked before they are decoded.

Forged headers, odd rates, decompression bombs and garbage each end in a clear
INVALID_ARGUMENT naming the limit, with memory bounded by the limit and not by
what the file claims. Files are made with soundfile and then patched in place.
"""

from __future__ import annotations

import asyncio
import io
import logging
import resource
import struct
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile

from service.audio import read_audio_file
from service.config import Settings
from service.server import VoiceChatServer
from tests.conftest import StartServer
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

pytest_plugins = ["tests.lfm2_fixtures"]

TEN_HOURS_S = 36_000


def _tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    mono = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(mono[:, None], channels, axis=1)


def _file(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def _wav(seconds: float = 1.0, rate: int = 16_000, channels: int = 1) -> bytes:
    return _file(_tone(seconds, rate, channels), rate, "WAV", "PCM_16")


def _flac(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    return _file(_tone(seconds, rate), rate, "FLAC")


def _patch_wav(data: bytes, *, rate: int | None = None, channels: int | None = None) -> bytes:
    """Rewrite fields of the canonical 44-byte WAV header soundfile writes."""
    patched = bytearray(data)
    assert patched[12:16] == b"fmt "
    if channels is not None:
        patched[22:24] = struct.pack("<H", channels)
    if rate is not None:
        patched[24:28] = struct.pack("<I", rate)
    return bytes(patched)


def _patch_flac(data: bytes, *, rate: int | None = None, total_samples: int | None = None) -> bytes:
    """Rewrite STREAMINFO: 20 bits of rate, 3 of channels, 5 of bits per sample, 36 of total samples."""
    patched = bytearray(data)
    assert patched[:4] == b"fLaC" and patched[4] & 0x7F == 0  # STREAMINFO comes first
    fields = int.from_bytes(patched[18:26], "big")
    if rate is not None:
        fields = (fields & ((1 << 44) - 1)) | (rate << 44)
    if total_samples is not None:
        fields = (fields & ~((1 << 36) - 1)) | total_samples
    patched[18:26] = fields.to_bytes(8, "big")
    return bytes(patched)


def _refusal(data: bytes, max_seconds: float = 120) -> str:
    with pytest.raises(ValueError) as info:
        read_audio_file(data, max_seconds)
    message = str(info.value)
    assert "0x" not in message and "object at" not in message and "Error" not in message, message
    return message


def _peak_traced_bytes(data: bytes, max_seconds: float) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            read_audio_file(data, max_seconds)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _peak_hz(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(signal.size)))
    return float(np.fft.rfftfreq(signal.size, 1 / rate)[np.argmax(spectrum)])


# --- the function ---------------------------------------------------------


def test_16k_mono_wav_passes_through() -> None:
    pcm = np.random.default_rng(0).integers(-32768, 32768, 16_000).astype(np.int16)
    samples, rate = read_audio_file(_file(pcm, 16_000, "WAV", "PCM_16"), 120)
    assert rate == 16_000 and samples.dtype == np.float32
    np.testing.assert_array_equal(samples, pcm / np.float32(32768))


@pytest.mark.parametrize(("rate", "fmt"), [(8_000, "WAV"), (20_011, "WAV"), (44_100, "FLAC"), (48_000, "MP3")])
def test_any_rate_in_range_becomes_16k_with_the_same_pitch(rate: int, fmt: str) -> None:
    samples, out_rate = read_audio_file(_file(_tone(1.0, rate), rate, fmt), 120)
    assert out_rate == 16_000
    # MP3 pads the start and end with an encoder delay
    assert abs(samples.size - 16_000) <= (2_000 if fmt == "MP3" else 1)
    assert abs(_peak_hz(samples[:16_000], 16_000) - 440) <= 2


def test_stereo_is_averaged_to_mono() -> None:
    left = _tone(1.0, 24_000)[:, 0]
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    samples, _ = read_audio_file(_file(stereo, 24_000, "WAV", "FLOAT"), 120)
    assert np.max(np.abs(samples[1_000:-1_000])) == pytest.approx(0.25, rel=0.01)


def test_non_finite_and_loud_float_samples_are_made_safe() -> None:
    wild = np.array([np.nan, np.inf, -np.inf, 7.0, -7.0, 0.5] * 1_000, dtype=np.float32)
    samples, _ = read_audio_file(_file(wild, 16_000, "WAV", "FLOAT"), 120)
    assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
    assert samples[5] == 0.5 and samples[3] == 1.0 and samples[0] == 0.0


@pytest.mark.parametrize("rate", [7_999, 48_001, 96_001, 192_000])
def test_rates_outside_the_range_are_refused_before_decoding(rate: int) -> None:
    for data in (_patch_wav(_wav(0.1), rate=rate), _patch_flac(_flac(0.1), rate=rate)):
        assert f"sample rate {rate} Hz is outside the accepted 8000-48000 Hz" in _refusal(data)


def test_a_forged_channel_count_is_refused() -> None:
    assert "3 channels: only mono or stereo" in _refusal(_wav(1.0, channels=3))
    assert "1000 channels" in _refusal(_patch_wav(_wav(1.0), channels=1000))
    assert "not a readable" in _refusal(_patch_wav(_wav(1.0), channels=0))


def test_ten_hours_declared_in_a_small_flac_is_refused_from_the_header() -> None:
    forged = _patch_flac(_flac(1.0, rate=8_000), total_samples=TEN_HOURS_S * 8_000)
    assert "audio is 36000.0 s long, longer than the 120 s limit" in _refusal(forged)
    # nothing is decoded: far less than the 1.15 GB ten hours of float32 would take
    assert _peak_traced_bytes(forged, 120) < 1 << 20


def test_decoding_stops_at_the_limit_when_the_header_does_not_say_how_long() -> None:
    # total_samples = 0 means "unknown" in FLAC: only the block reads bound it
    unknown = _patch_flac(_file(np.zeros(60 * 8_000, np.float32), 8_000, "FLAC"), total_samples=0)
    assert "longer than the 1 s limit" in _refusal(unknown, max_seconds=1)
    # 60 s at 16 kHz in float32 would be 3.8 MB; stopping at 1 s keeps it to a fraction
    assert _peak_traced_bytes(unknown, 1) < 1 << 20
    # within the limit the same unknown-length file reads whole
    samples, _ = read_audio_file(unknown, 120)
    assert abs(samples.size - 60 * 16_000) <= 1


def test_a_length_header_longer_than_the_data_reads_what_is_there() -> None:
    wav = bytearray(_wav(1.0))
    wav[4:8] = wav[40:44] = struct.pack("<I", 0xFFFF_FFF0)  # RIFF and data sizes claim 4 GB
    samples, _ = read_audio_file(bytes(wav), 120)
    assert samples.size == 16_000
    flac = _patch_flac(_flac(1.0), total_samples=16_000 * 60)  # claims 60 s, holds 1 s
    samples, _ = read_audio_file(flac, 120)
    assert samples.size == 16_000


@pytest.mark.parametrize(
    "data",
    [b"", b"not audio at all", bytes(range(256)) * 40, b"RIFF\xff\xff\xff\xffWAVEfmt ", b"fLaC" + b"\0" * 60],
)
def test_garbage_is_refused_plainly(data: bytes) -> None:
    assert _refusal(data) == "not a readable audio file (WAV, FLAC or MP3)"


def test_other_containers_are_refused_by_name() -> None:
    ogg = _file(_tone(0.5, 16_000), 16_000, "OGG", "VORBIS")
    assert _refusal(ogg) == "OGG files are not accepted: send WAV, FLAC or MP3"


def test_a_file_without_samples_is_refused() -> None:
    assert _refusal(_wav(0.0)) == "the audio file holds no samples"


def test_truncated_data_reads_what_arrived() -> None:
    wav = _wav(1.0)
    samples, _ = read_audio_file(wav[: 44 + 2 * 8_000], 120)
    assert samples.size == 8_000


# --- end to end, the scripted backend ------------------------------------


async def _generate_error(stub: pb_grpc.VoiceChatServiceStub, data: bytes) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(pb.GenerateRequest(audio=data), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "0x" not in info.value.details() and "object at" not in info.value.details()
    return info.value


async def test_generate_refuses_bad_files_with_invalid_argument(start_server: StartServer) -> None:
    running = await start_server()
    cases = [
        (_patch_wav(_wav(0.2), rate=96_001), "audio: sample rate 96001 Hz is outside the accepted 8000-48000 Hz"),
        (_patch_wav(_wav(0.2), channels=1000), "audio: 1000 channels: only mono or stereo files are accepted"),
        (
            _patch_flac(_flac(1.0, rate=8_000), total_samples=TEN_HOURS_S * 8_000),
            "audio: audio is 36000.0 s long, longer than the",
        ),
        (b"RIFF\xff\xff\xff\xffWAVEfmt ", "audio: not a readable audio file (WAV, FLAC or MP3)"),
    ]
    for data, message in cases:
        error = await _generate_error(running.stub, data)
        assert message in error.details()
    # the server is still there and still reads good files
    reply = await running.stub.Generate(pb.GenerateRequest(audio=_wav(1.0, rate=20_011, channels=2)))
    assert reply.text == "Turn 1. I heard 1.0 seconds of audio."


async def test_generate_limit_applies_to_files_whose_header_hides_their_length(start_server: StartServer) -> None:
    running = await start_server(max_generate_audio_seconds=2)
    unknown = _patch_flac(_file(np.zeros(5 * 8_000, np.float32), 8_000, "FLAC"), total_samples=0)
    error = await _generate_error(running.stub, unknown)
    assert "longer than" in error.details() and "2 s" in error.details()


# --- end to end, the real LFM2 backend -----------------------------------


async def test_lfm2_generate_at_an_odd_rate_stays_small(tiny_dir: Path) -> None:
    """20011 Hz reached the model package's resampler, which built a filter of
    several GB for that ratio; files now reach the model at 16 kHz."""
    settings = Settings(backend="lfm2", model=str(tiny_dir), host="127.0.0.1", port=0, warmup=False)
    server = VoiceChatServer(settings)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.VoiceChatServiceStub(channel)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            request = pb.GenerateRequest(
                audio=_wav(0.5, rate=20_011),
                mode=pb.GENERATE_MODE_TRANSCRIBE,
                sampling=pb.SamplingParams(max_new_tokens=4),
            )
            reply = await stub.Generate(request, timeout=120)
            grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    finally:
        await server.stop(0)
    assert reply.status == pb.RESPONSE_STATUS_MAX_TOKENS
    assert grown_kib < 1 << 20, f"peak RSS grew by {grown_kib} KiB"


# --- bytes that are not a request at all ----------------------------------

# a truncated varint; a string field cut short; a string field that is not UTF-8
_NOT_PROTOBUF = (b"\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe")


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


async def test_undecodable_generate_request_is_invalid_argument(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    running = await start_server()
    generate = running.channel.unary_unary(
        "/voicechat.v1.VoiceChatService/Generate",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    for data in _NOT_PROTOBUF:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(data, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "not a valid GenerateRequest" in info.value.details()
    assert not _tracebacks(caplog)


async def test_undecodable_converse_request_is_invalid_argument(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    running = await start_server()
    converse = running.channel.stream_stream(
        "/voicechat.v1.VoiceChatService/Converse",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.ConverseResponse.FromString,
    )

    async def first_bad(data: bytes) -> AsyncIterator[bytes]:
        yield data
        await asyncio.sleep(10)  # keep the stream open: the server must answer, not the half-close

    for data in _NOT_PROTOBUF:
        call = converse(first_bad(data), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "not a valid ConverseRequest" in info.value.details()
    assert not _tracebacks(caplog)

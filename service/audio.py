"""PCM helpers: sample format conversion, fixed-size re-framing, audio files.

`read_audio_file` is the one way an uploaded file (Generate's `audio`) becomes
samples. Its bytes come from the network, so nothing in them is trusted: the
container, sample rate, channel count and duration are checked from the header
before any audio is decoded, decoding reads forward in blocks and stops at the
duration limit whatever the header claims, and the result is always 16 kHz
mono, so the model's own resampler (which can build filters of many GB for odd
rates) is never reached.
"""

from __future__ import annotations

import io
import math
import wave
from typing import Final

import numpy as np
import soundfile

from service.resample import TARGET_RATE_HZ, Float32Array, StreamResampler

PCM16_MAX = 32767

# libsndfile's container names; WAVEX is WAV with the extensible format chunk.
# FLAC is accepted: its decoded size is bounded like the others' (header check,
# then block reads that stop at the limit), so a small file of hours of silence
# costs no more than reading its header.
ACCEPTED_FORMATS: Final = {"WAV": "WAV", "WAVEX": "WAV", "FLAC": "FLAC", "MP3": "MP3"}
# Any integer rate in this range is accepted and resampled with libsoxr (about
# 0.3 ms of CPU per second of audio at any ratio); telephone to studio rates.
MIN_FILE_RATE_HZ: Final = 8_000
MAX_FILE_RATE_HZ: Final = 48_000
MAX_FILE_CHANNELS: Final = 2
# Frames decoded per read: about 0.34 s at 48 kHz, so the overshoot past the
# limit and the transient memory stay small.
_BLOCK_FRAMES: Final = 16_384
# libsndfile reports a length it cannot know (a FLAC without total_samples,
# some MP3s) as SF_COUNT_MAX; such files are bounded by the block reads alone.
_UNKNOWN_FRAMES: Final = 2**62


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> PCM16 little-endian bytes (clipped)."""
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return (clipped * PCM16_MAX).round().astype("<i2").tobytes()


class PcmReframer:
    """Cuts a stream of PCM16 into chunks of exactly `chunk_samples` samples.

    `push` returns every complete chunk the new audio makes; `flush` returns
    the shorter remainder at the end of a response. Concatenating all outputs
    always equals the concatenated input (nothing lost, nothing repeated), so
    clients can play with a buffer of one or two chunks.
    """

    def __init__(self, chunk_samples: int) -> None:
        if chunk_samples <= 0:
            raise ValueError("chunk_samples must be positive")
        self._chunk_bytes = 2 * chunk_samples
        self._buffer = bytearray()

    @property
    def buffered_samples(self) -> int:
        return len(self._buffer) // 2

    def push(self, pcm16: bytes) -> list[bytes]:
        self._buffer += pcm16
        whole = len(self._buffer) - len(self._buffer) % self._chunk_bytes
        chunks = [bytes(self._buffer[i : i + self._chunk_bytes]) for i in range(0, whole, self._chunk_bytes)]
        del self._buffer[:whole]
        return chunks

    def flush(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


def encode_wav(pcm16: bytes, sample_rate: int) -> bytes:
    """Mono PCM16 bytes -> a WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm16)
    return out.getvalue()


class _ForwardReader(soundfile.SoundFile):
    """A SoundFile that only reads forward.

    After each read soundfile seeks to where the read ended; on a FLAC whose
    header misstates its length that seek fails at the end of the data, which
    would turn a readable file into an error. Reading forward needs no seek."""

    def seekable(self) -> bool:
        return False


def _open(data: bytes) -> _ForwardReader:
    try:
        return _ForwardReader(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # the exception's text names the BytesIO object (an address): say it plainly
        raise ValueError("not a readable audio file (WAV, FLAC or MP3)") from exc


def _check_header(reader: soundfile.SoundFile, max_seconds: float) -> int:
    """Validate what the header declares; returns the most frames to decode."""
    if reader.format not in ACCEPTED_FORMATS:
        raise ValueError(f"{reader.format} files are not accepted: send WAV, FLAC or MP3")
    rate, channels = int(reader.samplerate), int(reader.channels)
    if not MIN_FILE_RATE_HZ <= rate <= MAX_FILE_RATE_HZ:
        raise ValueError(f"sample rate {rate} Hz is outside the accepted {MIN_FILE_RATE_HZ}-{MAX_FILE_RATE_HZ} Hz")
    if not 1 <= channels <= MAX_FILE_CHANNELS:
        raise ValueError(f"{channels} channels: only mono or stereo files are accepted")
    declared = int(reader.frames)
    if declared <= 0:
        raise ValueError("the audio file holds no samples")
    if declared < _UNKNOWN_FRAMES and declared > max_seconds * rate:
        raise ValueError(f"audio is {declared / rate:.1f} s long, longer than the {max_seconds:g} s limit")
    return math.floor(max_seconds * rate)


def read_audio_file(data: bytes, max_seconds: float) -> tuple[Float32Array, int]:
    """A WAV, FLAC or MP3 file -> (mono float32 samples at 16 kHz, 16000).

    Accepts 1 or 2 channels (averaged to mono) at any rate from 8 to 48 kHz,
    at most `max_seconds` long. The header is checked before decoding, and
    decoding stops at `max_seconds` even when the header lies, so memory and
    CPU are bounded by the limit, not by the file. Samples are clipped to
    [-1, 1]; non-finite ones (a float WAV may hold NaN) become 0.

    Raises ValueError with a message fit for the client (it names the limit
    that was crossed) when the file is refused. Blocking: call it in a thread.
    """
    with _open(data) as reader:
        limit = _check_header(reader, max_seconds)
        rate = int(reader.samplerate)
        resampler = StreamResampler(rate)
        parts: list[Float32Array] = []
        decoded = 0
        while decoded <= limit:
            try:
                block = reader.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
            except (soundfile.LibsndfileError, RuntimeError) as exc:
                raise ValueError(f"the audio data is corrupt after {decoded / rate:.1f} s") from exc
            if len(block) == 0:
                break
            decoded += len(block)
            mono = np.nan_to_num(block.mean(axis=1), nan=0.0, posinf=0.0, neginf=0.0)
            parts.append(resampler.process(np.clip(mono, -1.0, 1.0)))
    if decoded > limit:
        raise ValueError(f"audio is longer than the {max_seconds:g} s limit")
    if decoded == 0:
        raise ValueError("the audio file holds no samples")
    parts.append(resampler.flush())
    return np.concatenate(parts).astype(np.float32, copy=False), TARGET_RATE_HZ

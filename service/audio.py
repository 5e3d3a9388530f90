"""PCM helpers: sample format conversion, fixed-size re-framing, WAV/MP3 files."""

from __future__ import annotations

import io
import wave

import numpy as np

PCM16_MAX = 32767


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> PCM16 little-endian bytes (clipped)."""
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return (clipped * PCM16_MAX).round().astype("<i2").tobytes()


def pcm16_to_float(data: bytes) -> np.ndarray:
    """PCM16 little-endian bytes -> float32 in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


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


def decode_audio_file(data: bytes) -> tuple[np.ndarray, int]:
    """A WAV or MP3 file -> (mono float32 samples, sample rate).

    Raises ValueError when the bytes are not a readable audio file.
    """
    import soundfile  # libsndfile reads WAV (PCM and float) and MP3

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise ValueError(f"not a readable WAV or MP3 file: {exc}") from exc
    return samples.mean(axis=1).astype(np.float32), int(rate)

"""Streaming conversion of client audio to the 16 kHz float32 the model and VAD expect.

Clients send PCM16 little-endian mono at 16, 24 or 48 kHz in chunks of any size. The resampler is a
proper band-limited one (libsoxr through the `soxr` package): dropping samples would fold everything
above 8 kHz back into the speech band. It keeps its filter state between chunks, so streaming a
signal in pieces gives the same samples as resampling it in one go; `flush` releases the few
milliseconds the filter still holds at the end of the input. Uploaded files (`service.audio`) go
through the same resampler at any rate from 8 to 48 kHz: libsoxr's cost does not depend on the
ratio, unlike a polyphase filter sized by the rates' greatest common divisor.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import soxr

TARGET_RATE_HZ: Final = 16_000
SUPPORTED_RATES_HZ: Final = frozenset({16_000, 24_000, 48_000})

# Full scale of signed 16-bit PCM; dividing by 2**15 maps -32768 exactly onto -1.0.
_PCM16_SCALE: Final = 32768.0

# "HQ" costs about 0.3 ms of CPU per second of 48 kHz audio here, the same as "MQ" within noise,
# so there is nothing to gain from a lower setting.
_QUALITY: Final = "HQ"

Float32Array = npt.NDArray[np.float32]


def pcm16_to_float32(pcm16: bytes | bytearray | memoryview) -> Float32Array:
    """Decode PCM16 little-endian mono bytes into float32 samples in [-1, 1)."""
    samples = np.frombuffer(pcm16, dtype="<i2")
    return samples.astype(np.float32) / np.float32(_PCM16_SCALE)


class StreamResampler:
    """Resamples one continuous mono stream to 16 kHz float32, chunk by chunk.

    Output lags input by the filter's delay (well under 10 ms at these rates); `flush` returns what
    is still held at the end of the stream, after which the resampler starts afresh. When the input
    rate already is 16 kHz the samples pass through untouched.
    """

    def __init__(self, input_rate_hz: int, *, output_rate_hz: int = TARGET_RATE_HZ) -> None:
        if input_rate_hz <= 0 or output_rate_hz <= 0:
            raise ValueError(f"sample rates must be positive, got {input_rate_hz} -> {output_rate_hz}")
        self._input_rate_hz = input_rate_hz
        self._output_rate_hz = output_rate_hz
        self._stream: soxr.ResampleStream | None = None
        if input_rate_hz != output_rate_hz:
            self._stream = soxr.ResampleStream(input_rate_hz, output_rate_hz, 1, dtype="float32", quality=_QUALITY)

    @property
    def input_rate_hz(self) -> int:
        return self._input_rate_hz

    @property
    def output_rate_hz(self) -> int:
        return self._output_rate_hz

    @property
    def passthrough(self) -> bool:
        """True when input and output rates match and samples are returned unchanged."""
        return self._stream is None

    def process_pcm16(self, pcm16: bytes | bytearray | memoryview) -> Float32Array:
        """Resample a chunk of PCM16 little-endian bytes (an even number of them)."""
        return self.process(pcm16_to_float32(pcm16))

    def process(self, samples: npt.ArrayLike) -> Float32Array:
        """Resample a chunk of float samples; may return fewer samples than expected (filter delay)."""
        chunk = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if self._stream is None:
            return chunk
        if chunk.size == 0:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(chunk)

    def flush(self) -> Float32Array:
        """Return the samples still held by the filter and reset for a new stream."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        # After `last=True` libsoxr accepts no more input until cleared.
        self._stream.clear()
        return tail

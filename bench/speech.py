"""Spoken utterances for the benchmarks: espeak-ng speech as 16 kHz PCM16.

espeak-ng's leading and trailing silence is trimmed off by amplitude, so the
end of the audio is the end of speech: the moment the benchmark measures
latency from. Needs the `espeak-ng` program (`make system-deps`).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import soxr

_TRIM_LEVEL = 100  # about -50 dBFS: quieter samples at the ends are espeak's padding


@functools.cache
def utterance(text: str, rate: int = 16_000, voice: str = "en") -> bytes:
    """`text` spoken by espeak-ng, trimmed, as PCM16 mono at `rate`."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is required for the benchmark (apt-get install espeak-ng, or make system-deps)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run([espeak, "-v", voice, "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path), "rb") as wav:
            native_rate = wav.getframerate()
            samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > _TRIM_LEVEL)
    if loud.size == 0:
        raise RuntimeError(f"espeak-ng produced silence for {text!r}")
    speech = samples[loud[0] : loud[-1] + 1].astype(np.float32) / 32768.0
    if native_rate != rate:
        speech = soxr.resample(speech, native_rate, rate, quality="HQ")
    return (np.clip(speech, -1.0, 1.0) * 32767).round().astype("<i2").tobytes()


def padded(pcm16: bytes, rate: int, total_ms: float) -> bytes:
    """`pcm16` followed by digital silence up to `total_ms` (never cut)."""
    missing = round(total_ms * rate / 1000) - len(pcm16) // 2
    return pcm16 + b"\0\0" * max(0, missing)


def duration_ms(pcm16: bytes, rate: int = 16_000) -> float:
    return len(pcm16) / 2 * 1000 / rate

"""Real speech for tests: espeak-ng utterances as PCM16 at 16, 24 or 48 kHz.

Synthesised speech gives turn detection something a neural VAD recognises as speech, with a
ground truth that does not come from any VAD: espeak-ng's own leading and trailing silence is
trimmed off by amplitude, so the speech starts and ends exactly where the padding says.

Needs the `espeak-ng` and `sox` programs (Debian packages of the same names). Synthesis runs once
per text and voice; the WAV files are cached in the system temp directory.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

ESPEAK_RATE_HZ = 22_050
# Samples quieter than this (about -50 dBFS) at the ends of espeak output count as silence.
_TRIM_LEVEL = 100
_CACHE_DIR = Path(tempfile.gettempdir()) / "voicechat-test-speech"


@dataclass(frozen=True, slots=True)
class Utterance:
    """PCM16 little-endian mono audio and the spans (ms) where sound really is."""

    pcm16: bytes
    rate: int
    spans: tuple[tuple[float, float], ...] = ()

    @property
    def duration_ms(self) -> float:
        return len(self.pcm16) // 2 * 1000 / self.rate

    @property
    def speech_start_ms(self) -> float:
        return self.spans[0][0]

    @property
    def speech_end_ms(self) -> float:
        return self.spans[-1][1]

    def samples(self) -> npt.NDArray[np.float32]:
        """The audio as float32 in [-1, 1), scaled like the service decodes PCM16."""
        return np.frombuffer(self.pcm16, dtype="<i2").astype(np.float32) / 32768.0

    def __add__(self, other: Utterance) -> Utterance:
        """Concatenate, shifting the other's spans by this one's duration."""
        if other.rate != self.rate:
            raise ValueError(f"cannot join {self.rate} Hz and {other.rate} Hz audio")
        shift = self.duration_ms
        return Utterance(
            pcm16=self.pcm16 + other.pcm16,
            rate=self.rate,
            spans=self.spans + tuple((a + shift, b + shift) for a, b in other.spans),
        )


def _require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise RuntimeError(f"{program} is required for speech tests (apt-get install espeak-ng sox)")
    return path


def _espeak_wav(text: str, voice: str) -> Path:
    key = hashlib.sha256(f"{voice}\0{text}".encode()).hexdigest()[:24]
    path = _CACHE_DIR / f"{key}.wav"
    if not path.exists():
        _CACHE_DIR.mkdir(parents=True, exist_ok=True)
        # Write under a unique name and rename, so parallel test workers never read half a file.
        fd, tmp = tempfile.mkstemp(dir=_CACHE_DIR, suffix=".wav")
        os.close(fd)
        subprocess.run([_require("espeak-ng"), "-v", voice, "-w", tmp, text], check=True)
        os.replace(tmp, path)
    return path


@functools.cache
def _speech(text: str, rate: int, voice: str) -> bytes:
    """Trimmed speech as PCM16 bytes at `rate` (trimmed at espeak's rate, so spans match)."""
    wav = _espeak_wav(text, voice)
    sox = _require("sox")
    native = subprocess.run(
        [sox, str(wav), "-t", "raw", "-e", "signed", "-b", "16", "-c", "1", "-"],
        check=True,
        capture_output=True,
    ).stdout
    samples = np.frombuffer(native, dtype="<i2")
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > _TRIM_LEVEL)
    if loud.size == 0:
        raise RuntimeError(f"espeak-ng produced silence for {text!r}")
    trimmed = samples[loud[0] : loud[-1] + 1].tobytes()
    if rate == ESPEAK_RATE_HZ:
        return trimmed
    raw = ["-t", "raw", "-e", "signed", "-b", "16", "-c", "1"]
    # sox's "rate -v" is its very-high-quality resampler: an independent reference for the service's.
    # -D: no dither, which sox otherwise adds at random after an effect, so the same text is the same
    # audio in every run (detectors near a threshold would decide differently from run to run).
    return subprocess.run(
        [sox, "-D", *raw, "-r", str(ESPEAK_RATE_HZ), "-", *raw, "-", "rate", "-v", str(rate)],
        input=trimmed,
        check=True,
        capture_output=True,
    ).stdout


def silence(ms: float, rate: int) -> Utterance:
    """Digital silence (all zeros)."""
    return Utterance(b"\0\0" * round(ms * rate / 1000), rate)


def noise(ms: float, rate: int, *, level_dbfs: float = -20.0, seed: int = 0) -> Utterance:
    """White noise at an RMS level; its span covers the whole burst."""
    rng = np.random.default_rng(seed)
    amplitude = 32768 * 10 ** (level_dbfs / 20)
    samples = np.clip(rng.standard_normal(round(ms * rate / 1000)) * amplitude, -32768, 32767)
    audio = samples.astype("<i2").tobytes()
    return Utterance(audio, rate, ((0.0, len(audio) // 2 * 1000 / rate),))


def speech(
    text: str,
    rate: int = 16_000,
    *,
    before_ms: float = 0.0,
    after_ms: float = 0.0,
    voice: str = "en",
) -> Utterance:
    """`text` spoken by espeak-ng at `rate`, padded with digital silence before and after."""
    body = _speech(text, rate, voice)
    spoken = Utterance(body, rate, ((0.0, len(body) // 2 * 1000 / rate),))
    return silence(before_ms, rate) + spoken + silence(after_ms, rate)


def chunks(pcm16: bytes, rate: int, ms: float) -> Iterator[bytes]:
    """Split PCM16 audio into chunks of `ms` milliseconds (the last may be shorter)."""
    size = max(1, round(rate * ms / 1000)) * 2
    for begin in range(0, len(pcm16), size):
        yield pcm16[begin : begin + size]


async def paced_chunks(pcm16: bytes, rate: int, ms: float, *, speed: float = 1.0) -> AsyncIterator[bytes]:
    """`chunks` at real-time pace (or `speed` times faster), as a microphone would send them."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent_s = 0.0
    for chunk in chunks(pcm16, rate, ms):
        # A microphone delivers a chunk once its last sample is recorded. Sleeping until that due
        # time, not for a fixed interval, keeps delays from adding up.
        sent_s += len(chunk) / 2 / rate
        await asyncio.sleep(max(0.0, started + sent_s / speed - loop.time()))
        yield chunk

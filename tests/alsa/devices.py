"""A file-backed sound card that runs in real time, for the microphone client's tests.

With `libportaudio2` installed and `ALSA_CONFIG_PATH` pointing at the file that
`FileSoundCard` writes, PortAudio's `default` device is:

* a microphone that plays back a PCM16 file (the utterance, then silence), and
* a speaker that records what the client played.

ALSA's `file` plugin does the copying, over a `null` device. A `null` device
has no clock: it would deliver and accept audio as fast as the CPU allows. The
card gets a real-time clock from two FIFOs that the test drains at exactly the
device's byte rate: the speaker writes into one, and the microphone copies
every captured block into the other (its "tap"), so both devices block on a
full FIFO and move no faster than real hardware. The FIFOs are shrunk to one
page (4 KiB, 128 ms of 16 kHz mono PCM16 and 85 ms of 24 kHz), which bounds
how far a device can run ahead of the clock.

The drained bytes are kept with the time each one was read: `mic_tap` holds
exactly the audio the client captured, `speaker` exactly what it played, and
`time_at(position)` tells when a byte passed the clock, which gives an
end-of-speech to first-played-sample latency measured outside the client.
"""

from __future__ import annotations

import fcntl
import os
import select
import threading
import time
from pathlib import Path
from types import TracebackType

import numpy as np

TEMPLATE = Path(__file__).with_name("asoundrc.template")
PIPE_BYTES = 4096  # the smallest FIFO Linux allows: one page
READ_BYTES = 480  # drained per step: 15 ms at 16 kHz PCM16, 10 ms at 24 kHz


class PacedDrain(threading.Thread):
    """Reads a FIFO at `bytes_per_second`, keeping the data and when each part was read.

    The clock starts with the first byte. When the writer falls behind (the
    device was not running), the clock is moved on instead of letting it catch
    up in a burst, as a real device would drop rather than speed up."""

    def __init__(self, path: Path, bytes_per_second: int) -> None:
        super().__init__(name=f"drain-{path.name}", daemon=True)
        self.path = path
        self.rate = bytes_per_second
        self.data = bytearray()
        self.marks: list[tuple[int, float]] = []  # (bytes read so far, monotonic time)
        self._halt = threading.Event()
        # O_RDWR: opening never blocks and the FIFO never reports end-of-file
        # while the devices open and close it (PortAudio probes them first).
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    def run(self) -> None:
        start: float | None = None
        while not self._halt.is_set():
            if start is not None:
                now = time.monotonic()
                due = (now - start) * self.rate
                if due - len(self.data) > 0.1 * self.rate:  # writer stalled: do not burst
                    start = now - len(self.data) / self.rate
                    due = len(self.data)
                wait = (len(self.data) + READ_BYTES - due) / self.rate
                if wait > 0:
                    time.sleep(wait)
            ready, _, _ = select.select([self._fd], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = os.read(self._fd, READ_BYTES)
            except BlockingIOError:
                continue
            now = time.monotonic()
            if start is None:
                start = now
            self.data += chunk
            self.marks.append((len(self.data), now))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        os.close(self._fd)

    def time_at(self, position: int) -> float | None:
        """When byte `position` was read (time.monotonic()), None if not yet."""
        for total, at in self.marks:
            if total > position:
                return at
        return None

    def samples(self) -> np.ndarray:
        usable = len(self.data) - len(self.data) % 2
        return np.frombuffer(bytes(self.data[:usable]), dtype="<i2")


class FileSoundCard:
    """ALSA `default` device: microphone from `mic_pcm16`, speaker into `speaker`.

    Use as a context manager and run the client with `env` added to its
    environment. The microphone plays `mic_pcm16` (PCM16 mono at `mic_rate`)
    followed by `tail_s` seconds of silence."""

    def __init__(
        self,
        folder: Path,
        mic_pcm16: bytes,
        mic_rate: int = 16_000,
        speaker_rate: int = 24_000,
        tail_s: float = 120.0,
    ) -> None:
        self.folder = folder
        self.mic_rate = mic_rate
        self.speaker_rate = speaker_rate
        self.mic_file = folder / "mic.raw"
        self.mic_tap_fifo = folder / "mic-tap.fifo"
        self.speaker_fifo = folder / "speaker.fifo"
        self.config = folder / "asound.conf"
        self.mic_file.write_bytes(mic_pcm16 + b"\0\0" * int(tail_s * mic_rate))
        os.mkfifo(self.mic_tap_fifo)
        os.mkfifo(self.speaker_fifo)
        text = TEMPLATE.read_text()
        for key, path in (
            ("MIC_FILE", self.mic_file),
            ("MIC_TAP", self.mic_tap_fifo),
            ("SPEAKER_FIFO", self.speaker_fifo),
        ):
            text = text.replace(f"@{key}@", str(path))
        self.config.write_text(text)
        self.mic_tap = PacedDrain(self.mic_tap_fifo, 2 * mic_rate)
        self.speaker = PacedDrain(self.speaker_fifo, 2 * speaker_rate)

    @property
    def env(self) -> dict[str, str]:
        return {"ALSA_CONFIG_PATH": str(self.config)}

    def __enter__(self) -> FileSoundCard:
        self.mic_tap.start()
        self.speaker.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.mic_tap.stop()
        self.speaker.stop()

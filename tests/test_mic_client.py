"""The microphone client: its playback buffer and send queue, then whole sessions
through real PortAudio streams on a file-backed ALSA sound card (tests/alsa).

The end-to-end tests run `python -m clients.mic` in a subprocess with
`ALSA_CONFIG_PATH` pointing at the card, so PortAudio starts with that
configuration. The card's microphone plays synthesised speech in real time,
the in-process server's VAD commits the turn, and the card's speaker records
what the client played; the recording is compared with the audio the server
produced, and the client's end-of-speech -> first-played-sample latency with
the one the card measured.
"""

from __future__ import annotations

import asyncio
import ctypes.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from clients.aio import VoiceChatClient, make_config
from clients.mic import COMMIT, Console, InputTimeline, MicSession, PlaybackBuffer, SendQueue, parse_args
from service.backends.scripted import ScriptedBackend, ScriptedDecoder
from tests.alsa.devices import FileSoundCard
from tests.helpers import metric_blocks
from tests.speech import silence, speech

REPO = Path(__file__).resolve().parent.parent
RATE = 24_000
BLOCK = 240  # frames per device callback, as the client opens its speaker


def pcm(samples: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(samples, dtype="<i2").tobytes()


def ramp(n: int, start: int = 1) -> np.ndarray:
    return (np.arange(n) + start).astype(np.int16)


class Notes:
    """Collects PlaybackBuffer notifications."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, float]] = []

    def __call__(self, kind: str, response_id: str, when: float) -> None:
        self.items.append((kind, response_id, when))

    def kinds(self) -> list[tuple[str, str]]:
        return [(k, r) for k, r, _ in self.items]


def fill(buffer: PlaybackBuffer, frames: int = BLOCK, now: float = 0.0) -> np.ndarray:
    out = np.full((frames, 1), 12345, dtype=np.int16)  # garbage: fill must overwrite all of it
    buffer.fill(out, now)
    return out[:, 0].copy()


# -- playback buffer ---------------------------------------------------------------------


def test_plays_pushed_audio_in_order_once_primed() -> None:
    notes = Notes()
    buffer = PlaybackBuffer(RATE, prime_ms=50, notify=notes)  # 1200 samples
    audio = ramp(3000)
    buffer.push(pcm(audio[:1000]), "r1")
    assert not fill(buffer).any(), "below the priming level: silence"
    buffer.push(pcm(audio[1000:]), "r1")
    played = np.concatenate([fill(buffer) for _ in range(13)])[:3000]
    np.testing.assert_array_equal(played, audio)
    assert buffer.played_ms("r1") == 125
    assert notes.kinds()[0] == ("first", "r1")
    assert buffer.underruns == 1  # audio ran out and no end marker: an underrun
    assert buffer.queued_samples == 0


def test_short_response_plays_without_reaching_the_priming_level() -> None:
    notes = Notes()
    buffer = PlaybackBuffer(RATE, prime_ms=50, notify=notes)
    buffer.push(pcm(ramp(100)), "r1")
    buffer.end("r1")
    out = fill(buffer)
    np.testing.assert_array_equal(out[:100], ramp(100))
    assert not out[100:].any()
    assert notes.kinds() == [("first", "r1"), ("done", "r1")]
    assert buffer.underruns == 0, "the end of a response is not an underrun"


def test_flush_silences_the_next_callback_and_freezes_the_played_count() -> None:
    notes = Notes()
    buffer = PlaybackBuffer(RATE, prime_ms=10, notify=notes)
    buffer.push(pcm(ramp(RATE)), "r1")  # one second of audio
    assert fill(buffer).all()
    assert fill(buffer).all()
    buffer.flush()
    after = fill(buffer)
    assert not after.any(), "the first callback after a flush plays silence"
    assert buffer.played["r1"] == 2 * BLOCK
    assert ("flushed", "") in notes.kinds()
    assert buffer.queued_samples == 0
    for _ in range(5):
        assert not fill(buffer).any()
    assert buffer.played["r1"] == 2 * BLOCK
    assert buffer.underruns == 0, "a flush is not an underrun"


def test_audio_pushed_after_a_flush_plays() -> None:
    buffer = PlaybackBuffer(RATE, prime_ms=10)
    buffer.push(pcm(ramp(2000)), "r1")
    fill(buffer)
    buffer.flush()
    buffer.push(pcm(np.full(1000, 7)), "r2")
    buffer.end("r2")
    out = np.concatenate([fill(buffer) for _ in range(5)])
    assert set(np.unique(out)) == {0, 7}
    assert (out == 7).sum() == 1000
    assert buffer.played["r1"] == BLOCK
    assert buffer.played["r2"] == 1000


def test_underruns_are_counted_and_filled_with_silence() -> None:
    buffer = PlaybackBuffer(RATE, prime_ms=10)  # 240 samples
    buffer.push(pcm(ramp(300)), "r1")
    first = fill(buffer)
    second = fill(buffer)
    assert first.all() and second[:60].all() and not second[60:].any()
    assert buffer.underruns == 1
    assert buffer.underrun_samples == BLOCK - 60
    assert not fill(buffer).any()
    assert buffer.underrun_samples == 2 * BLOCK - 60, "waiting to re-prime inside a response counts too"
    buffer.push(pcm(ramp(240)), "r1")
    assert fill(buffer).all(), "re-primed"
    buffer.end("r1")
    assert not fill(buffer).any()
    assert buffer.underruns == 1, "running out at the end marker is the end, not an underrun"
    assert not fill(buffer).any()
    assert buffer.underrun_samples == 2 * BLOCK - 60, "silence between responses is not counted"


def test_back_to_back_responses_each_report_first_and_done() -> None:
    notes = Notes()
    buffer = PlaybackBuffer(RATE, prime_ms=1, notify=notes)
    for name in ("a", "b"):
        buffer.push(pcm(ramp(500)), name)
        buffer.end(name)
    for _ in range(8):
        fill(buffer)
    assert notes.kinds() == [("first", "a"), ("done", "a"), ("first", "b"), ("done", "b")]
    assert buffer.played == {"a": 500, "b": 500}


def test_first_notification_carries_the_time_of_the_first_sample() -> None:
    notes = Notes()
    buffer = PlaybackBuffer(RATE, prime_ms=1, notify=notes)
    buffer.push(pcm(ramp(10)), "a")
    buffer.end("a")
    buffer.push(pcm(ramp(100)), "b")
    fill(buffer, now=100.0)  # "a" plays at the start of the block, then its end marker
    fill(buffer, now=100.01)  # "b" primes on the next block
    firsts = {r: t for k, r, t in notes.items if k == "first"}
    assert firsts["a"] == pytest.approx(100.0)
    assert firsts["b"] == pytest.approx(100.01)


def test_callback_and_producer_threads_lose_nothing() -> None:
    """A device thread pulling while the loop thread pushes: every sample
    arrives once, in order (the lock-free hand-over holds under contention)."""
    buffer = PlaybackBuffer(RATE, prime_ms=1)
    total = 200 * 480
    source = (np.arange(total) % 30000 + 1).astype(np.int16)
    received: list[np.ndarray] = []
    done = threading.Event()

    def device() -> None:
        while not done.is_set() or buffer.queued_samples:
            received.append(fill(buffer))

    thread = threading.Thread(target=device)
    thread.start()
    for start in range(0, total, 480):
        buffer.push(pcm(source[start : start + 480]), "r")
    buffer.end("r")
    done.set()
    thread.join(10)
    played = np.concatenate(received)
    np.testing.assert_array_equal(played[played != 0], source)


# -- send queue and input timeline ---------------------------------------------------------


async def test_send_queue_drops_the_oldest_audio_but_never_a_commit() -> None:
    queue = SendQueue(limit=3)
    queue.put((b"a", 0.0))
    queue.put(COMMIT)
    queue.put((b"b", 0.0))
    queue.put((b"c", 0.0))
    queue.put((b"d", 0.0))
    got = [await queue.get() for _ in range(3)]
    assert got == [COMMIT, (b"c", 0.0), (b"d", 0.0)]
    assert queue.dropped == 2


async def test_send_queue_get_waits_for_a_put() -> None:
    queue = SendQueue()
    waiter = asyncio.create_task(queue.get())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    queue.put((b"x", 1.0))
    assert await asyncio.wait_for(waiter, 1) == (b"x", 1.0)


def test_input_timeline_maps_positions_to_capture_times() -> None:
    timeline = InputTimeline(16_000)
    for block in range(10):  # 20 ms blocks captured at t = 10.02, 10.04, ...
        timeline.add(320, 10.0 + 0.02 * (block + 1))
    assert timeline.time_of(100) == pytest.approx(10.1)
    assert timeline.time_of(110) == pytest.approx(10.11)
    assert timeline.time_of(500) is None


# -- whole sessions through PortAudio and ALSA ------------------------------------------------

needs_portaudio = pytest.mark.skipif(
    ctypes.util.find_library("portaudio") is None, reason="PortAudio is not installed (apt-get install libportaudio2)"
)
needs_speech = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="espeak-ng and sox make the test speech"
)

QUESTION = "What is the weather like in Paris tomorrow?"
FOLLOW_UP = "Wait, tell me about London instead."


class RecordingBackend(ScriptedBackend):
    """The scripted backend, keeping every sample its decoders produce."""

    def __init__(self, **kwargs: float) -> None:
        super().__init__(**kwargs)
        self.decoded: list[np.ndarray] = []

    def new_decoder(self) -> ScriptedDecoder:
        decoder = super().new_decoder()
        original = decoder.decode

        def decode(frames: Sequence[np.ndarray]) -> np.ndarray:
            out = original(frames)
            self.decoded.append(out)
            return out

        decoder.decode = decode  # type: ignore[method-assign]
        return decoder

    def pcm16(self) -> np.ndarray:
        audio = np.concatenate(self.decoded) if self.decoded else np.zeros(0, np.float32)
        return (np.clip(audio, -1, 1) * 32767).round().astype(np.int16)


async def run_mic(target: str, card: FileSoundCard, *args: str, limit_s: float = 90) -> tuple[int, str, str]:
    env = {**os.environ, **card.env, "PYTHONUNBUFFERED": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.mic", "--target", target, *args,
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), limit_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, out.decode(), err.decode()


def best_alignment(recording: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """Offset of `reference` in `recording` by FFT cross-correlation, and the
    normalised correlation there."""
    rec = recording.astype(np.float64)
    ref = reference.astype(np.float64)
    size = 1 << int(np.ceil(np.log2(len(rec) + len(ref))))
    corr = np.fft.irfft(np.fft.rfft(rec, size) * np.conj(np.fft.rfft(ref, size)), size)[: len(rec) - len(ref) + 1]
    offset = int(np.argmax(corr))
    window = rec[offset : offset + len(ref)]
    score = float(window @ ref / (np.linalg.norm(window) * np.linalg.norm(ref) + 1e-9))
    return offset, score


@pytest.fixture
def card_folder(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "card"
    folder.mkdir()
    yield folder


@needs_portaudio
@needs_speech
async def test_spoken_turn_through_real_sound_devices(start_server, card_folder: Path) -> None:
    backend = RecordingBackend(step_ms=5.0)
    running = await start_server(backend=backend)
    utterance = speech(QUESTION, 16_000, before_ms=1_500)
    metrics_file = card_folder / "metrics.json"
    with FileSoundCard(card_folder, utterance.pcm16) as card:
        code, out, err = await run_mic(
            running.target, card,
            "--max-responses", "1", "--duration", "60", "--trace", "--show-metrics",
            "--metrics-json", str(metrics_file),
        )  # fmt: skip
    assert code == 0, err
    report = json.loads(metrics_file.read_text())
    (response,) = report["responses"]
    assert response["status"] == "COMPLETED"
    assert re.fullmatch(r"Turn 1\. I heard \d+\.\d seconds of audio\.", response["text"]), response
    assert f"assistant: {response['text']}" in out

    # The microphone delivered exactly the utterance, in real time.
    mic = np.frombuffer(utterance.pcm16, dtype="<i2")
    captured = card.mic_tap.samples()
    assert len(captured) > len(mic)
    np.testing.assert_array_equal(captured[: len(mic)], mic)

    # The speaker played exactly the server's audio, without gaps.
    server_audio = backend.pcm16()
    played = card.speaker.samples()
    assert len(server_audio) == response["audio_ms"] * RATE // 1000
    offset, score = best_alignment(played, server_audio)
    assert score > 0.999, score
    np.testing.assert_array_equal(played[offset : offset + len(server_audio)], server_audio)
    assert not played[:offset].any(), "nothing but silence before the reply"
    assert response["played_ms"] == response["audio_ms"]
    assert report["playback"]["underruns"] == 0

    # End of speech -> first played sample: the client's figure is plausible
    # (VAD needs 500 ms of silence) and agrees with the card's own clock.
    latency = response["speech_end_to_first_play_ms"]
    assert 450 < latency < 5_000, response
    speech_end = card.mic_tap.time_at(int(utterance.speech_end_ms * 16) * 2)
    first_played = card.speaker.time_at(offset * 2)
    assert speech_end is not None and first_played is not None
    measured = (first_played - speech_end) * 1000
    assert abs(measured - latency) < 400, (measured, latency)
    print(f"end of speech -> first played sample: client {latency:.0f} ms, sound card {measured:.0f} ms")

    # --show-metrics printed the same figures, and the server's trace.
    blocks = metric_blocks(out)
    assert blocks["metrics (resp_1)"]["speech_end_to_first_play_ms"] == pytest.approx(latency, abs=0.1)
    assert "prefill_ms" in blocks["metrics (server, resp_1)"]
    assert blocks["session"]["underruns"] == 0
    assert blocks["event latency (ms)"]["count"] > 10
    assert response["server"]["commit_to_first_audio_ms"] > 0
    assert report["seq_gaps"] == 0


@needs_portaudio
@needs_speech
async def test_barge_in_flushes_playback_and_truncates(start_server, card_folder: Path) -> None:
    backend = RecordingBackend(step_ms=5.0)
    running = await start_server(backend=backend)
    question = speech(QUESTION, 16_000, before_ms=1_500)
    # the follow-up starts ~1.2 s into the 2.6 s reply (VAD commits 0.5 s after the question)
    audio = question + silence(1_800, 16_000) + speech(FOLLOW_UP, 16_000)
    metrics_file = card_folder / "metrics.json"
    with FileSoundCard(card_folder, audio.pcm16) as card:
        code, out, err = await run_mic(
            running.target, card, "--max-responses", "2", "--duration", "60", "--metrics-json", str(metrics_file)
        )
    assert code == 0, err
    report = json.loads(metrics_file.read_text())
    first, second = report["responses"]
    assert first["interrupted"], first
    assert "(interrupted resp_1)" in err
    # the client stopped at once: it played only part of the reply, and said how much
    assert 0 < first["played_ms"] < first["audio_ms"], first
    assert first["truncated_ms"] == first["played_ms"]
    # the server kept at most what was heard (the scripted reply says so)
    match = re.match(r"\(You heard (\d+) ms of my last answer\.\) Turn 2\. ", second["text"])
    assert match, second["text"]
    assert int(match.group(1)) <= -(-first["played_ms"] // 80) * 80
    print(f"barge-in: played {first['played_ms']} of {first['audio_ms']} ms; the server kept {match.group(1)} ms")
    assert second["status"] == "COMPLETED"
    # the speaker recording holds the cut first reply, then the whole second one
    played = card.speaker.samples()
    server_audio = backend.pcm16()
    first_len = first["audio_ms"] * RATE // 1000
    heard = server_audio[: first["played_ms"] * RATE // 1000]
    second_audio = server_audio[first_len:]
    assert len(second_audio) == second["audio_ms"] * RATE // 1000
    start_1, score_1 = best_alignment(played, heard)
    start_2, score_2 = best_alignment(played, second_audio)
    assert score_1 > 0.999 and score_2 > 0.999, (score_1, score_2)
    np.testing.assert_array_equal(played[start_1 : start_1 + len(heard)], heard)
    np.testing.assert_array_equal(played[start_2 : start_2 + len(second_audio)], second_audio)
    assert not played[start_1 + len(heard) : start_2].any(), "silence from the flush to the second reply"


@asynccontextmanager
async def mic_process(target: str, card: FileSoundCard, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m clients.mic` with pipes on stdin, stdout and stderr; killed if still running at the end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.mic", "--target", target, *args,
        cwd=REPO, env={**os.environ, **card.env},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def press_enter(process: asyncio.subprocess.Process) -> None:
    assert process.stdin is not None
    process.stdin.write(b"\n")
    await process.stdin.drain()


async def read_until(stream: asyncio.StreamReader | None, text: bytes) -> None:
    assert stream is not None
    async with asyncio.timeout(30):
        while text not in (line := await stream.readline()):
            assert line, f"the client exited before printing {text!r}"


@needs_portaudio
@needs_speech
async def test_push_to_talk_turn(start_server, card_folder: Path) -> None:
    running = await start_server(scripted_step_ms=5)
    utterance = speech(QUESTION, 16_000, before_ms=300)
    metrics_file = card_folder / "metrics.json"
    with FileSoundCard(card_folder, utterance.pcm16) as card:
        async with mic_process(
            running.target, card, "--push-to-talk", "--max-responses", "1", "--duration", "60",
            "--metrics-json", str(metrics_file),
        ) as process:  # fmt: skip
            await read_until(process.stderr, b"[press Enter to talk]")
            await press_enter(process)  # start talking
            await read_until(process.stderr, b"[recording: Enter to send]")
            await asyncio.sleep(utterance.duration_ms / 1000 + 0.5)
            await press_enter(process)  # done: send the turn
            out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    (response,) = json.loads(metrics_file.read_text())["responses"]
    assert response["status"] == "COMPLETED"
    heard = re.fullmatch(r"Turn 1\. I heard (\d+\.\d) seconds of audio\.", response["text"])
    assert heard, response["text"]
    # everything recorded between the two key presses, and nothing before the first
    assert utterance.duration_ms / 1000 - 0.5 < float(heard.group(1)) < utterance.duration_ms / 1000 + 3
    assert b"you: (" in out and response["text"].encode() in out
    # key released -> first played sample: no VAD wait in push-to-talk
    assert 0 < response["speech_end_to_first_play_ms"] < 3_000, response
    print(
        f"push-to-talk: heard {heard.group(1)} s, key released -> first played {response['speech_end_to_first_play_ms']} ms"
    )
    assert response["played_ms"] == response["audio_ms"]


@needs_portaudio
@needs_speech
async def test_push_to_talk_over_the_reply_stops_it_and_truncates(start_server, card_folder: Path) -> None:
    """Talking over the assistant in push-to-talk mode: the client itself cancels,
    flushes and truncates (the server's VAD plays no part in manual mode)."""
    running = await start_server(scripted_step_ms=5)
    utterance = speech(QUESTION, 16_000, before_ms=300)
    metrics_file = card_folder / "metrics.json"
    with FileSoundCard(card_folder, utterance.pcm16) as card:
        async with mic_process(
            running.target, card, "--push-to-talk", "--max-responses", "2", "--duration", "60",
            "--metrics-json", str(metrics_file),
        ) as process:  # fmt: skip
            await read_until(process.stderr, b"[press Enter to talk]")
            await press_enter(process)
            await asyncio.sleep(utterance.duration_ms / 1000 + 0.3)
            await press_enter(process)  # send the question
            await read_until(process.stderr, b"[speaking]")
            await asyncio.sleep(0.8)
            await press_enter(process)  # talk over the reply
            await read_until(process.stderr, b"(interrupted resp_1)")
            await asyncio.sleep(0.5)
            await press_enter(process)  # send the follow-up
            out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    first, second = json.loads(metrics_file.read_text())["responses"]
    # generation is normally over by then (COMPLETED); on a slow machine the client cancels it
    assert first["interrupted"] and first["status"] in ("COMPLETED", "CANCELLED"), first
    assert 0 < first["played_ms"] < first["audio_ms"], first
    assert first["truncated_ms"] == first["played_ms"]
    # the scripted model kept exactly the frames the client reported as played
    kept = -(-first["played_ms"] // 80) * 80
    assert second["text"].startswith(f"(You heard {kept} ms of my last answer.) Turn 2. I heard "), second
    print(f"push-to-talk barge-in: played {first['played_ms']} of {first['audio_ms']} ms, the server kept {kept} ms")


@needs_portaudio
async def test_typed_turn_plays_through_the_speaker(start_server, card_folder: Path) -> None:
    """--say sends a typed turn; the reply plays exactly once, sample for sample (no speech needed)."""
    backend = RecordingBackend()
    running = await start_server(backend=backend)
    metrics_file = card_folder / "metrics.json"
    with FileSoundCard(card_folder, b"") as card:
        code, out, err = await run_mic(
            running.target, card, "--say", "Hi there #frames=6", "--max-responses", "1", "--duration", "60",
            "--metrics-json", str(metrics_file),
        )  # fmt: skip
    assert code == 0, err
    assert "you: (18 typed characters)" in out
    assert "assistant: Turn 1. You said: Hi there." in out
    (response,) = json.loads(metrics_file.read_text())["responses"]
    assert response["audio_ms"] == response["played_ms"] == 480
    assert response["speech_end_to_first_play_ms"] is None  # nobody spoke
    server_audio = backend.pcm16()
    played = card.speaker.samples()
    offset, score = best_alignment(played, server_audio)
    assert score > 0.999
    np.testing.assert_array_equal(played[offset : offset + len(server_audio)], server_audio)
    assert not played[:offset].any() and not played[offset + len(server_audio) :].any()


@needs_portaudio
async def test_ctrl_c_ends_the_session_cleanly(start_server, card_folder: Path) -> None:
    running = await start_server()
    with FileSoundCard(card_folder, b"") as card:
        async with mic_process(running.target, card, "--duration", "60") as process:
            await read_until(process.stderr, b"[listening]")  # the session is open, the devices run
            process.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err
    assert b"Traceback" not in err
    assert b"bye (stopped by the user)" in err
    assert len(card.mic_tap.data) > 0, "the microphone was running"


@needs_portaudio
def test_list_devices_shows_the_file_backed_card(card_folder: Path) -> None:
    with FileSoundCard(card_folder, b"") as card:
        result = subprocess.run(
            [sys.executable, "-m", "clients.mic", "--list-devices"],
            cwd=REPO, env={**os.environ, **card.env}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "default" in result.stdout


# -- no sound devices ----------------------------------------------------------------------

# An ALSA configuration whose only PCM, `default`, opens nothing: PortAudio lists
# no device. It replaces the system's alsa.conf, so not even `hw` devices are
# defined. (An empty file is no good: PortAudio aborts on it.)
NO_DEVICES_ASOUNDRC = 'pcm.!default { type plug slave.pcm "nonexistent" }\n'
NOWHERE = "127.0.0.1:1"  # nothing listens: the device check must come before connecting


def run_mic_without_devices(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "asound.conf"
    path.write_text(NO_DEVICES_ASOUNDRC)
    return subprocess.run(
        [sys.executable, "-m", "clients.mic", *args],
        cwd=REPO, env={**os.environ, "ALSA_CONFIG_PATH": str(path)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def assert_explains_what_to_do(stderr: str) -> None:
    for hint in ("--list-devices", "--input-device", "--output-device", "libportaudio2", "`audio` group",
                 "PulseAudio", "--device /dev/snd"):  # fmt: skip
        assert hint in stderr, (hint, stderr)
    assert "Traceback" not in stderr


@needs_portaudio
def test_list_devices_without_devices_says_so(tmp_path: Path) -> None:
    result = run_mic_without_devices(tmp_path, "--list-devices")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("no sound device found: PortAudio sees none.")
    assert_explains_what_to_do(result.stderr)


@needs_portaudio
def test_session_without_devices_explains_instead_of_failing_on_device_minus_one(tmp_path: Path) -> None:
    result = run_mic_without_devices(tmp_path, "--target", NOWHERE, "--duration", "5")
    assert result.returncode == 1
    assert result.stderr.startswith("error: no sound device found: PortAudio sees no microphone and no speaker.")
    assert "device -1" not in result.stderr and "UNAVAILABLE" not in result.stderr
    assert_explains_what_to_do(result.stderr)


@needs_portaudio
def test_a_device_that_does_not_exist_is_named(card_folder: Path) -> None:
    with FileSoundCard(card_folder, b"") as card:
        result = subprocess.run(
            [sys.executable, "-m", "clients.mic", "--target", NOWHERE, "--input-device", "no such mic",
             "--output-device", "7"],
            cwd=REPO, env={**os.environ, **card.env}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    first_line = result.stderr.splitlines()[0]
    assert first_line == (
        "error: no microphone (input) device matches --input-device 'no such mic'; "
        "no speaker (output) device matches --output-device 7. This client needs both a microphone and a speaker."
    )
    assert_explains_what_to_do(result.stderr)


# -- MicSession bookkeeping ------------------------------------------------------------------


@pytest.fixture
async def mic_session(start_server) -> AsyncIterator[MicSession]:
    """A MicSession on a real conversation, with no sound devices: the tests play the device."""
    running = await start_server()
    async with VoiceChatClient.connect(running.target) as client:
        async with client.conversation(make_config(manual=True)) as conv:
            yield MicSession(conv, parse_args(["--quiet"]), Console(quiet=True))


def device_block(session: MicSession) -> None:
    """One speaker callback, as PortAudio's thread would run it."""
    session.playback.fill(np.zeros((BLOCK, 1), np.int16))


async def test_overlapping_interrupts_each_wait_for_their_own_flush(mic_session: MicSession) -> None:
    session = mic_session
    session.playback.push(pcm(ramp(4800)), "resp_1")
    first = asyncio.create_task(session.flush_playback())
    await asyncio.sleep(0)  # the first flush is requested
    device_block(session)  # the device applies it; its notification is on its way to the loop
    second = asyncio.create_task(session.flush_playback())
    await asyncio.sleep(0)
    assert await first, "the first flush was applied: its waiter must not sit out the timeout"
    assert not second.done(), "the second flush is not applied yet"
    device_block(session)
    assert await second
    assert session.playback.applied_flushes == 2


async def test_two_flushes_before_one_device_block_are_both_applied(mic_session: MicSession) -> None:
    session = mic_session
    waiters = [asyncio.create_task(session.flush_playback()) for _ in range(2)]
    await asyncio.sleep(0)
    device_block(session)  # one callback applies every flush requested before it
    assert await asyncio.gather(*waiters) == [True, True]


async def test_finished_spawned_tasks_are_forgotten(mic_session: MicSession) -> None:
    session = mic_session
    release = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        session._tasks = group
        for index in range(50):
            session._spawn(asyncio.sleep(0), f"short-{index}")
        short = set(session._running)
        session._spawn(release.wait(), "pending")
        await asyncio.wait(short)  # their done callbacks ran first: they were added first
        assert [t.get_name() for t in session._running] == ["pending"]
        release.set()
    assert not session._running

"""`python -m clients.mic`: talk with the model through a microphone and speakers.

    python -m clients.mic                       # hands-free: the server hears when you stop
    python -m clients.mic --push-to-talk        # Enter starts talking, Enter again sends
    python -m clients.mic --list-devices
    python -m clients.mic --show-metrics --trace --metrics-json session.json

Hands-free mode streams the microphone continuously and lets the server's voice
activity detection end each turn; speaking over the assistant interrupts it
(barge-in; use headphones, or `--no-interrupt`, so it does not hear itself).

Audio path. Capture: 16 kHz int16 mono in small blocks (20 ms); the device
callback only copies the block and hands it to the event loop, which queues it
for sending. Playback: an OutputStream at 24 kHz with 240-frame blocks and
`latency='low'` pulls from a `PlaybackBuffer`: playback of a response starts
once ~50 ms are buffered (or its audio is complete), a starved buffer plays
silence (counted as an underrun), and `playback_interrupted` flushes everything
at the next callback. After an interrupted response the client sends
`truncate` with the audio it really played, so the model's memory of the
conversation matches what the user heard.

Headless use and tests: `--duration S` and `--max-responses N` end the session,
`--say TEXT` sends a typed turn at the start, `--metrics-json FILE` writes what
`--show-metrics` prints. Ctrl-C ends the session cleanly (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from clients.aio import (
    OUTPUT_SAMPLE_RATE,
    Conversation,
    Event,
    VoiceChatClient,
    VoiceChatError,
    latency_summary,
    make_config,
    message_dict,
    print_block,
    status_name,
)
from clients.connection import TargetError, add_connection_args, options_from_args
from voicechat.v1 import voicechat_pb2 as pb

MIC_RATE: Final = 16_000
SPEAKER_RATE: Final = OUTPUT_SAMPLE_RATE
# Mic blocks waiting for the network; beyond this the oldest is dropped (see SendQueue).
SEND_QUEUE_BLOCKS: Final = 100
# How long to wait for the device callback to apply a flush before going on anyway.
FLUSH_WAIT_S: Final = 0.5

Notify = Callable[[str, str, float], None]


# -- playback ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Piece:
    samples: np.ndarray  # int16; empty for an end marker
    response_id: str
    epoch: int
    end: bool = False


class PlaybackBuffer:
    """Audio waiting for the speaker: the event loop pushes, the device callback pulls.

    Thread-safety without locks: the loop only appends to a deque and bumps
    counters it alone writes (`_written`, `_epoch`); the callback only pops from
    the deque and writes its own counters. `flush()` bumps the epoch; the
    callback drops every piece of an older epoch at its next call, so a flush
    takes effect within one device block.

    `notify(kind, response_id, when)` is called from the callback thread (keep
    it tiny, e.g. `loop.call_soon_threadsafe`): "first" when a response's
    first sample is handed to the device (`when` is that sample's
    `time.monotonic()`), "done" when its end marker is reached, "flushed" when
    a flush has been applied.
    """

    def __init__(self, rate: int = SPEAKER_RATE, prime_ms: float = 50.0, notify: Notify | None = None) -> None:
        self.rate = rate
        self.prime_samples = max(1, int(rate * prime_ms / 1000))
        self.notify = notify
        self._pieces: deque[_Piece] = deque()
        # written by the event loop only
        self._epoch = 0
        self._written = 0
        self._ends_written = 0
        # written by the device callback only
        self._seen_epoch = 0
        self._taken = 0
        self._ends_taken = 0
        self._current: _Piece | None = None
        self._offset = 0
        self._primed = False
        self._in_response = False
        self.played: dict[str, int] = {}  # samples handed to the device, per response
        self.underruns = 0  # times the buffer ran dry in the middle of a response
        self.underrun_samples = 0  # silence played in the middle of responses
        self.callbacks = 0

    # -- event-loop side --------------------------------------------------------------
    def push(self, pcm16: bytes, response_id: str) -> None:
        samples = np.frombuffer(pcm16, dtype="<i2")
        if samples.size:
            self._pieces.append(_Piece(samples, response_id, self._epoch))
            self._written += samples.size

    def end(self, response_id: str) -> None:
        """No more audio for `response_id`: play out what is buffered."""
        self._pieces.append(_Piece(np.zeros(0, np.int16), response_id, self._epoch, end=True))
        self._ends_written += 1

    def flush(self) -> int:
        """Drop everything queued; the device plays silence from its next block.

        Returns the flush's number: the flush has taken effect once
        `applied_flushes` reaches it."""
        self._epoch += 1
        return self._epoch

    @property
    def applied_flushes(self) -> int:
        """Flushes the device callback has applied (read from the loop: an int, set atomically)."""
        return self._seen_epoch

    @property
    def queued_samples(self) -> int:
        return self._written - self._taken

    def played_ms(self, response_id: str) -> int:
        return int(self.played.get(response_id, 0) * 1000 // self.rate)

    # -- device-callback side -----------------------------------------------------
    def _emit(self, kind: str, response_id: str, when: float) -> None:
        if self.notify is not None:
            self.notify(kind, response_id, when)

    def _drop_stale(self, now: float) -> None:
        epoch = self._epoch
        if self._seen_epoch == epoch:
            return
        if self._current is not None:
            self._taken += self._current.samples.size - self._offset
            self._current = None
        while self._pieces and self._pieces[0].epoch != epoch:
            piece = self._pieces.popleft()
            self._taken += piece.samples.size
            self._ends_taken += piece.end
        self._seen_epoch = epoch
        self._primed = False
        self._in_response = False
        self._emit("flushed", "", now)

    def fill(self, out: np.ndarray, now: float | None = None) -> None:
        """Fill `out` (int16, one channel) with queued audio, silence for the rest."""
        now = time.monotonic() if now is None else now
        dest = out.reshape(-1)
        frames = dest.shape[0]
        self.callbacks += 1
        self._drop_stale(now)
        if not self._primed:
            ready = self.queued_samples >= self.prime_samples or self._ends_written > self._ends_taken
            if not ready:
                dest[:] = 0
                if self._in_response:
                    self.underrun_samples += frames
                return
            self._primed = True
        pos = 0
        while pos < frames:
            piece = self._current
            if piece is None:
                if not self._pieces:
                    break
                piece = self._current = self._pieces.popleft()
                self._offset = 0
                if piece.end:
                    self._current = None
                    self._ends_taken += 1
                    self._primed = self._in_response = False
                    self._emit("done", piece.response_id, now + pos / self.rate)
                    break  # the next response primes anew
            count = min(frames - pos, piece.samples.size - self._offset)
            dest[pos : pos + count] = piece.samples[self._offset : self._offset + count]
            played = self.played.get(piece.response_id, 0)
            if played == 0:
                self._emit("first", piece.response_id, now + pos / self.rate)
            self.played[piece.response_id] = played + count
            self._in_response = True
            self._offset += count
            self._taken += count
            pos += count
            if self._offset >= piece.samples.size:
                self._current = None
        if pos < frames:
            dest[pos:] = 0
            if self._primed and self._in_response:
                # starved mid-response: play silence, then wait to re-prime
                self.underruns += 1
                self.underrun_samples += frames - pos
                self._primed = False


# -- capture ----------------------------------------------------------------------------


class _Commit:
    """Marker in the send queue: commit the turn after the audio before it."""


COMMIT: Final = _Commit()


class SendQueue:
    """Mic blocks (and commit markers) waiting to be sent, in order.

    Overflow policy: beyond `limit` items the oldest audio block is dropped and
    counted in `dropped`: a stalled network must neither grow memory nor delay
    the user's speech without bound. Commit markers are never dropped."""

    def __init__(self, limit: int = SEND_QUEUE_BLOCKS) -> None:
        self.limit = limit
        self.dropped = 0
        self._items: deque[tuple[bytes, float] | _Commit] = deque()
        self._ready = asyncio.Event()

    def put(self, item: tuple[bytes, float] | _Commit) -> None:
        self._items.append(item)
        if len(self._items) > self.limit:
            for index, queued in enumerate(self._items):
                if not isinstance(queued, _Commit):
                    del self._items[index]
                    self.dropped += 1
                    break
        self._ready.set()

    async def get(self) -> tuple[bytes, float] | _Commit:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class InputTimeline:
    """Maps positions in the sent audio (ms, as the server reports them) to
    the local time the microphone captured them."""

    def __init__(self, rate: int = MIC_RATE, keep_blocks: int = 6000) -> None:
        self.rate = rate
        self.samples = 0
        self._blocks: deque[tuple[int, float]] = deque(maxlen=keep_blocks)  # (end sample, capture time)

    def add(self, samples: int, captured_at: float) -> None:
        self.samples += samples
        self._blocks.append((self.samples, captured_at))

    def time_of(self, position_ms: float) -> float | None:
        index = position_ms * self.rate / 1000
        for end, captured_at in self._blocks:
            if end >= index:
                return captured_at - (end - index) / self.rate
        return None


# -- the conversation -------------------------------------------------------------------


@dataclass
class ResponseRecord:
    """What the client saw of one response; times are time.monotonic() seconds."""

    response_id: str
    turn_id: str = ""
    speech_end_at: float | None = None  # user stopped speaking (capture clock)
    speech_stopped_at: float | None = None  # SpeechStopped event received
    committed_at: float | None = None  # TurnCommitted received
    first_audio_at: float | None = None  # first AudioChunk received
    first_play_at: float | None = None  # first sample reached the speaker
    status: str = ""
    text: str = ""
    audio_samples: int = 0
    interrupted: bool = False
    truncated_ms: int | None = None
    played_out: bool = False
    server: dict[str, Any] | None = None

    def summary(self, playback: PlaybackBuffer) -> dict[str, Any]:
        def ms(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else round((end - start) * 1000, 1)

        return {
            "response_id": self.response_id,
            "turn_id": self.turn_id,
            "status": self.status,
            "text": self.text,
            "audio_ms": self.audio_samples * 1000 // SPEAKER_RATE,
            "played_ms": playback.played_ms(self.response_id),
            "interrupted": self.interrupted,
            "truncated_ms": self.truncated_ms,
            "speech_end_to_first_play_ms": ms(self.speech_end_at, self.first_play_at),
            "speech_stopped_event_to_first_play_ms": ms(self.speech_stopped_at, self.first_play_at),
            "commit_to_first_audio_ms": ms(self.committed_at, self.first_audio_at),
            "first_audio_to_first_play_ms": ms(self.first_audio_at, self.first_play_at),
            "server": self.server,
        }


class Console:
    """Transcript on stdout, state indicator on stderr.

    State changes while a transcript line is being written are shown once the
    line is complete, so the two never interleave mid-line."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.state = ""
        self._line_open = False
        self._deferred = ""

    def set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        if self._line_open:
            self._deferred = state
        else:
            self._show(state)

    def _show(self, state: str) -> None:
        if not self.quiet:
            print(f"[{state}]", file=sys.stderr, flush=True)

    def open_line(self, prefix: str) -> None:
        self.close_line()
        self._line_open = True
        if not self.quiet:
            sys.stdout.write(prefix)
            sys.stdout.flush()

    def write(self, text: str) -> None:
        if not self.quiet:
            sys.stdout.write(text)
            sys.stdout.flush()

    def close_line(self) -> None:
        if not self._line_open:
            return
        self._line_open = False
        self.write("\n")
        if self._deferred:
            state, self._deferred = self._deferred, ""
            self._show(state)

    def line(self, text: str) -> None:
        self.open_line(text)
        self.close_line()

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


class MicSession:
    """One conversation between the sound devices and a Converse stream."""

    def __init__(self, conv: Conversation, args: argparse.Namespace, console: Console) -> None:
        self.conv = conv
        self.args = args
        self.console = console
        self.loop = asyncio.get_running_loop()
        self.playback = PlaybackBuffer(SPEAKER_RATE, args.prime_ms, notify=self._notify_from_device)
        self.sendq = SendQueue()
        self.timeline = InputTimeline(MIC_RATE)
        self.push_to_talk: bool = args.push_to_talk
        self.talking = not self.push_to_talk  # hands-free: the mic is always live
        self.responses: dict[str, ResponseRecord] = {}
        self.turn_speech_end: dict[str, tuple[float | None, float | None]] = {}
        # (kind, latency ms) of recent events, for the latency summary; bounded for long sessions
        self.events: deque[tuple[str, float]] = deque(maxlen=50_000)
        self.errors: list[str] = []
        self.input_overflows = 0
        self.input_latency = 0.0
        self.output_latency = 0.0
        self.responses_ended = 0
        self.exit_reason = ""
        self.exit_code = 0
        self._speech_end: float | None = None  # end of the user's speech not yet committed
        self._speech_stopped_at: float | None = None
        self._current: str = ""  # response being generated
        self._playing: str = ""  # response being played
        self._finished = asyncio.Event()
        # (flush number, waiter) of every flush not yet applied by the device: each
        # interrupt waits for its own flush, however many overlap
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._played_out: dict[str, asyncio.Event] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._running: set[asyncio.Task[None]] = set()  # spawned and not finished yet

    # -- device callbacks (PortAudio threads): copy and hand over, nothing more ------------
    def _mic_callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self._on_mic_block, indata.tobytes(), time.monotonic(), bool(status))
        except RuntimeError:  # the loop is closing: the stream is about to stop too
            pass

    def _speaker_callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        self.playback.fill(outdata)

    def _notify_from_device(self, kind: str, response_id: str, when: float) -> None:
        try:
            self.loop.call_soon_threadsafe(self._on_playback, kind, response_id, when)
        except RuntimeError:
            pass

    # -- event-loop side of the devices --------------------------------------------------
    def _on_mic_block(self, data: bytes, captured_at: float, flagged: bool) -> None:
        self.input_overflows += flagged
        if self.talking:
            self.sendq.put((data, captured_at - self.input_latency))

    def _on_playback(self, kind: str, response_id: str, when: float) -> None:
        if kind == "flushed":
            self._wake_flush_waiters()
            return
        record = self.responses.get(response_id)
        if kind == "first":
            self._playing = response_id
            if record is not None and record.first_play_at is None:
                record.first_play_at = when + self.output_latency
            self.console.set_state("speaking")
        elif kind == "done":
            if self._playing == response_id:
                self._playing = ""
            if record is not None and not record.interrupted:
                record.played_out = True
                self._playback_over(record)
            if not self._current and not self._playing:
                self.console.set_state(self._idle_state())

    def _wake_flush_waiters(self) -> None:
        applied = self.playback.applied_flushes
        waiting = []
        for number, waiter in self._flush_waiters:
            if number > applied:
                waiting.append((number, waiter))
            elif not waiter.done():
                waiter.set_result(None)
        self._flush_waiters = waiting

    async def flush_playback(self) -> bool:
        """Drop the queued audio and wait until the device has applied it
        (True), or FLUSH_WAIT_S at most (False: the device is not running)."""
        number = self.playback.flush()
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._flush_waiters.append((number, waiter))
        try:
            await asyncio.wait_for(waiter, FLUSH_WAIT_S)
            return True
        except TimeoutError:
            return False
        finally:
            self._flush_waiters = [(n, w) for n, w in self._flush_waiters if w is not waiter]

    def _playback_over(self, record: ResponseRecord) -> None:
        """The speaker is done with a response: played to the end, or interrupted."""
        self._played_out.setdefault(record.response_id, asyncio.Event()).set()
        if self.args.show_metrics:
            self._print_response_metrics(record)

    def _idle_state(self) -> str:
        if self.push_to_talk:
            return "recording: Enter to send" if self.talking else "press Enter to talk"
        return "listening"

    # -- tasks ------------------------------------------------------------------------
    async def _send_loop(self) -> None:
        while True:
            item = await self.sendq.get()
            if isinstance(item, _Commit):
                await self.conv.commit()
                continue
            data, captured_at = item
            await self.conv.send_audio(data)
            self.timeline.add(len(data) // 2, captured_at)

    async def _receive_loop(self) -> None:
        async for event in self.conv.events():
            self.events.append((event.kind, event.latency_ms))
            await self._handle(event)
        self.finish("the server ended the conversation")

    async def _stop_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.finish(f"--duration {seconds:g} s reached")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` in the session's task group; it is cancelled when the session ends."""
        assert self._tasks is not None
        task = self._tasks.create_task(work, name=name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def finish(self, reason: str, code: int = 0) -> None:
        if not self._finished.is_set():
            self.exit_reason, self.exit_code = reason, code
            self._finished.set()

    # -- server events ----------------------------------------------------------------
    async def _handle(self, event: Event) -> None:
        data = event.data
        kind = event.kind
        if kind == "session_started":
            self.console.note(f"connected: session {data.session_id}, model {data.model}")
            self.console.set_state(self._idle_state())
        elif kind == "speech_started":
            self.console.set_state("hearing you")
        elif kind == "speech_stopped":
            self._speech_end = self.timeline.time_of(data.audio_end_ms)
            self._speech_stopped_at = event.receive_mono
            self.console.set_state("thinking")
        elif kind == "turn_committed":
            self.turn_speech_end[data.turn_id] = (self._speech_end, self._speech_stopped_at)
            self._speech_end = self._speech_stopped_at = None
            heard = f"{data.audio_duration_ms / 1000:.1f} s of speech" if data.audio_duration_ms else ""
            typed = f"{data.text_chars} typed characters" if data.text_chars else ""
            self.console.line(f"you: ({', '.join(p for p in (heard, typed) if p)})")
            self.console.set_state("thinking")
        elif kind == "response_started":
            speech_end, stopped_at = self.turn_speech_end.pop(data.turn_id, (None, None))
            self.responses[data.response_id] = ResponseRecord(
                data.response_id, data.turn_id, speech_end, stopped_at, committed_at=event.receive_mono
            )
            self._current = data.response_id
            self.console.open_line("assistant: ")
        elif kind == "text_delta":
            self.console.write(data.text)
        elif kind == "audio_chunk":
            record = self.responses.get(data.response_id)
            if record is not None and not record.interrupted:
                record.first_audio_at = record.first_audio_at or event.receive_mono
                record.audio_samples += len(data.pcm16) // 2
                self.playback.push(data.pcm16, data.response_id)
        elif kind == "playback_interrupted":
            await self._interrupt(data.response_id)
        elif kind == "response_ended":
            await self._on_response_ended(event)
        elif kind == "metrics":
            record = self.responses.get(data.response_id)
            if record is not None and data.WhichOneof("kind") == "response":
                record.server = message_dict(data.response)
        elif kind == "error":
            self.errors.append(f"{data.code}: {data.message}")
            self.console.close_line()
            self.console.note(f"server error: {data.code}: {data.message}")
        elif kind == "go_away":
            self.console.note(f"the server closes this conversation in {data.time_left_ms} ms ({data.reason})")

    async def _on_response_ended(self, event: Event) -> None:
        data = event.data
        record = self.responses.get(data.response_id)
        self.console.close_line()
        if self._current == data.response_id:
            self._current = ""
        self.playback.end(data.response_id)
        if record is None:
            return
        record.status = status_name(data.status)
        record.text = data.text
        if data.status == pb.RESPONSE_STATUS_FAILED:
            self.console.note(f"response failed: {data.reason}")
        self.responses_ended += 1
        if self.args.max_responses and self.responses_ended == self.args.max_responses:
            self._spawn(self._finish_after_playback(record), "last-playback")

    async def _finish_after_playback(self, record: ResponseRecord) -> None:
        """Let the speaker play the rest of the last answer, then end (events keep flowing meanwhile)."""
        left_s = max(0, record.audio_samples - self.playback.played.get(record.response_id, 0)) / SPEAKER_RATE
        played = self._played_out.setdefault(record.response_id, asyncio.Event())
        try:
            await asyncio.wait_for(played.wait(), left_s + 5.0)
        except TimeoutError:
            self.console.note("the speaker did not finish playing the last response")
        self.finish(f"{self.responses_ended} responses done")

    async def _interrupt(self, response_id: str) -> None:
        """Stop playing `response_id` now and tell the server what was heard."""
        record = self.responses.get(response_id)
        if record is None or record.interrupted or record.played_out:
            return
        record.interrupted = True
        self.console.close_line()
        self.console.note(f"(interrupted {response_id})")
        await self.flush_playback()  # False: the device stopped; the played count is final anyway
        if self._playing == response_id:
            self._playing = ""
        played_ms = self.playback.played_ms(response_id)
        if not record.played_out:
            record.truncated_ms = played_ms
            await self.conv.truncate(response_id, played_ms)
            self._playback_over(record)
        self.console.set_state(self._idle_state())

    # -- push-to-talk -------------------------------------------------------------------
    def _on_keyboard(self) -> None:
        try:
            data = os.read(sys.stdin.fileno(), 1024)
        except BlockingIOError:
            return
        if not data:  # stdin closed: no more key presses
            self.loop.remove_reader(sys.stdin.fileno())
            return
        for _ in range(data.count(b"\n")):
            self._toggle_talking()

    def _toggle_talking(self) -> None:
        if not self.talking:
            self.talking = True
            if self._current or self._playing:
                self._spawn(self._barge_in(), "ptt-barge-in")
        else:
            self.talking = False
            self._speech_end = time.monotonic()
            self.sendq.put(COMMIT)
        self.console.set_state(self._idle_state())

    async def _barge_in(self) -> None:
        """Push-to-talk over the assistant: stop generating and playing it."""
        target = self._current or self._playing
        if self._current:
            await self.conv.cancel(self._current)
        await self._interrupt(target)

    # -- running ----------------------------------------------------------------------
    async def run(self, sd: Any) -> int:
        args = self.args
        if args.say:
            await self.conv.send_text(args.say)
        mic_block = max(1, MIC_RATE * args.mic_block_ms // 1000)
        with (
            sd.OutputStream(
                samplerate=SPEAKER_RATE,
                channels=1,
                dtype="int16",
                blocksize=args.speaker_block,
                latency="low",
                device=args.output_device,
                callback=self._speaker_callback,
            ) as speaker,
            sd.InputStream(
                samplerate=MIC_RATE,
                channels=1,
                dtype="int16",
                blocksize=mic_block,
                latency="low",
                device=args.input_device,
                callback=self._mic_callback,
            ) as mic,
        ):
            self.output_latency = float(speaker.latency)
            self.input_latency = float(mic.latency)
            stdin_watched = False
            if self.push_to_talk and not sys.stdin.closed:
                try:
                    self.loop.add_reader(sys.stdin.fileno(), self._on_keyboard)
                    stdin_watched = True
                except (OSError, ValueError, PermissionError):
                    self.console.note("cannot read the keyboard: push-to-talk needs stdin")
            try:
                async with asyncio.TaskGroup() as tasks:
                    self._tasks = tasks
                    self._spawn(self._send_loop(), "mic-send")
                    self._spawn(self._receive_loop(), "receive")
                    if args.duration:
                        self._spawn(self._stop_after(args.duration), "duration")
                    await self._finished.wait()
                    for task in list(self._running):  # stop now: the conversation is over
                        task.cancel()
            except* VoiceChatError as group:
                raise group.exceptions[0] from None
            finally:
                if stdin_watched:
                    self.loop.remove_reader(sys.stdin.fileno())
        self.console.close_line()
        return self.exit_code

    # -- reporting ------------------------------------------------------------------------
    def _print_response_metrics(self, record: ResponseRecord) -> None:
        summary = record.summary(self.playback)
        values = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        print_block(f"metrics ({record.response_id})", values)
        if record.server:
            print_block(f"metrics (server, {record.response_id})", record.server)

    def report(self) -> dict[str, Any]:
        kinds = sorted({kind for kind, _ in self.events})
        return {
            "session_id": self.conv.session_id,
            "exit_reason": self.exit_reason,
            "responses": [r.summary(self.playback) for r in self.responses.values()],
            "event_latency_ms": {
                "all": latency_summary([latency for _, latency in self.events]),
                **{k: latency_summary([lat for kind, lat in self.events if kind == k]) for k in kinds},
            },
            "playback": {
                "underruns": self.playback.underruns,
                "underrun_ms": round(self.playback.underrun_samples * 1000 / SPEAKER_RATE, 1),
                "callbacks": self.playback.callbacks,
                "output_latency_ms": round(self.output_latency * 1000, 1),
            },
            "capture": {
                "sent_ms": round(self.timeline.samples * 1000 / MIC_RATE, 1),
                "dropped_blocks": self.sendq.dropped,
                "overflows": self.input_overflows,
                "input_latency_ms": round(self.input_latency * 1000, 1),
            },
            "seq_gaps": self.conv.gaps,
            "errors": self.errors,
        }


# -- sound devices ------------------------------------------------------------------------

DEVICE_HELP: Final = """\
  See what PortAudio finds:  python -m clients.mic --list-devices
  Pick a device:             --input-device INDEX|NAME  --output-device INDEX|NAME
  When no device is listed:
  - PortAudio must be installed: apt-get install libportaudio2 (macOS: brew install portaudio).
  - Linux: PortAudio reaches the sound card through ALSA; `arecord -l` and `aplay -l` (alsa-utils)
    must list it. With PulseAudio or PipeWire, install their ALSA plugin (libasound2-plugins,
    pipewire-alsa) so that ALSA's `default` device goes through the sound server.
  - Your user needs access to /dev/snd: join the `audio` group (sudo usermod -aG audio $USER,
    then log in again).
  - In a container, pass the sound device through (docker run --device /dev/snd ...) or the
    PulseAudio socket (-v $XDG_RUNTIME_DIR/pulse:/run/pulse -e PULSE_SERVER=unix:/run/pulse/native).
  - Over SSH, or on a server without a sound card, there is nothing to capture: run this client
    on the machine with the microphone and point --target at the server."""


class AudioDeviceError(RuntimeError):
    """No usable microphone or speaker; the message says why and what to do."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}\n{DEVICE_HELP}")


def import_sounddevice() -> Any:
    try:
        import sounddevice
    except OSError as exc:  # the PortAudio library is missing
        raise AudioDeviceError(f"cannot load the PortAudio library ({exc})") from exc
    except ImportError as exc:
        raise RuntimeError("the microphone client needs sounddevice: pip install sounddevice") from exc
    return sounddevice


def _find_device(sd: Any, device: int | str | None, kind: str) -> tuple[dict[str, Any] | None, str]:
    """The device `kind` ("input" or "output") the streams will open, or None and why not."""
    role = "microphone (input)" if kind == "input" else "speaker (output)"
    try:
        return sd.query_devices(device, kind), ""
    except (ValueError, sd.PortAudioError):
        if device is None:
            return None, f"no default {role} device"
        return None, f"no {role} device matches --{kind}-device {device!r}"


def check_devices(sd: Any, input_device: int | str | None, output_device: int | str | None) -> tuple[str, str]:
    """Names of the microphone and speaker to use; AudioDeviceError when either is missing."""
    if not len(sd.query_devices()):
        raise AudioDeviceError("no sound device found: PortAudio sees no microphone and no speaker.")
    mic, mic_problem = _find_device(sd, input_device, "input")
    speaker, speaker_problem = _find_device(sd, output_device, "output")
    problems = [p for p in (mic_problem, speaker_problem) if p]
    if mic is None or speaker is None:
        raise AudioDeviceError("; ".join(problems) + ". This client needs both a microphone and a speaker.")
    return str(mic["name"]), str(speaker["name"])


def list_devices(sd: Any) -> int:
    """Print the sound devices PortAudio sees; exit status 1 when there are none."""
    devices = sd.query_devices()
    if not len(devices):
        print(f"no sound device found: PortAudio sees none.\n{DEVICE_HELP}", file=sys.stderr)
        return 1
    print(devices)
    print("(> default input, < default output; pick others with --input-device / --output-device)")
    return 0


def _device(value: str | None) -> int | str | None:
    if value is None or value == "":
        return None
    return int(value) if value.isdigit() else value


async def run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    sd = import_sounddevice()
    mic_name, speaker_name = check_devices(sd, args.input_device, args.output_device)  # before connecting
    console = Console(quiet=args.quiet)
    if not args.quiet:
        console.note(f"microphone: {mic_name}; speaker: {speaker_name}")
    config = make_config(
        input_sample_rate_hz=MIC_RATE,
        manual=args.push_to_talk,
        trace=args.trace,
        system_prompt=args.system_prompt,
        client_label="mic-client",
        interrupt_response=False if args.no_interrupt else None,
        silence_duration_ms=args.silence_ms,
    )
    loop = asyncio.get_running_loop()
    async with VoiceChatClient.connect(options=options_from_args(args)) as client:
        async with client.conversation(config, trace=args.trace) as conv:
            session = MicSession(conv, args, console)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, session.finish, "stopped by the user")
            try:
                code = await session.run(sd)
            except sd.PortAudioError as exc:
                raise AudioDeviceError(f"cannot use the sound devices: {exc}") from exc
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            report = session.report()
            if args.show_metrics:
                print_block("session", {**report["playback"], **report["capture"], "seq_gaps": report["seq_gaps"]})
                print_block("event latency (ms)", report["event_latency_ms"]["all"])
            console.note(f"bye ({session.exit_reason})")
            return code, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clients.mic", description="Talk with the voicechat model through a microphone and speakers."
    )
    add_connection_args(parser)
    audio = parser.add_argument_group("audio devices")
    audio.add_argument("--list-devices", action="store_true", help="list sound devices and exit")
    audio.add_argument("--input-device", default=None, help="microphone: device index or name (default: system's)")
    audio.add_argument("--output-device", default=None, help="speaker: device index or name (default: system's)")
    audio.add_argument("--mic-block-ms", type=int, default=20, help="capture block in ms [%(default)s]")
    audio.add_argument("--speaker-block", type=int, default=240, help="playback block in frames [%(default)s]")
    audio.add_argument("--prime-ms", type=float, default=50.0, help="audio buffered before playback [%(default)s]")
    talk = parser.add_argument_group("conversation")
    talk.add_argument("--push-to-talk", action="store_true", help="Enter starts talking, Enter again sends")
    talk.add_argument("--no-interrupt", action="store_true", help="speaking does not interrupt the assistant")
    talk.add_argument("--silence-ms", type=int, default=None, help="silence that ends a turn (server default 500)")
    talk.add_argument("--system-prompt", default="", help="system prompt (default: the server's)")
    talk.add_argument("--say", default="", help="send this typed turn first")
    run_group = parser.add_argument_group("running and metrics")
    run_group.add_argument("--duration", type=float, default=0.0, help="end after this many seconds")
    run_group.add_argument("--max-responses", type=int, default=0, help="end after N responses were played")
    run_group.add_argument("--show-metrics", action="store_true", help="print latency figures")
    run_group.add_argument("--metrics-json", default="", help="write latency figures to this JSON file at exit")
    run_group.add_argument("--trace", action="store_true", help="ask the server for its metrics")
    run_group.add_argument("--quiet", action="store_true", help="no transcript or state lines")
    args = parser.parse_args(argv)
    args.input_device = _device(args.input_device)
    args.output_device = _device(args.output_device)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.list_devices:
            return list_devices(import_sounddevice())
        code, report = asyncio.run(run(args))
        if args.metrics_json:
            Path(args.metrics_json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return code
    except KeyboardInterrupt:  # Ctrl-C before the conversation was open
        return 130
    except VoiceChatError as exc:
        print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
    except (TargetError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - PortAudioError and friends: one clear line, not a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

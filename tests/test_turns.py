"""Turn detection on real synthesised speech, streamed the way a client sends it."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from service.turns import (
    SUFFIX_PADDING_MS,
    CommitReason,
    InterruptSpeech,
    SileroDetector,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    TurnEvent,
    TurnMode,
    TurnReady,
    TurnSettings,
    TurnTracker,
)
from tests.speech import Utterance, chunks, noise, silence, speech

FIRST = "The quick brown fox jumps over the lazy dog."
SECOND = "Could you tell me the weather for tomorrow in Paris?"
# Detected boundaries may sit a window or two off the true ones (Silero reacts within ~64 ms).
TOLERANCE_MS = 100


def feed(tracker: TurnTracker, audio: Utterance, chunk_ms: float = 20) -> list[tuple[int, TurnEvent]]:
    """Push audio in chunks; return each event with the input position (ms) it arrived at."""
    out: list[tuple[int, TurnEvent]] = []
    for chunk in chunks(audio.pcm16, audio.rate, chunk_ms):
        out.extend((tracker.input_ms, event) for event in tracker.push(chunk))
    return out


def only(events: list[tuple[int, TurnEvent]], kind: type) -> list:
    return [e for _, e in events if isinstance(e, kind)]


def timeline_16k(audio: Utterance) -> np.ndarray:
    """The input as the tracker sees it at 16 kHz (only valid for 16 kHz input: pass-through)."""
    assert audio.rate == 16_000
    return audio.samples()


def two_utterances(rate: int) -> Utterance:
    return speech(FIRST, rate, before_ms=1_000, after_ms=1_500) + speech(SECOND, rate, after_ms=1_000)


@pytest.fixture(scope="module")
def conversation_16k() -> tuple[Utterance, list[tuple[int, TurnEvent]]]:
    audio = two_utterances(16_000)
    return audio, feed(TurnTracker(TurnSettings(), 16_000), audio)


def test_two_utterances_commit_exactly_two_turns(conversation_16k) -> None:
    audio, events = conversation_16k
    kinds = [type(e).__name__ for _, e in events]
    per_turn = ["SpeechStarted", "InterruptSpeech", "SpeechPaused", "SpeechStopped", "TurnReady"]
    assert kinds == per_turn * 2
    turns = only(events, TurnReady)
    assert [t.reason for t in turns] == [CommitReason.SERVER_VAD] * 2
    assert all(t.audio.dtype == np.float32 and t.audio.ndim == 1 for t in turns)


def test_turn_audio_is_the_spoken_part(conversation_16k) -> None:
    audio, events = conversation_16k
    signal = timeline_16k(audio)
    settings = TurnSettings()
    stops = only(events, SpeechStopped)
    for turn, stop, (start_ms, end_ms) in zip(only(events, TurnReady), stops, audio.spans, strict=True):
        # The turn covers the whole utterance, with prefix padding before it and a short tail after.
        assert turn.audio_start_ms <= start_ms - settings.prefix_padding_ms + TOLERANCE_MS
        assert turn.audio_start_ms >= start_ms - settings.prefix_padding_ms - TOLERANCE_MS
        assert turn.audio_end_ms == stop.audio_end_ms + SUFFIX_PADDING_MS
        assert end_ms <= turn.audio_end_ms <= end_ms + TOLERANCE_MS + SUFFIX_PADDING_MS
        assert turn.duration_ms == turn.audio_end_ms - turn.audio_start_ms
        assert turn.audio.size == turn.duration_ms * 16
        # ...and it is exactly that stretch of the input (16 kHz passes through unchanged).
        np.testing.assert_array_equal(turn.audio, signal[turn.audio_start_ms * 16 : turn.audio_end_ms * 16])


def test_speech_offsets_are_where_the_speech_is(conversation_16k) -> None:
    audio, events = conversation_16k
    starts = [e.audio_start_ms for e in only(events, SpeechStarted)]
    stops = [e.audio_end_ms for e in only(events, SpeechStopped)]
    interrupts = [e.audio_start_ms for e in only(events, InterruptSpeech)]
    assert interrupts == starts
    for (start_ms, end_ms), started, stopped in zip(audio.spans, starts, stops, strict=True):
        assert abs(started - start_ms) <= TOLERANCE_MS
        assert abs(stopped - end_ms) <= TOLERANCE_MS


def test_events_come_when_the_audio_allows(conversation_16k) -> None:
    audio, events = conversation_16k
    settings = TurnSettings()
    for at_ms, event in events:
        if isinstance(event, SpeechStarted):
            # Confirmed after min_speech_ms of speech, not before and not much later.
            assert event.audio_start_ms + settings.min_speech_ms <= at_ms + 20
            assert at_ms <= event.audio_start_ms + settings.min_speech_ms + 100
        if isinstance(event, TurnReady):
            # Committed once silence_duration_ms has passed after the speech.
            spoken_end = min(end for _, end in audio.spans if end >= event.audio_end_ms - 250)
            assert spoken_end + settings.silence_duration_ms <= at_ms
            assert at_ms <= spoken_end + settings.silence_duration_ms + TOLERANCE_MS + 40


@pytest.mark.parametrize("rate", [24_000, 48_000])
def test_input_rates_give_the_same_detection(rate: int, conversation_16k) -> None:
    reference_audio, reference = conversation_16k
    audio = two_utterances(rate)
    events = feed(TurnTracker(TurnSettings(), rate), audio)
    assert [type(e) for _, e in events] == [type(e) for _, e in reference]
    for (_, got), (_, want) in zip(events, reference, strict=True):
        for name in ("audio_start_ms", "audio_end_ms"):
            if hasattr(want, name):
                assert abs(getattr(got, name) - getattr(want, name)) <= 32  # at most one window
    for got in only(events, TurnReady):
        # The resampled turn is the same sound as the 16 kHz one.
        signal = timeline_16k(reference_audio)[got.audio_start_ms * 16 : got.audio_end_ms * 16]
        n = min(got.audio.size, signal.size)
        assert np.corrcoef(got.audio[:n], signal[:n])[0, 1] > 0.98


def test_chunk_sizes_do_not_change_anything(conversation_16k) -> None:
    audio, reference = conversation_16k
    tracker = TurnTracker(TurnSettings(), 16_000)
    rng = random.Random(7)
    events: list[TurnEvent] = []
    position = 0
    while position < len(audio.pcm16):
        size = rng.choice([2, 160, 1022, 1024, 3_000, 32_000])
        events.extend(tracker.push(audio.pcm16[position : position + size]))
        position += size
    with_audio = (TurnReady, SpeechPaused)
    assert [dataclasses.astuple(e) for e in events if not isinstance(e, with_audio)] == [
        dataclasses.astuple(e) for _, e in reference if not isinstance(e, with_audio)
    ]
    for kind in with_audio:
        for got, want in zip(only([(0, e) for e in events], kind), only(reference, kind), strict=True):
            assert (got.audio_start_ms, got.audio_end_ms) == (want.audio_start_ms, want.audio_end_ms)
            np.testing.assert_array_equal(got.audio, want.audio)


class RecordingDetector(SileroDetector):
    """Silero, remembering every probability it gave."""

    def __init__(self) -> None:
        super().__init__()
        self.probabilities: list[float] = []

    def __call__(self, window: np.ndarray) -> float:
        probability = super().__call__(window)
        self.probabilities.append(probability)
        return probability


class ScriptedDetector:
    """Speech probabilities from a script, one per window, then silence."""

    def __init__(self, probabilities: list[float]) -> None:
        self._script = iter(probabilities)

    def __call__(self, window: np.ndarray) -> float:
        return next(self._script, 0.0)

    def reset(self) -> None:
        pass


def test_hysteresis_as_silero_recommends() -> None:
    # 0.4 lies between threshold - 0.15 and threshold: it continues speech but never restarts it.
    script = [0.0] * 10 + [0.9] * 10 + [0.4] * 5 + [0.2] + [0.4] * 30 + [0.0] * 20
    # Noise, not silence, so that the energy gate hands every window to the detector.
    audio = noise(len(script) * 32, 16_000, level_dbfs=-40)
    tracker = TurnTracker(TurnSettings(), 16_000, detector_factory=lambda: ScriptedDetector(script))
    events = [e for _, e in feed(tracker, audio)]
    assert events[0] == SpeechStarted(audio_start_ms=10 * 32)
    assert SpeechStopped(audio_end_ms=25 * 32) in events
    [turn] = [e for e in events if isinstance(e, TurnReady)]
    assert turn.audio_start_ms == 10 * 32 - 300


def test_short_sounds_start_no_turn() -> None:
    rate = 16_000
    word = speech("Hello there, how are you today?", rate)
    snippet = Utterance(word.pcm16[: rate * 2 // 10], rate, ((0.0, 100.0),))  # its first 100 ms
    click = Utterance(np.array([0, 20_000, -20_000, 0], "<i2").tobytes(), rate, ((0.0, 0.25),))
    audio = silence(1_000, rate)
    for sound in (noise(100, rate, level_dbfs=-15), click, snippet, noise(100, rate, level_dbfs=-25, seed=3)):
        audio = audio + sound + silence(1_500, rate)
    detectors: list[RecordingDetector] = []

    def factory() -> RecordingDetector:
        detectors.append(RecordingDetector())
        return detectors[-1]

    tracker = TurnTracker(TurnSettings(), rate, detector_factory=factory)
    assert feed(tracker, audio) == []
    assert tracker.commit(CommitReason.CLIENT_COMMIT) is None
    # The test means something only if the detector did hear speech in the snippet.
    assert max(detectors[0].probabilities) >= TurnSettings().threshold


def test_min_speech_is_what_rejects_the_snippet() -> None:
    rate = 16_000
    word = speech("Hello there, how are you today?", rate)
    snippet = Utterance(word.pcm16[: rate * 2 // 10], rate, ((0.0, 100.0),))
    audio = silence(1_000, rate) + snippet + silence(1_500, rate)
    events = feed(TurnTracker(TurnSettings(min_speech_ms=32), rate), audio)
    assert len(only(events, TurnReady)) == 1


def test_interrupt_follows_its_settings() -> None:
    audio = speech(FIRST, before_ms=500, after_ms=800)
    assert only(feed(TurnTracker(TurnSettings(interrupt_response=False), 16_000), audio), InterruptSpeech) == []
    events = feed(TurnTracker(TurnSettings(min_interrupt_speech_ms=1_000), 16_000), audio)
    [(at_ms, interrupt)] = [(at, e) for at, e in events if isinstance(e, InterruptSpeech)]
    assert abs(interrupt.audio_start_ms - audio.speech_start_ms) <= TOLERANCE_MS
    assert interrupt.audio_start_ms + 1_000 <= at_ms + 20 <= interrupt.audio_start_ms + 1_200


def test_manual_mode_never_commits_by_itself() -> None:
    audio = two_utterances(16_000)
    tracker = TurnTracker(TurnSettings(mode=TurnMode.MANUAL), 16_000)
    assert feed(tracker, audio) == []
    turn = tracker.commit("client_commit")
    assert turn is not None and turn.reason == CommitReason.CLIENT_COMMIT
    np.testing.assert_array_equal(turn.audio, audio.samples())
    assert turn.duration_ms == tracker.input_ms == int(audio.duration_ms)
    assert tracker.commit("client_commit") is None
    # After a commit the next turn holds only what came after it.
    tracker.push(silence(200, 16_000).pcm16)
    assert tracker.commit("end_of_input").duration_ms == 200


@pytest.mark.parametrize("mode", list(TurnMode))
def test_max_turn_ms_bounds_the_buffer(mode: TurnMode) -> None:
    # The pause between the two sentences would end a semantic turn; here only the length may, and
    # the silence after the speech ends the last piece.
    audio = speech(FIRST + " " + SECOND, before_ms=300, after_ms=2_300 if mode is TurnMode.SEMANTIC else 800)
    settings = TurnSettings(
        mode=mode, max_turn_ms=1_000, prefix_padding_ms=200, semantic_silence_ms=2_000, max_silence_ms=2_000
    )
    tracker = TurnTracker(settings, 16_000)
    events: list[TurnEvent] = []
    for chunk in chunks(audio.pcm16, 16_000, 100):
        events.extend(tracker.push(chunk))
        assert tracker.buffered_ms < 1_000
    if mode is TurnMode.MANUAL:
        last = tracker.commit("end_of_input")
        assert last is not None
        events.append(last)
    turns = only([(0, e) for e in events], TurnReady)
    long_ones = [t for t in turns if t.reason == CommitReason.MAX_TURN_LENGTH]
    assert len(long_ones) >= int(audio.speech_end_ms - audio.speech_start_ms) // 1_000
    assert all(t.duration_ms == 1_000 and t.audio.size == 16_000 for t in long_ones)
    assert all(t.duration_ms <= 1_000 for t in turns)
    # Consecutive pieces join without gap or overlap and together hold all the speech.
    assert all(a.audio_end_ms == b.audio_start_ms for a, b in zip(turns, turns[1:], strict=False))
    assert turns[0].audio_start_ms <= audio.speech_start_ms <= audio.speech_end_ms <= turns[-1].audio_end_ms
    joined = np.concatenate([t.audio for t in turns])
    first = turns[0].audio_start_ms * 16
    np.testing.assert_array_equal(joined, audio.samples()[first : first + joined.size])


def test_audio_outside_turns_is_not_kept() -> None:
    tracker = TurnTracker(TurnSettings(prefix_padding_ms=300), 16_000)
    feed(tracker, noise(5_000, 16_000, level_dbfs=-50) + silence(5_000, 16_000))
    assert tracker.buffered_ms <= 300 + 32
    assert tracker.input_ms == 10_000


def test_energy_gate_skips_the_model_on_digital_silence() -> None:
    audio = silence(10_000, 16_000) + speech(FIRST, before_ms=1_000, after_ms=1_000)
    tracker = TurnTracker(TurnSettings(), 16_000)
    events = feed(tracker, audio)
    windows = tracker.vad_windows_run + tracker.vad_windows_skipped
    assert windows == int(audio.duration_ms * 16) // 512
    # Nearly all of the 11 s of silence is skipped, and the speech is still found where it is.
    assert tracker.vad_windows_skipped >= (11_000 - 2 * 200) * 16 // 512
    [started] = only(events, SpeechStarted)
    assert abs(started.audio_start_ms - audio.speech_start_ms) <= TOLERANCE_MS
    assert len(only(events, TurnReady)) == 1


def test_commit_in_server_vad_takes_the_speech_so_far() -> None:
    audio = speech(FIRST, before_ms=1_000, after_ms=1_000)
    tracker = TurnTracker(TurnSettings(), 16_000)
    assert tracker.commit("client_commit") is None  # nothing heard yet
    head = Utterance(audio.pcm16[: 2 * 16 * 2_500], 16_000)
    events = feed(tracker, head)
    assert [type(e) for _, e in events] == [SpeechStarted, InterruptSpeech]
    assert tracker.in_speech
    turn = tracker.commit(CommitReason.CLIENT_COMMIT)
    assert turn is not None and not tracker.in_speech
    assert turn.audio_end_ms == tracker.input_ms == 2_500
    assert abs(turn.audio_start_ms - (audio.speech_start_ms - 300)) <= TOLERANCE_MS
    np.testing.assert_array_equal(turn.audio, audio.samples()[turn.audio_start_ms * 16 : 2_500 * 16])
    # The rest of the sentence is a new segment that starts where the committed turn ended.
    rest = feed(tracker, Utterance(audio.pcm16[2 * 16 * 2_500 :], 16_000))
    [next_turn] = only(rest, TurnReady)
    assert next_turn.audio_start_ms >= turn.audio_end_ms


def test_end_of_input_includes_the_resampler_tail() -> None:
    audio = speech(FIRST, 48_000, before_ms=500)  # ends while speaking
    tracker = TurnTracker(TurnSettings(), 48_000)
    feed(tracker, audio)
    turn = tracker.commit("end_of_input")
    assert turn is not None and turn.reason == CommitReason.END_OF_INPUT
    assert abs(turn.audio_end_ms - audio.duration_ms) <= 1


def test_switching_to_manual_keeps_the_turn_in_progress() -> None:
    audio = speech(FIRST, before_ms=1_000, after_ms=1_000)
    tracker = TurnTracker(TurnSettings(), 16_000)
    feed(tracker, Utterance(audio.pcm16[: 2 * 16 * 2_000], 16_000))
    assert tracker.in_speech
    assert tracker.update(TurnSettings(mode=TurnMode.MANUAL)) == [SpeechStopped(audio_end_ms=2_000)]
    assert feed(tracker, Utterance(audio.pcm16[2 * 16 * 2_000 :], 16_000)) == []
    turn = tracker.commit("client_commit")
    assert turn is not None and turn.audio_end_ms == tracker.input_ms
    assert abs(turn.audio_start_ms - (audio.speech_start_ms - 300)) <= TOLERANCE_MS


def test_input_rate_can_change_mid_stream() -> None:
    tracker = TurnTracker(TurnSettings(), 48_000)
    tracker.push(silence(1_000, 48_000).pcm16)
    assert tracker.set_input_rate(24_000) == []
    events = feed(tracker, speech(FIRST, 24_000, before_ms=500, after_ms=800))
    assert tracker.input_ms == 1_000 + int(speech(FIRST, 24_000, before_ms=500, after_ms=800).duration_ms)
    [started] = only(events, SpeechStarted)
    assert abs(started.audio_start_ms - 1_500) <= TOLERANCE_MS

"""Semantic end of turn (Smart Turn v3.2) and the pause hints, on real espeak-ng speech.

The tracker is driven directly with 20 ms chunks, as a microphone client sends them, and runs the
real Silero and Smart Turn models; one test drives the real server. Positions are on the audio
timeline (ms of input pushed when an event came out), never on the wall clock.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from service.turns import (
    SUFFIX_PADDING_MS,
    CommitReason,
    InterruptSpeech,
    SmartTurnModel,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    TurnEvent,
    TurnMode,
    TurnReady,
    TurnSettings,
    TurnTracker,
)
from tests.conftest import StartServer
from tests.helpers import collect_until, config, kinds
from tests.speech import Utterance, chunks, paced_chunks, speech
from voicechat.v1 import voicechat_pb2 as pb

SEMANTIC = TurnSettings(mode=TurnMode.SEMANTIC)
SERVER_VAD = TurnSettings()
THRESHOLD = 1.0 - SEMANTIC.eagerness
WINDOW_MS = 32  # events come out on Silero's 32 ms windows
HESITATION = "so I was thinking, um"
CONTINUATION = "about the trip to Paris."


def feed(tracker: TurnTracker, audio: Utterance) -> list[tuple[int, TurnEvent]]:
    """Push audio in 20 ms chunks; return each event with the input position (ms) it arrived at."""
    out: list[tuple[int, TurnEvent]] = []
    for chunk in chunks(audio.pcm16, audio.rate, 20):
        out.extend((tracker.input_ms, event) for event in tracker.push(chunk))
    return out


def of(events: list[tuple[int, TurnEvent]], kind: type) -> list[tuple[int, TurnEvent]]:
    return [(at, e) for at, e in events if isinstance(e, kind)]


class RecordingSmartTurn(SmartTurnModel):
    """The real Smart Turn model, remembering how much audio it judged and what it said."""

    def __init__(self) -> None:
        super().__init__()
        self.judged: list[tuple[int, float]] = []  # (samples judged, probability)

    def __call__(self, audio: np.ndarray) -> float:
        probability = super().__call__(audio)
        self.judged.append((audio.size, probability))
        return probability


def recording_tracker(settings: TurnSettings) -> tuple[TurnTracker, RecordingSmartTurn]:
    model = RecordingSmartTurn()
    return TurnTracker(settings, 16_000, end_of_turn_factory=lambda: model), model


@pytest.mark.parametrize(
    ("text", "voice"),
    [
        ("Please turn off the lights.", "en"),
        ("Could you tell me the weather for tomorrow in Paris?", "en-us"),
        ("Set a timer for ten minutes.", "en-us+f3"),
    ],
)
def test_a_complete_sentence_is_committed_before_server_vad_would(text: str, voice: str) -> None:
    audio = speech(text, before_ms=500, after_ms=1_500, voice=voice)
    tracker, model = recording_tracker(SEMANTIC)
    events = feed(tracker, audio)
    assert [type(e) for _, e in events] == [SpeechStarted, InterruptSpeech, SpeechPaused, SpeechStopped, TurnReady]
    [(at_ms, turn)] = of(events, TurnReady)
    [(stopped_at, stopped)] = of(events, SpeechStopped)
    assert stopped_at == at_ms and turn.reason == CommitReason.SERVER_VAD
    # Judged once, after semantic_silence_ms, and found finished.
    [(_, probability)] = model.judged
    assert turn.end_of_turn_probability == probability >= THRESHOLD
    # semantic_silence_ms after the detected end of speech, well within server VAD's silence.
    assert 0 <= at_ms - stopped.audio_end_ms - SEMANTIC.semantic_silence_ms <= WINDOW_MS + 20
    assert at_ms - audio.speech_end_ms < SEMANTIC.silence_duration_ms
    # Server VAD hears the same speech and commits the same audio, but only after its silence.
    vad = feed(TurnTracker(SERVER_VAD, 16_000), audio)
    [(vad_at, vad_turn)] = of(vad, TurnReady)
    assert vad_at - stopped.audio_end_ms >= SERVER_VAD.silence_duration_ms
    assert vad_turn.end_of_turn_probability == 0.0
    assert (turn.audio_start_ms, turn.audio_end_ms) == (vad_turn.audio_start_ms, vad_turn.audio_end_ms)
    np.testing.assert_array_equal(turn.audio, vad_turn.audio)


@pytest.mark.parametrize("max_silence_ms", [1_000, 2_000])
def test_a_hesitation_is_held_until_max_silence(max_silence_ms: int) -> None:
    audio = speech(HESITATION, before_ms=500, after_ms=max_silence_ms + 800)
    settings = TurnSettings(mode=TurnMode.SEMANTIC, max_silence_ms=max_silence_ms)
    tracker, model = recording_tracker(settings)
    events = feed(tracker, audio)
    [(at_ms, turn)] = of(events, TurnReady)
    [(_, stopped)] = of(events, SpeechStopped)
    # Server VAD would have committed after 500 ms; semantic mode waits for max_silence_ms.
    assert 0 <= at_ms - stopped.audio_end_ms - max_silence_ms <= WINDOW_MS + 20
    assert turn.audio_start_ms <= audio.speech_start_ms and turn.audio_end_ms >= audio.speech_end_ms
    # Judged again as the silence grew (every 250 ms from 200 ms on, at most 8 per pause), never finished.
    assert len(model.judged) == min(8, (max_silence_ms - 200) // 250 + 1)
    assert tracker.end_of_turn_judgements == len(model.judged)
    assert all(p < THRESHOLD for _, p in model.judged)
    assert turn.end_of_turn_probability == model.judged[-1][1]
    # Each judgement saw the turn so far, trailing silence included: 250 ms more each time.
    sizes = [size for size, _ in model.judged]
    assert all(abs((b - a) / 16 - 250) <= 32 for a, b in zip(sizes, sizes[1:], strict=False))
    first_silence_ms = sizes[0] / 16 - (stopped.audio_end_ms - turn.audio_start_ms)
    assert 0 <= first_silence_ms - settings.semantic_silence_ms < WINDOW_MS


def test_speech_after_a_hesitation_continues_the_turn() -> None:
    first = speech(HESITATION, before_ms=500, after_ms=800)
    audio = first + speech(CONTINUATION, after_ms=1_500)
    tracker, model = recording_tracker(SEMANTIC)
    events = feed(tracker, audio)
    (head_start, head_end), (tail_start, tail_end) = audio.spans
    # The pause was judged (unfinished) while it lasted; the speech that resumed cancelled the rest.
    during_pause = [p for size, p in model.judged if size / 16 < tail_start]
    assert 1 <= len(during_pause) <= 3 and all(p < THRESHOLD for p in during_pause)
    order = [type(e) for _, e in events]
    assert order == [
        SpeechStarted, InterruptSpeech, SpeechPaused, SpeechResumed, SpeechPaused, SpeechStopped, TurnReady,
    ]  # fmt: skip
    [(resumed_at, resumed)] = of(events, SpeechResumed)
    assert abs(resumed.audio_ms - tail_start) <= 64 and resumed_at <= tail_start + 64
    # One turn with all its audio, which the model then judged finished (not the max_silence_ms timeout).
    [(at_ms, turn)] = of(events, TurnReady)
    assert turn.end_of_turn_probability >= THRESHOLD
    assert at_ms - tail_end < SEMANTIC.max_silence_ms
    assert turn.audio_start_ms <= head_start and tail_end <= turn.audio_end_ms
    np.testing.assert_array_equal(turn.audio, audio.samples()[turn.audio_start_ms * 16 : turn.audio_end_ms * 16])
    # The first pause's hint held the turn up to the hesitation; the second's is the committed turn.
    (_, paused_early), (_, paused_late) = of(events, SpeechPaused)
    assert isinstance(paused_early, SpeechPaused) and isinstance(paused_late, SpeechPaused)
    assert abs(paused_early.audio_end_ms - head_end) <= 100
    np.testing.assert_array_equal(paused_early.audio, turn.audio[: paused_early.audio.size])
    np.testing.assert_array_equal(paused_late.audio, turn.audio)


@pytest.mark.parametrize("settings", [SERVER_VAD, SEMANTIC], ids=["server_vad", "semantic"])
def test_speech_paused_comes_once_per_pause_with_the_turn_it_would_commit(settings: TurnSettings) -> None:
    audio = speech("Tell me a joke please.", before_ms=500, after_ms=1_000) + speech(
        "What time does the train leave?", after_ms=2_500
    )
    events = feed(TurnTracker(settings, 16_000), audio)
    turns = of(events, TurnReady)
    assert len(turns) == 2
    begin = 0
    for _, turn in turns:
        end = next(i for i, (_, e) in enumerate(events) if e is turn)
        within = events[begin:end]
        begin = end + 1
        hints = [(at, e) for at, e in within if isinstance(e, SpeechPaused | SpeechResumed)]
        # Paused and resumed alternate, a pause first, and the turn ends on a pause.
        assert [type(e) for _, e in hints] == [SpeechPaused, SpeechResumed] * ((len(hints) - 1) // 2) + [SpeechPaused]
        paused_at, paused = hints[-1]
        assert isinstance(paused, SpeechPaused)
        # It comes ~100 ms into the silence, long before the turn is committed, and it holds that turn.
        assert 0 <= paused_at - paused.audio_end_ms - SUFFIX_PADDING_MS <= WINDOW_MS + 20
        stopped = next(e for _, e in within if isinstance(e, SpeechStopped))
        assert paused.audio_end_ms == stopped.audio_end_ms
        assert (paused.audio_start_ms, paused.audio_end_ms + SUFFIX_PADDING_MS) == (
            turn.audio_start_ms,
            turn.audio_end_ms,
        )
        np.testing.assert_array_equal(paused.audio, turn.audio)
    # Without speculation there are no hints, and nothing else changes.
    quiet = feed(TurnTracker(TurnSettings(mode=settings.mode, speculative=False), 16_000), audio)
    hints_off = [(at, type(e)) for at, e in events if not isinstance(e, SpeechPaused | SpeechResumed)]
    assert [(at, type(e)) for at, e in quiet] == hints_off


def test_switching_from_server_vad_to_semantic_keeps_the_turn_in_progress() -> None:
    audio = speech("Please turn off the lights.", before_ms=500, after_ms=1_500)
    tracker = TurnTracker(SERVER_VAD, 16_000)
    half = len(audio.pcm16) // 4 * 2
    head = feed(tracker, Utterance(audio.pcm16[:half], 16_000))
    assert [type(e) for _, e in head] == [SpeechStarted, InterruptSpeech] and tracker.in_speech
    assert tracker.update(SEMANTIC) == []
    tail = feed(tracker, Utterance(audio.pcm16[half:], 16_000))
    [(at_ms, turn)] = of(tail, TurnReady)
    assert turn.end_of_turn_probability >= THRESHOLD
    assert at_ms - audio.speech_end_ms < SERVER_VAD.silence_duration_ms
    assert turn.audio_start_ms <= audio.speech_start_ms


async def test_semantic_mode_commits_a_sentence_over_converse(start_server: StartServer) -> None:
    running = await start_server()
    # Only 400 ms of silence follow the sentence: too little for server VAD (500 ms), and the stream
    # stays open, so nothing but the end-of-turn model can commit the turn.
    sentence = speech("Please turn off the lights.", before_ms=300, after_ms=400)
    queue: asyncio.Queue[pb.ConverseRequest] = asyncio.Queue()
    turn = pb.TurnDetection(mode=pb.TURN_DETECTION_MODE_SEMANTIC)
    queue.put_nowait(config(turn_detection=turn))

    async def requests():
        while True:
            yield await queue.get()

    async def stream() -> None:
        async for piece in paced_chunks(sentence.pcm16, 16_000, 20, speed=2.0):
            await queue.put(pb.ConverseRequest(audio=pb.InputAudio(pcm16=piece)))

    call = running.stub.Converse(requests())
    feeder = asyncio.create_task(stream())
    events = await collect_until(call, within=60)
    await feeder
    order = kinds(events)
    assert order[0] == "session_started"
    assert events[0].session_started.config.turn_detection.mode == pb.TURN_DETECTION_MODE_SEMANTIC
    assert order.index("speech_started") < order.index("speech_stopped") < order.index("turn_committed")
    committed = next(e.turn_committed for e in events if e.WhichOneof("event") == "turn_committed")
    assert committed.reason == pb.COMMIT_REASON_SERVER_VAD
    spoken = sentence.speech_end_ms - sentence.speech_start_ms
    assert spoken < committed.audio_duration_ms < spoken + 500
    assert events[-1].response_ended.status == pb.RESPONSE_STATUS_COMPLETED
    call.cancel()


def test_quick_turn_bench_reports_both_modes(tmp_path) -> None:
    from bench import turns

    out = tmp_path / "turns.json"
    assert turns.main(["--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    vad, semantic = report["complete"]["server_vad"], report["complete"]["semantic"]
    assert vad["missed"] == semantic["missed"] == [] and semantic["held_to_max_silence"] == []
    # On the audio timeline (the push's own time taken out) semantic mode commits within VAD's silence.
    silence_ms = TurnSettings().silence_duration_ms
    assert semantic["silence_waited_ms"]["max"] < silence_ms <= vad["silence_waited_ms"]["p50"]
    # The 800 ms pause after "um" cuts the turn with server VAD, never in semantic mode.
    assert (report["hesitation"]["server_vad"]["early"], report["hesitation"]["semantic"]["early"]) == (1, 0)
    assert report["cost"]["judgements"] > 0 and report["cost"]["judgement_wall_ms"]["p50"] > 0
    assert [t["met"] in (True, False) for t in report["targets"]] == [True, True, True]

"""End-of-turn benchmark: server VAD against semantic mode (Smart Turn v3.2) on espeak-ng speech.

    python -m bench.turns                  # 40 complete sentences, 48 hesitation pauses, ~1 minute
    python -m bench.turns --quick          # a few of each
    python -m bench.turns --json out.json  # also write every figure as JSON

It drives `service.turns.TurnTracker` as the session does, with the real Silero and Smart Turn
models: 16 kHz PCM16 in 20 ms chunks, each chunk arriving once it has been recorded (real time).

* Complete sentences (a): end of speech -> commit, per mode. The end of speech is where the
  espeak-ng audio ends (trimmed by amplitude, not by any detector); the commit is the end of the
  chunk whose `push` returned the TurnReady plus the time that push took (the judgement runs in
  it). This is the turn-detection part of end of speech -> first audio; the backend adds its own.
* Hesitation pauses (b): "so I was thinking, um" + 300-800 ms of silence + "about the trip to
  Paris." and the like. A commit that comes before the speech resumes cuts the turn at the
  hesitation: an early commit.
* Cost: wall and CPU time of every Smart Turn judgement, the model's load time and resident memory,
  and the transient memory of one judgement.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# as the server process runs it (service/__main__.py): OpenBLAS single-threaded
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from bench.results import table, write  # noqa: E402
from bench.speech import duration_ms, utterance  # noqa: E402
from service.turns import SmartTurnModel, TurnMode, TurnReady, TurnSettings, TurnTracker  # noqa: E402

VOICES = ("en", "en-us", "en-gb-scotland", "en-us+f3", "en-029")
COMPLETE = (
    "Please turn off the lights.",
    "What time does the train leave?",
    "Thank you very much.",
    "Can you help me with my homework?",
    "Set a timer for ten minutes.",
    "Where is the nearest pharmacy?",
    "My name is John.",
    "Do you know a good restaurant nearby?",
)
HESITATIONS = (
    ("so I was thinking, um", "about the trip to Paris."),
    ("I wanted to ask you about, uh", "the meeting tomorrow."),
    ("let me see, um", "maybe next Tuesday."),
    ("the thing is, uh", "I forgot my keys at home."),
)
HESITATION_VOICES = ("en", "en-us", "en-us+f3")
PAUSES_MS = (300, 500, 650, 800)
CHUNK_MS = 20
RATE = 16_000
LEAD_MS = 500  # silence before the speech
TAIL_MS = 2_500  # silence after it: more than max_silence_ms (2000)

# targets of the semantic turn work
COMMIT_P50_TARGET_MS = 350.0
EARLY_COMMIT_TARGET = 0.10

MODES = {"server_vad": TurnSettings(), "semantic": TurnSettings(mode=TurnMode.SEMANTIC)}


class TimedSmartTurn(SmartTurnModel):
    """The real model, timing every judgement (wall and CPU of the calling thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.wall_ms: list[float] = []
        self.cpu_ms: list[float] = []

    def __call__(self, audio: np.ndarray) -> float:
        wall, cpu = time.perf_counter(), time.thread_time()
        probability = super().__call__(audio)
        self.cpu_ms.append((time.thread_time() - cpu) * 1000)
        self.wall_ms.append((time.perf_counter() - wall) * 1000)
        return probability


@dataclass
class Commit:
    at_ms: float  # when the TurnReady was out: end of its chunk plus the push's own time
    push_ms: float  # the push's own time (the judgement, in semantic mode)
    push_cpu_ms: float  # its CPU time: what it takes on a core of its own
    turn: TurnReady


def silence(ms: float) -> bytes:
    return b"\0\0" * round(ms * RATE / 1000)


def run(pcm16: bytes, settings: TurnSettings, model: TimedSmartTurn) -> tuple[list[Commit], int]:
    """Stream `pcm16` in real-time chunks through a fresh tracker: every commit and when it was out,
    and how many judgements the end-of-turn model made."""
    tracker = TurnTracker(settings, RATE, end_of_turn_factory=lambda: model)
    size = RATE * CHUNK_MS // 1000 * 2
    commits: list[Commit] = []
    for begin in range(0, len(pcm16), size):
        started, cpu = time.perf_counter(), time.thread_time()
        events = tracker.push(pcm16[begin : begin + size])
        took_ms, cpu_ms = (time.perf_counter() - started) * 1000, (time.thread_time() - cpu) * 1000
        commits += [Commit(tracker.input_ms + took_ms, took_ms, cpu_ms, e) for e in events if isinstance(e, TurnReady)]
    return commits, tracker.end_of_turn_judgements


def _pcts(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return float(np.percentile(ordered, q))

    return {"p50": at(50), "p95": at(95), "max": ordered[-1], "mean": statistics.fmean(ordered), "n": len(ordered)}


def complete_sentences(sentences: Sequence[str], voices: Sequence[str], model: TimedSmartTurn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    threshold = 1.0 - MODES["semantic"].eagerness
    for name, settings in MODES.items():
        latencies: list[float] = []
        push_ms: list[float] = []
        waited_ms: list[float] = []  # silence heard before the commit: the audio-timeline part
        own_core_ms: list[float] = []  # the silence plus the push's CPU time, as on an idle core
        held: list[str] = []  # semantic: committed at max_silence_ms, not by the model
        later: list[str] = []  # semantic: committed by a second or later judgement
        missed: list[str] = []
        for voice in voices:
            for text in sentences:
                speech = utterance(text, RATE, voice)
                commits, judgements = run(silence(LEAD_MS) + speech + silence(TAIL_MS), settings, model)
                if len(commits) != 1:
                    missed.append(f"{voice}: {text} ({len(commits)} commits)")
                    continue
                latencies.append(commits[0].at_ms - (LEAD_MS + duration_ms(speech)))
                push_ms.append(commits[0].push_ms)
                waited_ms.append(latencies[-1] - commits[0].push_ms)
                own_core_ms.append(waited_ms[-1] + commits[0].push_cpu_ms)
                if settings.mode is TurnMode.SEMANTIC and commits[0].turn.end_of_turn_probability < threshold:
                    held.append(f"{voice}: {text}")
                elif judgements > 1:
                    later.append(f"{voice}: {text} ({judgements} judgements)")
        out[name] = {
            "end_of_speech_to_commit_ms": _pcts(latencies),
            "committing_push_ms": _pcts(push_ms),
            "silence_waited_ms": _pcts(waited_ms),
            "end_of_speech_to_commit_own_core_ms": _pcts(own_core_ms),
            "held_to_max_silence": held,
            "committed_after_first_judgement": later,
            "missed": missed,
        }
    return out


def hesitation_pauses(
    phrases: Sequence[tuple[str, str]], pauses: Sequence[int], voices: Sequence[str], model: TimedSmartTurn
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, settings in MODES.items():
        early: list[str] = []
        total = 0
        for voice in voices:
            for head, tail in phrases:
                first = utterance(head, RATE, voice)
                for pause in pauses:
                    total += 1
                    resumes_ms = LEAD_MS + duration_ms(first) + pause
                    audio = silence(LEAD_MS) + first + silence(pause) + utterance(tail, RATE, voice) + silence(TAIL_MS)
                    if any(c.at_ms < resumes_ms for c in run(audio, settings, model)[0]):
                        early.append(f"{voice}: {head} [{pause} ms]")
        out[name] = {"early": len(early), "total": total, "rate": len(early) / total, "early_cases": early}
    return out


def cost(model: TimedSmartTurn, load_s: float, rss_mb: float) -> dict[str, Any]:
    audio = (np.random.default_rng(0).standard_normal(RATE * 3) * 0.1).astype(np.float32)
    tracemalloc.start()
    model(audio)
    transient = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {
        "judgement_wall_ms": _pcts(model.wall_ms),
        "judgement_cpu_ms": _pcts(model.cpu_ms),
        "judgements": len(model.wall_ms),
        "model_load_s": load_s,
        "model_rss_mb": rss_mb,
        "judgement_transient_mb": transient,
    }


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def report(results: dict[str, Any]) -> list[dict[str, Any]]:
    complete, hesitation, costs = results["complete"], results["hesitation"], results["cost"]
    n = complete["server_vad"]["end_of_speech_to_commit_ms"].get("n", 0)
    print(f"\nend of speech -> commit, {n} complete sentences (ms):")
    print(f"  {'mode':<20} {'p50':>6} {'p95':>6} {'max':>6}  {'silence p50':>11}  {'own core p50':>12}  notes")
    for name, label in (("server_vad", "server VAD (500 ms)"), ("semantic", "semantic")):
        row = complete[name]
        p = row["end_of_speech_to_commit_ms"]
        notes = ""
        if name == "semantic":
            notes = f"{len(row['committed_after_first_judgement'])} after the first judgement, "
            notes += f"{len(row['held_to_max_silence'])} held to max_silence_ms"
        if row["missed"]:
            notes += f", {len(row['missed'])} not committed once"
        heard = _f(row["silence_waited_ms"].get("p50"))
        own = _f(row["end_of_speech_to_commit_own_core_ms"].get("p50"))
        print(
            f"  {label:<20} {_f(p.get('p50')):>6} {_f(p.get('p95')):>6} {_f(p.get('max')):>6}  {heard:>11}  {own:>12}  {notes}"
        )
    print("  (silence: what the tracker heard before committing; own core: that plus the push's CPU time)")
    for case in complete["semantic"]["committed_after_first_judgement"]:
        print(f"    later: {case}")
    for case in complete["semantic"]["held_to_max_silence"]:
        print(f"    held: {case}")
    total = hesitation["server_vad"]["total"]
    print(f"\nhesitation pauses ({', '.join(map(str, results['pauses_ms']))} ms), committed before the speech resumed:")
    for name, label in (("server_vad", "server VAD (500 ms)"), ("semantic", "semantic")):
        row = hesitation[name]
        print(f"  {label:<20} {row['early']:>3} / {total} ({row['rate']:.0%})")
    for case in hesitation["semantic"]["early_cases"]:
        print(f"    early: {case}")
    wall, cpu = costs["judgement_wall_ms"], costs["judgement_cpu_ms"]
    print(
        f"\nSmart Turn: {costs['judgements']} judgements, {wall['p50']:.1f} / {wall['p95']:.1f} ms p50/p95 "
        f"(CPU {cpu['p50']:.1f} ms); load {costs['model_load_s']:.2f} s, +{costs['model_rss_mb']:.0f} MB RSS; "
        f"{costs['judgement_transient_mb']:.1f} MB transient per judgement"
    )
    p50 = complete["semantic"]["end_of_speech_to_commit_ms"].get("p50", float("inf"))
    own = complete["semantic"]["end_of_speech_to_commit_own_core_ms"].get("p50", float("inf"))
    rate = hesitation["semantic"]["rate"]
    targets = [
        {"target": f"semantic end of speech -> commit p50 <= {COMMIT_P50_TARGET_MS:g} ms", "value": p50,
         "met": p50 <= COMMIT_P50_TARGET_MS},
        {"target": "  the same with the push on a core of its own", "value": own, "met": own <= COMMIT_P50_TARGET_MS},
        {"target": f"early commits on hesitation pauses <= {EARLY_COMMIT_TARGET:.0%}", "value": rate,
         "met": rate <= EARLY_COMMIT_TARGET},
    ]  # fmt: skip
    print(f"\ntargets (load average {results['load_average']:.1f} on {results['machine']['cpus']} CPUs):")
    for t in targets:
        value = f"{t['value']:.0%}" if "early" in t["target"] else f"{t['value']:.0f} ms"
        print(f"  {t['target']:<52} {value:>7}  {'met' if t['met'] else 'NOT MET'}")
    return targets


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.turns", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 sentences and 2 pauses in one voice (seconds)")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    process = psutil.Process()
    # Silero and numpy first, so that the RSS step below is Smart Turn's own.
    TurnTracker(TurnSettings(), RATE).push(silence(1_000))
    rss = process.memory_info().rss
    loading = time.perf_counter()
    model = TimedSmartTurn()
    load_s = time.perf_counter() - loading
    model(np.zeros(RATE, dtype=np.float32))  # onnxruntime sizes its arena on the first run
    rss_mb = (process.memory_info().rss - rss) / 2**20
    model.wall_ms.clear()
    model.cpu_ms.clear()
    if args.quick:
        sentences, voices, phrases, pauses, hesitation_voices = (
            COMPLETE[:2],
            VOICES[:1],
            HESITATIONS[:1],
            (300, 800),
            VOICES[:1],
        )
    else:
        sentences, voices, phrases, pauses, hesitation_voices = (
            COMPLETE,
            VOICES,
            HESITATIONS,
            PAUSES_MS,
            HESITATION_VOICES,
        )
    print(f"{len(sentences) * len(voices)} complete sentences, {len(phrases) * len(pauses) * len(hesitation_voices)} "
          f"hesitation pauses, voices {', '.join(voices)}; 20 ms chunks at 16 kHz")  # fmt: skip
    results: dict[str, Any] = {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": psutil.cpu_count()},
        "pauses_ms": list(pauses),
        "complete": complete_sentences(sentences, voices, model),
        "hesitation": hesitation_pauses(phrases, pauses, hesitation_voices, model),
    }
    results["cost"] = cost(model, load_s, rss_mb)
    results["load_average"] = os.getloadavg()[0]
    results["targets"] = report(results)
    results["wall_s"] = time.perf_counter() - started
    print(f"\n{results['wall_s']:.0f} s")
    if args.json:
        write(args.json, results, "bench.turns", argv, tables(results))
    return 0


def tables(results: dict[str, Any]) -> list[dict[str, Any]]:
    complete, hesitation, costs = results["complete"], results["hesitation"], results["cost"]
    vad, sem = complete["server_vad"], complete["semantic"]

    def p3(row: dict[str, Any]) -> str:
        return f"{_f(row.get('p50'))} / {_f(row.get('p95'))} / {_f(row.get('max'))}"

    n = vad["end_of_speech_to_commit_ms"].get("n", 0)
    judged = n - len(sem["committed_after_first_judgement"]) - len(sem["held_to_max_silence"]) - len(sem["missed"])
    early = {k: f"{v['early']} / {v['total']} ({v['rate']:.0%})" for k, v in hesitation.items()}
    wall, cpu = costs["judgement_wall_ms"], costs["judgement_cpu_ms"]
    rows = [
        ["end of speech -> commit", p3(vad["end_of_speech_to_commit_ms"]), p3(sem["end_of_speech_to_commit_ms"])],
        ["  silence heard before the commit", p3(vad["silence_waited_ms"]), p3(sem["silence_waited_ms"])],
        ["  with the push on its own core", p3(vad["end_of_speech_to_commit_own_core_ms"]),
         p3(sem["end_of_speech_to_commit_own_core_ms"])],
        ["committed at the first judgement / a later one / at max_silence_ms", "",
         f"{judged} / {len(sem['committed_after_first_judgement'])} / {len(sem['held_to_max_silence'])} of {n}"],
        ["early commits on hesitation pauses", early["server_vad"], early["semantic"]],
        ["Smart Turn per judgement, wall / CPU (p50)", "", f"{_f(wall.get('p50'))} / {_f(cpu.get('p50'))} ms"],
    ]  # fmt: skip
    title = f"Server VAD vs semantic, load average {results['load_average']:.1f} (p50 / p95 / max, ms)"
    return [table(title, ["", "server VAD (500 ms)", "semantic (defaults)"], rows)]


if __name__ == "__main__":
    raise SystemExit(main())

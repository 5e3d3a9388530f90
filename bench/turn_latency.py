"""End of speech -> first audio with server turn detection: server VAD without
and with speculative responses, and semantic mode, in one run; and what asking for a transcript of each
turn costs the response.

Every simulated user speaks espeak-ng phrases at real time and then sends
digital silence, as a live microphone does, until the server commits the turn
and answers (bench.load). The scripted backend runs at a GPU-like cadence, the
same for every mode. Printed per mode: end of speech -> commit (as the client
receives turn_committed), commit -> first audio, and end of speech -> first
audio, p50 / p95.

Targets at 15 ms per step: server VAD with speculation answers within 15 ms of
the commit (so about 630 ms after the end of speech at the default 500 ms
silence); semantic mode <= 350 ms p50 on these complete sentences.

    python -m bench.turn_latency [--conversations 10] [--turns 3] [--step-ms 15] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import results
from bench.latency import UTTERANCES
from bench.load import LoadPlan, ServerProcess, run_load, scripted_args
from bench.speech import utterance

MODES = (  # label, turn detection, speculation, input transcription
    ("server VAD", "vad", False, False),
    ("server VAD + speculation", "vad", True, False),
    ("semantic + speculation", "semantic", True, False),
    ("server VAD + transcript", "vad", False, True),
)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    utterances = tuple(utterance(text) for text in UTTERANCES)
    runs: dict[str, Any] = {}
    for label, detection, speculative, transcript in MODES:
        plan = LoadPlan(
            conversations=args.conversations,
            turns=args.turns,
            utterances=utterances,
            turn_detection=detection,
            speculative=speculative,
            input_transcription=transcript,
            ramp_s=2.0,
        )
        server_args = scripted_args("tuned", args.step_ms, args.prefill_ms, max_sessions=args.conversations + 4)
        async with ServerProcess(server_args) as server:
            result = await run_load(server, plan, label, {"step_ms": args.step_ms, "mode": label})
        runs[label] = result.summary()
        s = runs[label]
        print(f"{label:<26} turns {s['turns_ok']}/{s['turns_planned']}: end of speech -> commit "
              f"{_f(s['commit_ms']['p50'])} / {_f(s['commit_ms']['p95'])} ms, commit -> first audio "
              f"{_f(s['commit_to_first_audio_ms']['p50'])} / {_f(s['commit_to_first_audio_ms']['p95'])} ms, "
              f"end of speech -> first audio {_f(s['first_audio_ms']['p50'])} / "
              f"{_f(s['first_audio_ms']['p95'])} ms (p50 / p95)", flush=True)  # fmt: skip
    plain, spec, semantic, transcribed = (runs[label] for label, *_ in MODES)
    gain = plain["first_audio_ms"]["p50"] - spec["first_audio_ms"]["p50"]
    print(f"\nspeculation saves {gain:.0f} ms at p50 (scripted backend at {args.step_ms:g} ms/step, "
          f"{args.conversations} conversations x {args.turns} turns)")
    cost = transcribed["commit_to_first_audio_ms"]["p50"] - plain["commit_to_first_audio_ms"]["p50"]
    print(f"a transcript of every turn changes commit -> first audio by {cost:+.0f} ms at p50")
    checks = {
        "speculation: commit -> first audio p50 <= 15 ms": spec["commit_to_first_audio_ms"]["p50"] <= 15,
        "semantic: end of speech -> first audio p50 <= 350 ms": semantic["first_audio_ms"]["p50"] <= 350,
    }
    for name, met in checks.items():
        print(f"  {'met    ' if met else 'NOT MET'} {name}")
    return {"runs": runs, "targets": checks}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.turn_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--conversations", type=int, default=10)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=15.0, help="scripted backend delay per model step")
    parser.add_argument("--prefill-ms", type=float, default=0.0, help="scripted backend delay before the first step")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    out = asyncio.run(run(args))
    if args.json:
        results.write(args.json, out, "bench.turn_latency", argv, [modes_table(out)])
    return 0 if all(out["targets"].values()) else 1


def modes_table(out: dict[str, Any]) -> dict[str, Any]:
    def p2(s: dict[str, Any], key: str) -> str:
        return f"{_f(s[key]['p50'])} / {_f(s[key]['p95'])}"

    rows = [[label, p2(s, "commit_ms"), p2(s, "commit_to_first_audio_ms"), p2(s, "first_audio_ms")]
            for label, s in out["runs"].items()]  # fmt: skip
    columns = ["mode", "end of speech -> commit", "commit -> first audio", "end of speech -> first audio"]
    return results.table("End of speech to first audio by mode (p50 / p95, ms)", columns, rows)


if __name__ == "__main__":
    sys.exit(main())

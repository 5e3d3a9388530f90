"""Latency and scale benchmark: the tuned pipeline against the old baseline.

    python -m bench.latency --quick              # `make bench`: tuned vs baseline, < 2 min
    python -m bench.latency                      # larger run, plus server VAD vs manual commit
    python -m bench.latency --scale              # most real-time conversations one server holds
    python -m bench.latency --json out.json      # also write every figure as JSON

Both pipelines serve the scripted backend at the same GPU-like cadence
(`--step-ms`, default 15 ms per model step) in a server subprocess on
127.0.0.1; simulated users speak espeak-ng utterances at real-time pace (see
`bench.load` for what each figure means).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import results
from bench.load import LoadPlan, RunResult, ServerProcess, run_load, scripted_args
from bench.speech import duration_ms, utterance
from voicechat.v1 import voicechat_pb2 as pb

UTTERANCES = (
    "What will the weather be like in Paris tomorrow?",
    "Can you recommend a good book for a long flight?",
    "Please remind me to call my sister this evening.",
    "How long does it take to boil an egg?",
)

# targets of the project's latency work
OVERHEAD_P99_TARGET_MS = 5.0
FIRST_AUDIO_SPEEDUP_TARGET = 3.0
FIRST_AUDIO_LAG_TARGET_MS = 5.0
SCALE_TARGET = 100
SCALE_OVERHEAD_P99_LIMIT_MS = 20.0


def _plan(args: argparse.Namespace, conversations: int, turn_detection: str) -> LoadPlan:
    return LoadPlan(
        conversations=conversations,
        turns=args.turns,
        utterances=tuple(utterance(text) for text in UTTERANCES),
        turn_detection=turn_detection,
        input_chunk_ms=args.input_chunk_ms,
        ramp_s=args.ramp_s,
        output=pb.OutputAudioConfig(chunk_ms=args.chunk_ms, first_chunk_frames=args.first_chunk_frames,
                                    max_stride_frames=args.max_stride_frames),
    )


def _backend_settings(args: argparse.Namespace, pipeline: str) -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "backend": "scripted",
        "step_ms": args.step_ms,
        "prefill_ms": args.prefill_ms,
        "decode_ms": args.decode_ms,
        "output_audio": {"chunk_ms": args.chunk_ms, "first_chunk_frames": args.first_chunk_frames,
                         "max_stride_frames": args.max_stride_frames},
    }


async def run_one(args: argparse.Namespace, pipeline: str, conversations: int, turn_detection: str) -> RunResult:
    """Start a fresh server for `pipeline` and run the load against it."""
    server_args = scripted_args(pipeline, args.step_ms, args.prefill_ms, args.decode_ms,
                                max_sessions=conversations + 8)
    label = f"{pipeline}/{turn_detection}/{conversations}"
    async with ServerProcess(server_args) as server:
        return await run_load(server, _plan(args, conversations, turn_detection), label,
                              _backend_settings(args, pipeline))


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pcts(p: dict[str, float | None]) -> str:
    return " / ".join(_f(p.get(k)) for k in ("p50", "p95", "p99"))


def _ratio(base: float | None, ours: float | None) -> str:
    if base is None or ours is None or ours <= 0 or base <= 0:
        return "-"
    return f"{base / ours:.2f}x"


def comparison_table(tuned: dict[str, Any], baseline: dict[str, Any]) -> str:
    """Tuned and baseline side by side; the last column is baseline / tuned at p50
    (above 1: tuned is lower)."""
    return _format(*comparison_rows(tuned, baseline))


def comparison_rows(tuned: dict[str, Any], baseline: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows: list[tuple[str, str, str, str]] = []

    def pct_row(name: str, key: str) -> None:
        t, b = tuned[key], baseline[key]
        rows.append((name, _pcts(t), _pcts(b), _ratio(b.get("p50"), t.get("p50"))))

    pct_row("end of speech -> first text (ms)", "first_text_ms")
    pct_row("end of speech -> first audio (ms)", "first_audio_ms")
    pct_row("end of speech -> 50 ms playable (ms)", "first_playable_ms")
    pct_row("first-audio lag beyond decode (ms)", "first_audio_lag_ms")
    pct_row("server overhead: ready -> received (ms)", "server_overhead_ms")
    pct_row("  queued until the writer took it", "overhead_queued_ms")
    pct_row("  written, sent and read", "overhead_wire_ms")
    pct_row("model step -> received, every event (ms)", "step_to_receive_ms")
    pct_row("  text deltas", "overhead_text_ms")
    pct_row("  audio, first chunk of non-final batches", "overhead_batch_head_ms")
    pct_row("  audio, all but the final batch", "overhead_audio_ms")
    pct_row("  audio, final batch of a reply", "overhead_final_batch_ms")
    pct_row("  every event but final batches", "overhead_excl_final_batch_ms")
    pct_row("client event-loop lag (ms)", "client_loop_lag_ms")
    pct_row("audio jitter, RFC 3550 (ms)", "jitter_ms")
    pct_row("largest chunk gap (ms)", "max_gap_ms")

    def under(s: dict[str, Any]) -> str:
        return f"{s['underruns']} ({s['turns_with_underrun']}/{s['turns_ok']} turns)"

    rows.append(("playback underruns", under(tuned), under(baseline), ""))
    rows.append(("reply RTF p50 / min",
                 f"{_f(tuned['rtf']['p50'])} / {_f(tuned['rtf']['min'])}",
                 f"{_f(baseline['rtf']['p50'])} / {_f(baseline['rtf']['min'])}", ""))
    rows.append(("throughput (turns/s)", _f(tuned["throughput_turns_per_s"], 2),
                 _f(baseline["throughput_turns_per_s"], 2), ""))
    rows.append(("errors", str(tuned["errors"]), str(baseline["errors"]), ""))
    rows.append(("server CPU % / peak RSS MB",
                 f"{_f(tuned['server_cpu_pct'])} / {_f(tuned['server_rss_mb'], 0)}",
                 f"{_f(baseline['server_cpu_pct'])} / {_f(baseline['server_rss_mb'], 0)}", ""))
    rows.append(("client CPU %", _f(tuned["client_cpu_pct"]), _f(baseline["client_cpu_pct"]), ""))
    header = ["metric", "tuned p50 / p95 / p99", "baseline p50 / p95 / p99", "baseline/tuned"]
    return header, [list(r) for r in rows]


def _format(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def targets(tuned: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    overhead = tuned["server_overhead_ms"]["p99"]
    t_audio, b_audio = tuned["first_audio_ms"]["p50"], baseline["first_audio_ms"]["p50"]
    speedup = b_audio / t_audio if t_audio and b_audio else None
    lag = tuned["first_audio_lag_ms"]["p99"]
    return [
        {"target": f"server overhead p99 <= {OVERHEAD_P99_TARGET_MS:g} ms per event", "value": overhead,
         "unit": "ms", "met": overhead is not None and overhead <= OVERHEAD_P99_TARGET_MS},
        {"target": f"first audio >= {FIRST_AUDIO_SPEEDUP_TARGET:g}x sooner than baseline (p50)", "value": speedup,
         "unit": "x", "met": speedup is not None and speedup >= FIRST_AUDIO_SPEEDUP_TARGET},
        {"target": f"first audio within decode + {FIRST_AUDIO_LAG_TARGET_MS:g} ms of its frames (p99)", "value": lag,
         "unit": "ms", "met": lag is not None and lag <= FIRST_AUDIO_LAG_TARGET_MS},
    ]


def _targets_text(items: Sequence[dict[str, Any]]) -> str:
    rows = [(t["target"], f"{_f(t['value'], 2)} {t['unit']}", "met" if t["met"] else "NOT MET") for t in items]
    return _format(("target", "measured", ""), rows)


def _run_line(s: dict[str, Any]) -> str:
    return (f"{s['label']:<22} first audio p50 {_f(s['first_audio_ms']['p50'])} ms, overhead p99 "
            f"{_f(s['server_overhead_ms']['p99'])} ms, underruns {s['underruns']}, errors {s['errors']}, "
            f"server CPU {_f(s['server_cpu_pct'])} %, RSS {_f(s['server_rss_mb'], 0)} MB, "
            f"client CPU {_f(s['client_cpu_pct'])} %")


# ---------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------


def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


async def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Tuned then baseline at the same cadence (and optionally VAD vs manual)."""
    environment = _environment()
    seconds = [round(duration_ms(utterance(t)) / 1000, 2) for t in UTTERANCES]
    print(f"utterances: {len(UTTERANCES)} espeak-ng phrases of {min(seconds)}-{max(seconds)} s, "
          f"sent in {args.input_chunk_ms} ms chunks at real time", flush=True)
    runs: dict[str, dict[str, Any]] = {}
    results: dict[str, RunResult] = {}
    for pipeline in ("tuned", "baseline"):
        result = await run_one(args, pipeline, args.conversations, args.turn_detection)
        results[pipeline] = result
        runs[pipeline] = result.summary()
        print(_run_line(runs[pipeline]), flush=True)
    if args.vad_compare:
        other = "vad" if args.turn_detection == "manual" else "manual"
        result = await run_one(args, "tuned", args.conversations, other)
        runs[f"tuned_{other}"] = result.summary()
        print(_run_line(runs[f"tuned_{other}"]), flush=True)
    tuned, baseline = runs["tuned"], runs["baseline"]
    title = (f"\ntuned vs baseline: scripted backend at {args.step_ms:g} ms/step (prefill {args.prefill_ms:g} ms, "
             f"decode {args.decode_ms:g} ms/batch); {args.conversations} conversations x {args.turns} turns, "
             f"{'manual commit' if args.turn_detection == 'manual' else 'server VAD'}")
    print(title)
    print(comparison_table(tuned, baseline))
    print("end of speech = the last audio chunk sent; server overhead = receive time - ready_ts_ms (event ready "
          "in the server); model step -> received = receive time - source_ts_ms (newest model step in the event, "
          "so it includes decoding and waiting for a decode batch); definitions: docs/benchmarks.md")
    checked = targets(tuned, baseline)
    print()
    print(_targets_text(checked))
    for name, s in runs.items():
        if s["errors"]:
            print(f"{name}: {s['errors']} failed turns, e.g. {s['error_samples'][0]}")
    out: dict[str, Any] = {"mode": "compare", "environment": environment, "runs": runs, "targets": checked}
    if args.turns_json:
        out["turns"] = {name: [r.to_json() for r in res.records] for name, res in results.items()}
    return out


def _scale_verdict(s: dict[str, Any], limit_ms: float) -> list[str]:
    """Reasons a step fails: failed turns, underruns, or server overhead
    (event ready -> received) at p99 over the limit."""
    reasons = []
    if s["errors"] or s["turns_ok"] < s["turns_planned"]:
        reasons.append(f"{s['turns_planned'] - s['turns_ok']} turns failed")
    if s["underruns"]:
        reasons.append(f"{s['underruns']} underruns")
    every = s["server_overhead_ms"]["p99"]
    if every is None or every >= limit_ms:
        reasons.append(f"overhead p99 {_f(every)} ms")
    return reasons


async def scale(args: argparse.Namespace) -> dict[str, Any]:
    """Step the number of conversations up until a step fails the real-time criteria."""
    environment = _environment()
    deadline = time.monotonic() + args.scale_max_s
    steps: list[dict[str, Any]] = []
    largest = 0
    print(f"scale: tuned pipeline, scripted backend at {args.step_ms:g} ms/step, {args.turns} turns each, "
          f"{args.turn_detection}; pass = no failed turn, no underrun, server overhead p99 < "
          f"{args.scale_limit_ms:g} ms", flush=True)
    for n in args.scale_steps:
        if time.monotonic() > deadline:
            print(f"stopping: the time budget of {args.scale_max_s:g} s is spent")
            break
        s = (await run_one(args, "tuned", n, args.turn_detection)).summary()
        reasons = _scale_verdict(s, args.scale_limit_ms)
        s["fail_reasons"] = reasons
        steps.append(s)
        lag = s["client_loop_lag_ms"]["p99"]
        print(f"{n:>5} conversations: {'FAIL ' + '; '.join(reasons) if reasons else 'pass'}\n"
              f"      first audio p50/p99 {_f(s['first_audio_ms']['p50'])}/{_f(s['first_audio_ms']['p99'])} ms, "
              f"overhead p50/p99 {_f(s['server_overhead_ms']['p50'])}/{_f(s['server_overhead_ms']['p99'])} ms, "
              f"model step -> received p99 {_f(s['step_to_receive_ms']['p99'])} ms, "
              f"underruns {s['underruns']}, server CPU {_f(s['server_cpu_pct'])} %, "
              f"RSS {_f(s['server_rss_mb'], 0)} MB, client CPU {_f(s['client_cpu_pct'])} %, "
              f"client loop lag p99 {_f(lag)} ms", flush=True)
        if reasons:
            break
        largest = n
    met = largest >= SCALE_TARGET
    print(f"\nlargest passing step: {largest} concurrent real-time conversations "
          f"(target >= {SCALE_TARGET}: {'met' if met else 'NOT MET'})")
    return {"mode": "scale", "environment": environment, "steps": steps, "largest_ok": largest,
            "target": {"target": f">= {SCALE_TARGET} concurrent real-time conversations", "value": largest,
                       "met": met}}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run for `make bench` (under 2 minutes)")
    parser.add_argument("--scale", action="store_true", help="find the most concurrent conversations instead")
    parser.add_argument("--conversations", type=int, help="concurrent conversations (default 10 quick, 25 full)")
    parser.add_argument("--turns", type=int, help="turns per conversation (default 3 quick, 4 full, 2 scale)")
    parser.add_argument("--step-ms", type=float, default=15.0, help="scripted backend delay per model step")
    parser.add_argument("--prefill-ms", type=float, default=0.0, help="scripted backend delay before the first step")
    parser.add_argument("--decode-ms", type=float, default=0.0, help="scripted backend delay per decode batch")
    parser.add_argument("--turn-detection", choices=("manual", "vad"), default="manual",
                        help="how turns end: CommitTurn, or server VAD on trailing silence")
    parser.add_argument("--vad-compare", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the other turn detection mode (default: on for full runs)")
    parser.add_argument("--chunk-ms", type=int, default=0, help="output chunk size asked for (0: server default)")
    parser.add_argument("--first-chunk-frames", type=int, default=0, help="first decode size (0: server default)")
    parser.add_argument("--max-stride-frames", type=int, default=0, help="largest decode batch (0: server default)")
    parser.add_argument("--input-chunk-ms", type=int, default=40, help="microphone chunk size (20-40)")
    parser.add_argument("--ramp-s", type=float, help="spread conversation starts over this many seconds")
    parser.add_argument("--scale-steps", type=lambda s: [int(x) for x in s.split(",")],
                        default=[10, 25, 50, 100, 150, 200, 300, 400], help="comma-separated conversation counts")
    parser.add_argument("--scale-limit-ms", type=float, default=SCALE_OVERHEAD_P99_LIMIT_MS,
                        help="largest server overhead p99 a passing --scale step may have")
    parser.add_argument("--scale-max-s", type=float, default=900.0, help="time budget of --scale")
    parser.add_argument("--json", type=Path, help="write all figures to this file")
    parser.add_argument("--turns-json", action="store_true", help="include every turn in the JSON")
    args = parser.parse_args(argv)
    if args.scale:
        args.turns = args.turns or 2
        args.ramp_s = 5.0 if args.ramp_s is None else args.ramp_s
    elif args.quick:
        args.conversations = args.conversations or 10
        args.turns = args.turns or 3
    else:
        args.conversations = args.conversations or 25
        args.turns = args.turns or 4
    args.ramp_s = 3.0 if args.ramp_s is None else args.ramp_s
    if args.vad_compare is None:
        args.vad_compare = not args.quick
    return args


def report_tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The tables docs/benchmarks.md publishes from a report."""
    if report["mode"] == "scale":
        steps = report["steps"]

        def row(name: str, cell: Any) -> list[str]:
            return [name, *(cell(s) for s in steps)]

        def pcts(key: str, a: str, b: str) -> Any:
            return lambda s: f"{_f(s[key][a])} / {_f(s[key][b])}"

        rows = [
            row("server overhead p50 / p99 (ms)", pcts("server_overhead_ms", "p50", "p99")),
            row("model step -> received p99 (ms)", lambda s: _f(s["step_to_receive_ms"]["p99"])),
            row("underruns", lambda s: str(s["underruns"])),
            row("first audio p50 / p99 (ms)", pcts("first_audio_ms", "p50", "p99")),
            row("server CPU % / RSS MB", lambda s: f"{_f(s['server_cpu_pct'])} / {_f(s['server_rss_mb'], 0)}"),
            row("load generator CPU %", lambda s: _f(s["client_cpu_pct"])),
            row("verdict", lambda s: "fail: " + "; ".join(s["fail_reasons"]) if s["fail_reasons"] else "pass"),
        ]
        columns = ["conversations", *(str(s["settings"]["conversations"]) for s in steps)]
        return [results.table("Concurrent real-time conversations", columns, rows)]
    runs = report["runs"]
    tables = [results.table("Tuned vs baseline pipeline", *comparison_rows(runs["tuned"], runs["baseline"]))]
    tables.append(results.table("Against the targets", ["target", "measured", ""],
                                [[t["target"], f"{_f(t['value'], 2)} {t['unit']}", "met" if t["met"] else "NOT MET"]
                                 for t in report["targets"]]))  # fmt: skip
    return tables


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(scale(args) if args.scale else compare(args))
    if args.json:
        results.write(args.json, report, "bench.latency", argv, report_tables(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

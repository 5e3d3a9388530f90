"""The real model under load: LFM2-Audio with full-size random weights on a GPU.

    python -m bench.gpu                                  # full size on CUDA: 1, 4, 8, 16 conversations
    python -m bench.gpu --tiny --device cpu --concurrency 1   # the same path on the tiny model, anywhere
    python -m bench.gpu --model models/my-checkpoint --json gpu.json
    python -m bench.gpu --engine-bench --engine serial   # also the engine bench; the server on the serial engine

Random weights have the published shapes, so every step costs what a real
step costs; only the words are nonsense (and a response never ends by itself,
so each runs to `--max-new-tokens`). The checkpoint folder is built once by
`scripts/make_tiny_model.py --size full` (about 3 GB, in `models/random-full`)
and reused. Per-step costs of the model alone (no server) are measured by
`bench/lfm2_steps.py` (`--model-steps` runs it first and keeps its figures in
the JSON); this script measures the whole service: it starts
`python -m service --backend lfm2` on 127.0.0.1 and drives it with the same
load generator as `bench.latency` (3 s spoken turns streamed at real time,
manual commit, tracing on), at each concurrency in turn.

Figures per concurrency level:
- prefill: commit to the model's first step (server metrics), 3 s of audio;
- steps/s: model steps (text tokens + audio frames) per second of one
  stream's generation after its first step, and that times the concurrency;
- decode: wall time of one audio decode batch and per frame;
- first audio: end of speech to the first AudioChunk at the client;
- RTF: audio seconds generated per wall second (server) and delivered per
  wall second (client); underruns of a real-time player.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import results
from bench.load import REPO, LoadPlan, RunResult, ServerProcess, percentiles, run_load
from bench.speech import padded, utterance

PROMPT_TEXT = "Tell me a short story about a lighthouse keeper."  # about 2.6 s, padded to 3 s
UTTERANCE_MS = 3000


def ensure_model(size: str, model: Path | None) -> Path:
    """The checkpoint folder: `model` as given, else a random-weight one built once."""
    if model is not None:
        return model
    folder = REPO / "models" / f"random-{size}"
    if not (folder / "config.json").exists() or not any(folder.glob("*.safetensors")):
        print(f"building a {size} random-weight checkpoint in {folder} ...", flush=True)
        started = time.monotonic()
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(folder), "--size", size],
            check=True,
            cwd=REPO,
        )
        print(f"built in {time.monotonic() - started:.0f} s", flush=True)
    return folder


def model_steps(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The backend's per-step costs without the server (`bench.lfm2_steps`), run
    first in its own process so that it has the device to itself."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "steps.json"
        cmd = [
            sys.executable,
            "-m",
            "bench.lfm2_steps",
            "--model",
            str(model),
            "--device",
            args.device,
            "--json",
            str(out),
        ]
        subprocess.run([*cmd, *(["--quick"] if args.tiny else [])], check=True, cwd=REPO)
        figures: dict[str, Any] = json.loads(out.read_text())
        return figures


def engine_bench(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Batched against serial engine without the server (`bench.engine`), in
    its own process so that it has the device to itself."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engine.json"
        levels = ",".join(str(n) for n in args.concurrency)
        cmd = [
            sys.executable,
            "-m",
            "bench.engine",
            "--model",
            str(model),
            "--device",
            args.device,
            "--concurrency",
            levels,
            "--json",
            str(out),
        ]
        subprocess.run([*cmd, *(["--steps", "12"] if args.tiny else ["--steps", "48"])], check=True, cwd=REPO)
        figures: dict[str, Any] = json.loads(out.read_text())
        return figures


def server_args(model: Path, device: str, max_sessions: int, max_new_tokens: int, engine: str = "batched") -> list[str]:
    return [
        "--backend",
        "lfm2",
        "--model",
        str(model),
        "--device",
        device,
        "--engine",
        engine,
        "--max-batch",
        str(max(max_sessions, 1)),
        "--max-sessions",
        str(max_sessions),
        "--max-new-tokens",
        str(max(max_new_tokens, 1)),
        "--idle-timeout-seconds",
        "0",
        "--drain-seconds",
        "5",
        "--log-level",
        "WARNING",
    ]


def level_summary(result: RunResult, concurrency: int) -> dict[str, Any]:
    """The GPU figures of one concurrency level."""
    ok = result.ok
    steps_per_s: list[float] = []
    for r in ok:
        steps = r.text_tokens + r.audio_frames
        busy_ms = r.server.get("generation_ms", 0.0) - r.server.get("prefill_ms", 0.0)
        if steps > 1 and busy_ms > 0:
            steps_per_s.append((steps - 1) / (busy_ms / 1000))
    decode = [ms for r in ok for ms in r.decode_ms]
    per_frame = [ms / n for r in ok for ms, n in zip(r.decode_ms, r.decode_frames, strict=True) if n]
    stream_rate = percentiles(steps_per_s, (50,))["p50"]
    summary = result.summary()
    return {
        "concurrency": concurrency,
        "turns_ok": len(ok),
        "errors": summary["errors"],
        "error_samples": summary["error_samples"],
        "prefill_ms": percentiles([r.server["prefill_ms"] for r in ok if r.server], (50, 99)),
        "steps_per_s_per_stream": percentiles(steps_per_s, (50, 5)),
        "steps_per_s_total": stream_rate * concurrency if stream_rate else None,
        "decode_batch_ms": percentiles(decode, (50, 99)),
        "decode_ms_per_frame": percentiles(per_frame, (50, 99)),
        "first_audio_ms": summary["first_audio_ms"],
        "first_text_ms": summary["first_text_ms"],
        "server_overhead_ms": summary["server_overhead_ms"],
        "generation_rtf": percentiles([r.server["generation_rtf"] for r in ok if r.server], (50, 5)),
        "client_rtf": summary["rtf"],
        "underruns": summary["underruns"],
        "turns_with_underrun": summary["turns_with_underrun"],
        "reply_audio_ms": summary["reply_audio_ms"],
        "server_cpu_pct": summary["server_cpu_pct"],
        "server_rss_mb": summary["server_rss_mb"],
    }


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(levels: Sequence[dict[str, Any]]) -> str:
    header, cells = table_rows(levels)
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def table_rows(levels: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["concurrent conversations", *(str(x["concurrency"]) for x in levels)]
    rows = [
        ("prefill, 3 s utterance (ms) p50", lambda x: _f(x["prefill_ms"]["p50"])),
        ("model steps/s per stream p50", lambda x: _f(x["steps_per_s_per_stream"]["p50"])),
        ("model steps/s all streams", lambda x: _f(x["steps_per_s_total"])),
        (
            "decode per audio batch (ms) p50 / p99",
            lambda x: f"{_f(x['decode_batch_ms']['p50'])} / {_f(x['decode_batch_ms']['p99'])}",
        ),
        ("decode per frame (ms) p50", lambda x: _f(x["decode_ms_per_frame"]["p50"], 2)),
        (
            "end of turn -> first audio (ms) p50 / p99",
            lambda x: f"{_f(x['first_audio_ms']['p50'])} / {_f(x['first_audio_ms']['p99'])}",
        ),
        ("server overhead per event (ms) p99", lambda x: _f(x["server_overhead_ms"]["p99"])),
        (
            "generation RTF p50 / p5",
            lambda x: f"{_f(x['generation_rtf']['p50'], 2)} / {_f(x['generation_rtf']['p5'], 2)}",
        ),
        ("delivery RTF p50 / min", lambda x: f"{_f(x['client_rtf']['p50'], 2)} / {_f(x['client_rtf']['min'], 2)}"),
        ("underruns (turns affected)", lambda x: f"{x['underruns']} ({x['turns_with_underrun']}/{x['turns_ok']})"),
        ("errors", lambda x: str(x["errors"])),
        ("server CPU % / RSS MB", lambda x: f"{_f(x['server_cpu_pct'])} / {_f(x['server_rss_mb'], 0)}"),
    ]
    return header, [[name, *(fmt(x) for x in levels)] for name, fmt in rows]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    size = "tiny" if args.tiny else "full"
    model = ensure_model(size, args.model)
    speech = padded(utterance(PROMPT_TEXT), 16_000, UTTERANCE_MS)
    levels: list[dict[str, Any]] = []
    steps = model_steps(model, args) if args.model_steps else None
    engines = engine_bench(model, args) if args.engine_bench else None
    print(
        f"model {model} ({size}, random weights) on {args.device}; {args.turns} turns per conversation, "
        f"{args.max_new_tokens} steps per reply",
        flush=True,
    )
    server = ServerProcess(
        server_args(model, args.device, max(args.concurrency) + 4, args.max_new_tokens, args.engine),
        startup_timeout_s=args.startup_timeout_s,
    )
    started = time.monotonic()
    async with server:
        print(f"server ready in {time.monotonic() - started:.0f} s (load and warm-up)", flush=True)
        for concurrency in args.concurrency:
            plan = LoadPlan(
                conversations=concurrency,
                turns=args.turns,
                utterances=(speech,),
                turn_detection="manual",
                ramp_s=args.ramp_s,
                max_new_tokens=args.max_new_tokens,
                turn_timeout_s=args.turn_timeout_s,
            )
            result = await run_load(
                server,
                plan,
                f"lfm2/{concurrency}",
                {"backend": "lfm2", "model": str(model), "device": args.device, "size": size},
            )
            level = level_summary(result, concurrency)
            levels.append(level)
            print(
                f"{concurrency:>3} conversations: first audio p50 {_f(level['first_audio_ms']['p50'])} ms, "
                f"generation RTF p50 {_f(level['generation_rtf']['p50'], 2)}, underruns {level['underruns']}, "
                f"errors {level['errors']}",
                flush=True,
            )
            for sample in level["error_samples"][:2]:
                print(f"    {sample}")
    print()
    print(table(levels))
    return {
        "mode": "gpu",
        "model": str(model),
        "size": size,
        "device": args.device,
        "max_new_tokens": args.max_new_tokens,
        "engine": args.engine,
        "levels": levels,
        "model_steps": steps,
        "engine_bench": engines,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: build random weights once)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model instead of the full size")
    parser.add_argument("--device", default="cuda", help="torch device for the server: cuda, cpu or auto")
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 4, 8, 16],
        help="comma-separated concurrent conversation counts",
    )
    parser.add_argument("--turns", type=int, default=2, help="turns per conversation")
    parser.add_argument("--max-new-tokens", type=int, help="model steps per reply (default 192 full, 48 tiny)")
    parser.add_argument("--ramp-s", type=float, default=1.0, help="spread conversation starts over this window")
    parser.add_argument("--startup-timeout-s", type=float, default=1200.0, help="model load and warm-up limit")
    parser.add_argument("--turn-timeout-s", type=float, default=300.0, help="longest wait for one reply")
    parser.add_argument(
        "--model-steps", action="store_true", help="first measure per-step costs without the server (bench.lfm2_steps)"
    )
    parser.add_argument(
        "--engine",
        choices=["batched", "serial"],
        default="batched",
        help="the server's engine (serial: the old per-response stepping, for comparisons)",
    )
    parser.add_argument(
        "--engine-bench",
        action="store_true",
        help="first run bench.engine on the device (batched vs serial engine, no server)",
    )
    parser.add_argument("--json", type=Path, help="write all figures to this file")
    args = parser.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 48 if args.tiny else 192
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    if args.json:
        tables = [results.table(f"The server under load, {report['size']} model, {report['engine']} engine",
                                *table_rows(report["levels"]))]  # fmt: skip
        for part in ("model_steps", "engine_bench"):  # their own tables, run on the same device
            tables += (report[part] or {}).get("tables", [])
        results.write(args.json, report, "bench.gpu", argv, tables, device=args.device)
    return 1 if any(level["errors"] for level in report["levels"]) else 0


if __name__ == "__main__":
    sys.exit(main())

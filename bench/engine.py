"""The batched engine against the serial one, on the real architecture.

    python -m bench.engine                                  # full size, bf16, 1/4/8/16/32 conversations
    python -m bench.engine --check                          # batched == serial on full-size weights (fp32)
    python -m bench.engine --model DIR --device cuda --json out.json
    python -m bench.engine --tiny --concurrency 1,4 --steps 12    # the whole path in seconds, anywhere

The model is driven through the engine API (no server): the same backend
serves the scheduler with a batch of one (the serial engine: responses take
the model one after another) and with a full batch, one after the other at
each concurrency. Random weights have the published shapes, so every step
costs what a real one costs; a response never ends by itself, so each runs
to its step budget. The checkpoint is built once by
`scripts/make_tiny_model.py --size full` into `models/random-full`.

At each concurrency N, for each engine, N conversations play two turns:

1. all N send a spoken turn at once (`--utterance-s` of noise at 16 kHz) and
   generate 7 steps (6 text tokens, then the first audio frame): **end of
   turn -> first audio** is submit to the first audio frame, p50 and max
   over the N (the burst is the worst case: N prefills queue);
2. all N send a typed turn ("Go on.", a few positions: the cache holds the
   rest) and generate `--steps` steps: **aggregate model steps/s** counts
   every conversation's steps after its first, over the span from the first
   step of any to the last step of any (a batch of one runs the responses one
   after another), and **per-conversation steps/s** is each one's steps over
   its own span (median over the N).

Audio decoding stays per response (`backend.new_decoder()` per response, as
the pipeline does); `--decode` measures what that costs when N responses
decode at once: N threads each decode `--decode-frames` frames per call (the
pipeline's default stride) in steady state, and the figures are the time of
one call (p50) and the audio decoded per second in all.

`--check` plays a few conversations (different history lengths, text and
audio turns, rows joining while others run) on both engines in fp32,
greedy, and requires identical tokens and frames.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import results  # noqa: E402
from bench.gpu import ensure_model  # noqa: E402
from bench.lfm2_steps import cpu_name  # noqa: E402
from service.backends.base import AssistantTurn, AudioFrame, EndReason, Sampling, TextToken  # noqa: E402
from service.backends.lfm2 import LFM2Backend  # noqa: E402
from service.engine.api import Engine, GenerationRequest, UserTurn  # noqa: E402
from service.engine.compose import batched_engine, serial_engine  # noqa: E402

FIRST_AUDIO_STEPS = 7  # 6 text tokens, then the first frame (the chat pattern of the published config)


class Timed:
    """A sink that stamps every step (perf_counter seconds)."""

    def __init__(self) -> None:
        self.submitted = time.perf_counter()
        self.items: list[TextToken | AudioFrame] = []
        self.times: list[float] = []
        self.reason: EndReason | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def started(self, ts_ms: float) -> None:
        pass

    def steps(self, items: Sequence[TextToken | AudioFrame], ts_ms: float) -> None:
        now = time.perf_counter()
        self.items.extend(items)
        self.times.extend([now] * len(items))

    def finished(self, reason: EndReason | None, error: BaseException | None) -> None:
        self.reason, self.error = reason, error
        self.done.set()

    def first_audio_s(self) -> float | None:
        at = next((i for i, s in enumerate(self.items) if isinstance(s, AudioFrame)), None)
        return None if at is None else self.times[at] - self.submitted


def utterance(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16_000)) * 0.1).astype(np.float32)


def play(engine: Engine, refs: Sequence[Any], turns: Sequence[UserTurn], sampling: Sampling) -> list[Timed]:
    """Submit one turn per conversation at once; wait for all; record the responses."""
    sinks = []
    for ref, turn in zip(refs, turns, strict=True):
        sink = Timed()
        engine.submit(GenerationRequest(ref, turn, sampling), sink)
        sinks.append(sink)
    for sink in sinks:
        if not sink.done.wait(3600):
            raise TimeoutError("a response never finished")
        if sink.error is not None:
            raise RuntimeError(f"a response failed: {sink.error!r}") from sink.error
    for ref, sink in zip(refs, sinks, strict=True):
        engine.edit(ref, lambda c, s=sink: c.record_response(AssistantTurn(list(s.items)))).result(60)
    return sinks


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


@dataclass
class Point:
    engine: str
    conversations: int
    first_audio_ms_p50: float | None
    first_audio_ms_max: float | None
    aggregate_steps_per_s: float | None
    per_conversation_steps_per_s: float | None
    window_steps: int
    wall_s: float
    rows_per_step: float | None = None
    notes: list[str] = field(default_factory=list)


def measure(backend: LFM2Backend, engine: Engine, n: int, args: argparse.Namespace) -> Point:
    started = time.perf_counter()
    audio_sampling = backend.default_sampling()  # chat: greedy text, audio T=1.0 / top-k 4
    refs = [engine.open("") for _ in range(n)]
    try:
        spoken = [UserTurn(audio=utterance(args.utterance_s, i)) for i in range(n)]
        first = play(engine, refs, spoken, Sampling(**{**_fields(audio_sampling), "max_new_tokens": FIRST_AUDIO_STEPS}))
        first_audio = [s.first_audio_s() for s in first]
        steps_before = engine.stats.steps
        rows_before = engine.stats.rows
        typed = [UserTurn(text="Go on.") for _ in range(n)]
        second = play(engine, refs, typed, Sampling(**{**_fields(audio_sampling), "max_new_tokens": args.steps}))
        steps, rows = engine.stats.steps - steps_before, engine.stats.rows - rows_before
    finally:
        for ref in refs:
            engine.release(ref)
    # steps after each conversation's first one, over the span from the first step of any to the last
    # of any (with a batch of one the responses run one after another, so there is no common window)
    start = min(s.times[0] for s in second)
    end = max(s.times[-1] for s in second)
    counts = [len(s.times) for s in second]
    aggregate = per_conversation = None
    if end > start and sum(counts) > n:
        aggregate = round((sum(counts) - n) / (end - start), 2)
        per_conversation = _median([(len(s.times) - 1) / (s.times[-1] - s.times[0])
                                    for s in second if s.times[-1] > s.times[0]])  # fmt: skip
    audio_ms = [s * 1000 for s in first_audio if s is not None]
    return Point(
        engine=engine.name,
        conversations=n,
        first_audio_ms_p50=_median(audio_ms),
        first_audio_ms_max=round(max(audio_ms), 1) if audio_ms else None,
        aggregate_steps_per_s=aggregate,
        per_conversation_steps_per_s=per_conversation,
        window_steps=sum(counts),
        wall_s=round(time.perf_counter() - started, 1),
        rows_per_step=round(rows / steps, 2) if steps else None,
    )


def _fields(sampling: Sampling) -> dict[str, Any]:
    return {name: getattr(sampling, name) for name in Sampling.__dataclass_fields__}


def run_bench(backend: LFM2Backend, args: argparse.Namespace) -> list[Point]:
    points: list[Point] = []
    for n in args.concurrency:
        for kind in ("serial", "batched"):
            if kind == "serial" and n > args.serial_max:
                continue
            engine: Engine
            if kind == "serial":
                engine = serial_engine(backend)
            else:
                engine = batched_engine(backend, max(args.max_batch, n), args.prefill_chunk)
            engine.start()
            try:
                point = measure(backend, engine, n, args)
            finally:
                engine.close(60)
            points.append(point)
            print(f"{n:>3} conversations, {kind:<7}: first audio p50 {_s(point.first_audio_ms_p50)} ms "
                  f"(max {_s(point.first_audio_ms_max)}), {_s(point.aggregate_steps_per_s)} steps/s in all, "
                  f"{_s(point.per_conversation_steps_per_s)} per conversation "
                  f"({point.window_steps} steps, {point.wall_s} s)", flush=True)  # fmt: skip
    return points


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def table(points: Sequence[Point]) -> str:
    header, rows = table_rows(points)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def table_rows(points: Sequence[Point]) -> tuple[list[str], list[list[str]]]:
    levels = sorted({p.conversations for p in points})
    by = {(p.engine, p.conversations): p for p in points}
    header = ["concurrent conversations", *map(str, levels)]
    rows: list[list[str]] = []

    def row(name: str, engine: str, value: Any) -> None:
        rows.append([name, *(value(by[(engine, n)]) if (engine, n) in by else "-" for n in levels)])

    for engine in ("serial", "batched"):
        row(f"{engine}: model steps/s, all conversations", engine, lambda p: _s(p.aggregate_steps_per_s))
        row(f"{engine}: steps/s per conversation", engine, lambda p: _s(p.per_conversation_steps_per_s))
        row(f"{engine}: end of turn -> first audio p50 / max (s)", engine,
            lambda p: f"{_sec(p.first_audio_ms_p50)} / {_sec(p.first_audio_ms_max)}")  # fmt: skip
    rows.append(["batched / serial, steps/s in all", *(_ratio(by, n) for n in levels)])
    return header, rows


def _sec(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.2f}"


def _ratio(by: dict[tuple[str, int], Point], n: int) -> str:
    serial, batched = by.get(("serial", n)), by.get(("batched", n))
    if not serial or not batched or not serial.aggregate_steps_per_s or not batched.aggregate_steps_per_s:
        return "-"
    return f"{batched.aggregate_steps_per_s / serial.aggregate_steps_per_s:.1f}x"


# -- audio decoding ---------------------------------------------------------------------------


def _decode_at_once(backend: LFM2Backend, n: int, frames: int, calls: int) -> tuple[list[float], float]:
    """Call times (s) of `n` decoders used by `n` threads at once, and the wall time."""
    times: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def decode(seed: int) -> None:
        rng = np.random.default_rng(seed)
        decoder = backend.new_decoder()
        try:
            decoder.decode([rng.integers(0, 2048, 8) for _ in range(24)])  # a full left context
            barrier.wait()
            for _ in range(calls):
                batch = [rng.integers(0, 2048, 8) for _ in range(frames)]
                started = time.perf_counter()
                decoder.decode(batch)
                with lock:
                    times.append(time.perf_counter() - started)
        finally:
            decoder.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=decode, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times, time.perf_counter() - started


def measure_decode(backend: LFM2Backend, levels: Sequence[int], frames: int, calls: int) -> list[dict[str, Any]]:
    """Per-response decoders used by N threads at once, as N responses would."""
    out = []
    for n in levels:
        times, wall = _decode_at_once(backend, n, frames, calls)
        point = {"responses": n, "decoder": backend.decoder_kind, "frames_per_call": frames,
                 "call_ms_p50": _median([x * 1000 for x in times]),
                 "audio_s_per_s": round(n * calls * frames * 0.08 / wall, 2)}  # fmt: skip
        out.append(point)
        print(f"decode, {n:>2} responses at once ({backend.decoder_kind}, {frames} frames per call): "
              f"{point['call_ms_p50']} ms per call p50, {point['audio_s_per_s']} s of audio per second in all",
              flush=True)  # fmt: skip
    return out


def decode_rows(decode: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["responses decoding at once", *(str(d["responses"]) for d in decode)]
    return header, [["ms per call p50", *(f"{d['call_ms_p50']}" for d in decode)],
                    ["seconds of audio decoded per second, all", *(f"{d['audio_s_per_s']}" for d in decode)]]  # fmt: skip


# -- equality check ---------------------------------------------------------------------------


def check(backend: LFM2Backend, args: argparse.Namespace) -> bool:
    """Greedy conversations on both engines must produce identical steps."""
    greedy = Sampling(text_temperature=0.0, text_top_k=0, audio_temperature=0.0, audio_top_k=0,
                      max_new_tokens=args.steps)  # fmt: skip
    scripts: list[list[UserTurn]] = [
        [UserTurn(text="Hello there, tell me about the sea."), UserTurn(text="And then?")],
        [UserTurn(audio=utterance(1.5, 1)), UserTurn(text="Thanks.")],
        [UserTurn(text="Hi"), UserTurn(audio=utterance(0.8, 2))],
        [UserTurn(text="A much longer opening message to give this row a longer history. " * 3),
         UserTurn(text="Short.")],
    ]  # fmt: skip

    def converse(engine: Engine, turns: list[UserTurn], delay_s: float) -> list[list[object]]:
        time.sleep(delay_s)  # rows join while others run
        ref = engine.open("")
        out = []
        for turn in turns:
            (sink,) = play(engine, [ref], [turn], greedy)
            out.append([s.token_id if isinstance(s, TextToken) else tuple(s.codes.tolist()) for s in sink.items])
        engine.release(ref)
        return out

    serial = serial_engine(backend)
    serial.start()
    expected = [converse(serial, s, 0.0) for s in scripts]
    serial.close(60)
    batched = batched_engine(backend, 8, args.prefill_chunk)
    batched.start()
    got: list[Any] = [None] * len(scripts)

    def run(i: int) -> None:
        got[i] = converse(batched, scripts[i], 0.5 * i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(scripts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batched.close(60)
    ok = True
    for i, (mine, reference) in enumerate(zip(got, expected, strict=True)):
        for turn, (a, b) in enumerate(zip(mine, reference, strict=True)):
            same = a == b
            ok &= same
            first_diff = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            print(f"conversation {i} turn {turn}: {len(a)} steps, {'identical' if same else 'DIFFERENT'}"
                  + ("" if same else f" (first difference at step {first_diff})"))  # fmt: skip
    rows = batched.stats.rows / batched.stats.steps if batched.stats.steps else 0
    print(f"batched: {batched.stats.steps} steps, {rows:.2f} rows per step on average")
    return ok


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: random weights, built once)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model instead of the full size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16; fp32 with --check)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16, 32],
                        help="comma-separated concurrent conversation counts")  # fmt: skip
    parser.add_argument("--steps", type=int, default=12, help="steps per response in the throughput turn")
    parser.add_argument("--utterance-s", type=float, default=2.0, help="length of the spoken turn")
    parser.add_argument("--max-batch", type=int, default=32, help="the batched engine's max_batch (at least N)")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="the batched engine's prefill_chunk")
    parser.add_argument("--serial-max", type=int, default=10_000, help="skip the serial engine above this N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--check", action="store_true", help="only check batched == serial (greedy)")
    parser.add_argument(
        "--decode",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[],
        help="also measure per-response decoding with this many responses at once, e.g. 1,4,16",
    )
    parser.add_argument("--decode-frames", type=int, default=8, help="frames per decode call")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "fp32" if args.check else "bf16"
    if args.check and args.steps == 12:
        args.steps = 24
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = ensure_model("tiny" if args.tiny else "full", args.model)
    started = time.perf_counter()
    backend = LFM2Backend(model=str(model), device=args.device, dtype=args.dtype)
    backend.load()
    device = backend.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"{backend.model_id} on {device} ({name}, {torch.get_num_threads()} threads), "
        f"{str(backend.dtype).removeprefix('torch.')}, loaded in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    if args.check:
        ok = check(backend, args)
        print("batched == serial" if ok else "batched != serial")
        return 0 if ok else 1
    backend.warmup()
    points = run_bench(backend, args)
    decode = measure_decode(backend, args.decode, args.decode_frames, calls=4) if args.decode else []
    print()
    print(table(points))
    report = {"model": str(model), "device": str(device), "device_name": name,
              "dtype": str(backend.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "steps": args.steps, "utterance_s": args.utterance_s, "prefill_chunk": args.prefill_chunk,
              "points": [p.__dict__ for p in points], "decode": decode}  # fmt: skip
    if args.json:
        tables = [results.table("Batched vs serial engine", *table_rows(points))]
        if decode:
            tables.append(results.table(f"Per-response decoding, {args.decode_frames}-frame calls", *decode_rows(decode)))
        results.write(args.json, report, "bench.engine", argv, tables, device=f"{device} ({name})")
    backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-step costs of the LFM2 backend: prefill, text step, audio frame, decode.

    python -m bench.lfm2_steps --model DIR [--device cpu|cuda] [--dtype bf16|fp32]
    python -m bench.lfm2_steps --model models/tiny --quick         # seconds, on any machine
    python -m bench.lfm2_steps --model DIR --json out.json         # also write the figures

What is measured, through the backend's own API (`service.backends.lfm2`):

* load: checkpoint load time.
* prefill: the first model call of a turn whose user input is an utterance of
  `--utterance-s` seconds (random noise at 16 kHz; the cost depends on its
  length, not its content), history = system prompt + that turn.
* text step / audio frame: wall time between consecutive generated steps,
  split by kind (an audio frame is one backbone step plus 8 depthformer steps).
* decode: one streaming decode call of 1, 4 and 16 frames in steady state,
  for the LFM2.5 detokenizer (windowed, with its left context) and for Mimi
  (streaming). Mimi is timed with random weights when the checkpoint has no
  Mimi file: its cost does not depend on the weight values.
* multi-turn prefill: `--turns` turns of utterance + reply, prefill time and
  positions per turn with the conversation cache on and off.

Works with any checkpoint folder, including the random-weight ones from
scripts/make_tiny_model.py (`--size full` for the real architecture).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import cpu_name, table, write  # noqa: E402
from service.backends.base import AssistantTurn, AudioDecoder, Finished, Sampling, TextToken  # noqa: E402
from service.backends.lfm2 import LFM2Backend  # noqa: E402
from service.backends.lfm2_decode import MimiDecoder, MimiPool  # noqa: E402


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else float("nan")


def _utterance(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16_000)) * 0.1).astype(np.float32)


def _sync(backend: LFM2Backend) -> None:
    import torch

    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)


def measure_generation(backend: LFM2Backend, args: argparse.Namespace) -> dict[str, Any]:
    """Prefill of one utterance turn, then per-step times by kind."""
    sampling = Sampling(
        text_temperature=0.0, text_top_k=0, audio_temperature=1.0, audio_top_k=4, max_new_tokens=args.steps
    )
    prefill: list[float] = []
    text: list[float] = []
    audio: list[float] = []
    positions = 0
    for repeat in range(args.repeats + 1):  # the first run warms up
        conversation = backend.new_conversation("")
        conversation.add_user_audio(_utterance(args.utterance_s, repeat), 16_000)
        _sync(backend)
        last = time.perf_counter()
        first = True
        for step in conversation.generate(sampling, threading.Event()):
            now = time.perf_counter()
            if isinstance(step, Finished):
                break
            if repeat:
                if first:
                    prefill.append(now - last)
                else:
                    (text if isinstance(step, TextToken) else audio).append(now - last)
            first, last = False, now
        positions = conversation.last_prefill_positions
    return {
        "prefill_ms": _median([_ms(x) for x in prefill]),
        "prefill_positions": positions,
        "utterance_s": args.utterance_s,
        "text_step_ms": _median([_ms(x) for x in text]),
        "audio_frame_ms": _median([_ms(x) for x in audio]),
        "text_steps": len(text),
        "audio_frames": len(audio),
    }


def _decode_times(make: Any, batches: tuple[int, ...], repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    for n in batches:
        times = []
        decoder: AudioDecoder = make()
        try:
            # steady state: a detokenizer window has its full left context
            decoder.decode([rng.integers(0, 2048, 8) for _ in range(24)])
            for _ in range(repeats + 1):
                frames = [rng.integers(0, 2048, 8) for _ in range(n)]
                started = time.perf_counter()
                decoder.decode(frames)
                times.append(time.perf_counter() - started)
        finally:
            decoder.close()
        out[f"{n}"] = _median([_ms(x) for x in times[1:]])
    return out


def measure_decoders(backend: LFM2Backend, args: argparse.Namespace) -> dict[str, Any]:
    batches = (1, 4, 16)
    result: dict[str, Any] = {}
    if backend.decoder_kind == "detokenizer":
        result["detokenizer"] = _decode_times(backend.new_decoder, batches, args.repeats)
        result["detokenizer_context_frames"] = backend.detokenizer_context
    folder = backend.folder
    if folder is not None and (folder / "tokenizer-e351c8d8-checkpoint125.safetensors").is_file():
        pool = MimiPool(backend.processor.mimi.eval())
        result["mimi_weights"] = "checkpoint"
    else:
        from liquid_audio.moshi.models.loaders import get_mimi

        pool = MimiPool(get_mimi(None, device=backend.device).eval())
        result["mimi_weights"] = "random (no Mimi file in the checkpoint)"
    result["mimi"] = _decode_times(lambda: MimiDecoder(pool, backend.device), batches, args.repeats)
    return result


def measure_turns(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill per turn as the conversation grows, with and without the cache."""
    sampling = Sampling(
        text_temperature=0.0, text_top_k=0, audio_temperature=1.0, audio_top_k=4, max_new_tokens=args.steps
    )
    out: dict[str, Any] = {}
    for cached in (True, False):
        backend = LFM2Backend(model=args.model, device=args.device, dtype=args.dtype, prefix_cache=cached)
        backend.load()
        rows = []
        conversation = backend.new_conversation("")
        for turn in range(args.turns):
            conversation.add_user_audio(_utterance(args.utterance_s, 100 + turn), 16_000)
            steps = [s for s in conversation.generate(sampling, threading.Event()) if not isinstance(s, Finished)]
            conversation.record_response(AssistantTurn(steps))
            rows.append(
                {
                    "turn": turn + 1,
                    "history": int(conversation.chat.modality_flag.shape[1]),
                    "prefill_positions": conversation.last_prefill_positions,
                    "prefill_ms": round(conversation.last_prefill_ms, 2),
                }
            )
        out["cached" if cached else "uncached"] = rows
        backend.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or Hugging Face id (from the local cache)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--dtype",
        default=None,
        help="bf16, fp16 or fp32 (default: bf16 on GPU and on CPUs with native bf16 matmuls, else fp32)",
    )
    parser.add_argument("--steps", type=int, default=54, help="generated steps per run (54 = 3 x (6 text + 12 audio))")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs (after one warm-up run)")
    parser.add_argument("--utterance-s", type=float, default=3.0, help="length of the user utterance")
    parser.add_argument("--turns", type=int, default=6, help="turns in the multi-turn prefill measurement")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.turns = 36, 1, 3

    import torch

    started = time.perf_counter()
    backend = LFM2Backend(model=args.model, device=args.device, dtype=args.dtype)
    backend.load()
    load_s = time.perf_counter() - started
    params = sum(p.numel() for p in backend.model.parameters())
    report: dict[str, Any] = {
        "model": backend.model_id,
        "device": str(backend.device),
        "device_name": torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else cpu_name(),
        "dtype": str(backend.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "params_millions": round(params / 1e6, 1),
        "load_s": round(load_s, 2),
    }
    report["generation"] = measure_generation(backend, args)
    report["decode_ms"] = measure_decoders(backend, args)
    backend.close()
    report["turns"] = measure_turns(args)

    g, d = report["generation"], report["decode_ms"]
    print(f"\n{report['model']} on {report['device']} ({report['device_name']}), {report['dtype']}, "
          f"{report['params_millions']} M parameters, loaded in {report['load_s']} s")  # fmt: skip
    print(f"  prefill, {g['utterance_s']} s utterance ({g['prefill_positions']} positions): {g['prefill_ms']} ms")
    print(f"  text step:   {g['text_step_ms']} ms   (median of {g['text_steps']})")
    print(f"  audio frame: {g['audio_frame_ms']} ms   (median of {g['audio_frames']}; 80 ms of audio)")
    print("  decode per call, ms:   1 frame   4 frames   16 frames")
    for name in ("detokenizer", "mimi"):
        if name in d:
            row = d[name]
            print(f"    {name:<12}         {row['1']:>7}   {row['4']:>8}   {row['16']:>9}")
    print("  multi-turn prefill (cache on | off):")
    print("    turn  history  positions   ms      | positions   ms")
    for on, off in zip(report["turns"]["cached"], report["turns"]["uncached"], strict=True):
        print(f"    {on['turn']:>4}  {on['history']:>7}  {on['prefill_positions']:>9}  {on['prefill_ms']:>7}  | "
              f"{off['prefill_positions']:>9}  {off['prefill_ms']:>7}")  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        write(args.json, report, "bench.lfm2_steps", argv, [steps_table(report)], device=report["device_name"])
    return 0


def steps_table(report: dict[str, Any]) -> dict[str, Any]:
    g, d, turns = report["generation"], report["decode_ms"], report["turns"]
    rows = [
        [f"prefill, {g['utterance_s']:g} s utterance", f"{g['prefill_ms']} ms"],
        ["text step", f"{g['text_step_ms']} ms"],
        ["audio frame (80 ms of audio)", f"{g['audio_frame_ms']} ms"],
    ]
    rows += [[f"{name} decode, 1 / 4 / 16 frames", f"{d[name]['1']} / {d[name]['4']} / {d[name]['16']} ms"]
             for name in ("detokenizer", "mimi") if name in d]  # fmt: skip
    on, off = turns["cached"][-1], turns["uncached"][-1]
    rows.append([f"turn {on['turn']} prefill, {on['history']} positions of history",
                 f"{on['prefill_ms']} ms with the prefix cache, {off['prefill_ms']} ms without"])  # fmt: skip
    title = f"Per-step costs, {report['params_millions']} M parameters, {report['dtype']}"
    return table(title, ["", report["device_name"]], rows)


if __name__ == "__main__":
    raise SystemExit(main())

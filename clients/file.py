"""`python -m clients.file`: one turn from typed text or a WAV file; the reply is
printed and saved as a WAV file.

    python -m clients.file --text "Hello" --out reply.wav --show-metrics
    python -m clients.file --wav question.wav --realtime --out reply.wav --trace
    python -m clients.file --generate --mode transcribe --wav question.wav

Converse (the default) opens a stream in push-to-talk mode, sends the text or
the WAV's audio (resampled to 16 kHz unless it already is 16, 24 or 48 kHz;
as fast as possible, or at real-time pace with `--realtime`), commits the turn,
half-closes and collects the answer. `--generate` uses the unary Generate call
instead and sends the audio file as it is.

`--show-metrics` prints, one `name value` pair per line: the client's view
(turn sent -> first text / first audio / end, and the per-event latency
`receive time - ts_ms`) and, with `--trace`, the server's ResponseMetrics.
`--metrics-json FILE` writes the same figures as JSON.

Exit status: 0 when the response completed, 1 on a gRPC error, a failed
response or a timeout (with a one-line message on stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients.aio import (
    INPUT_SAMPLE_RATES,
    OUTPUT_SAMPLE_RATE,
    Event,
    GenerateResult,
    VoiceChatClient,
    VoiceChatError,
    latency_summary,
    make_config,
    message_dict,
    print_block,
    status_name,
)
from clients.connection import TargetError, add_connection_args, options_from_args

DEFAULT_SEND_RATE = 16_000


@dataclass
class TurnResult:
    """What one Converse turn produced, with client-side timings (monotonic s)."""

    session_id: str = ""
    response_id: str = ""
    status: str = ""
    reason: str = ""
    text: str = ""
    audio: bytearray = field(default_factory=bytearray)
    events: list[Event] = field(default_factory=list)
    server_metrics: dict[str, Any] | None = None
    decode_batches: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent_at: float = 0.0
    first_text_at: float = 0.0
    first_audio_at: float = 0.0
    ended_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("COMPLETED", "MAX_TOKENS")

    def client_metrics(self) -> dict[str, float]:
        def since_sent(at: float) -> float:
            return round((at - self.sent_at) * 1000, 1) if at and self.sent_at else -1.0

        latencies = latency_summary([e.latency_ms for e in self.events])
        return {
            "turn_to_first_text_ms": since_sent(self.first_text_at),
            "turn_to_first_audio_ms": since_sent(self.first_audio_at),
            "turn_to_end_ms": since_sent(self.ended_at),
            "audio_received_ms": round(len(self.audio) / 2 / OUTPUT_SAMPLE_RATE * 1000, 1),
            "events": len(self.events),
            "event_latency_p50_ms": latencies.get("p50", -1.0),
            "event_latency_p95_ms": latencies.get("p95", -1.0),
            "event_latency_max_ms": latencies.get("max", -1.0),
        }


def load_audio(path: str) -> tuple[bytes, int]:
    """A sound file as PCM16 mono at a rate the service accepts (16 kHz unless
    the file already is 16, 24 or 48 kHz)."""
    import soundfile
    import soxr

    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if rate not in INPUT_SAMPLE_RATES:
        mono = soxr.resample(mono, rate, DEFAULT_SEND_RATE, quality="HQ")
        rate = DEFAULT_SEND_RATE
    pcm = np.round(np.clip(mono, -1.0, 1.0) * 32767).astype("<i2")
    return pcm.tobytes(), int(rate)


def write_wav(path: str, pcm16: bytes, rate: int = OUTPUT_SAMPLE_RATE) -> None:
    with wave.open(path, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm16)


async def audio_chunks(pcm16: bytes, rate: int, chunk_ms: int, realtime: bool) -> AsyncIterator[bytes]:
    """The audio in `chunk_ms` pieces, each due when a microphone would have it."""
    size = max(1, rate * chunk_ms // 1000) * 2
    loop = asyncio.get_running_loop()
    started = loop.time()
    for begin in range(0, len(pcm16), size):
        chunk = pcm16[begin : begin + size]
        if realtime:
            # sleep until the chunk's last sample is "recorded", so delays never add up
            due = started + (begin + len(chunk)) / 2 / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
        yield chunk


async def converse_turn(
    client: VoiceChatClient, args: argparse.Namespace, pcm16: bytes, rate: int, out: Any
) -> TurnResult:
    """Send the turn (audio, then text), half-close, and collect the answer."""
    config = make_config(
        input_sample_rate_hz=rate,
        manual=True,
        trace=args.trace,
        system_prompt=args.system_prompt,
        client_label="file-client",
    )
    result = TurnResult()
    async with client.conversation(config, trace=args.trace) as conv:
        result.session_id = conv.session_id

        async def send() -> None:
            # chunks stay far below the server's max_message_bytes (1 MiB by default)
            async for chunk in audio_chunks(pcm16, rate, args.chunk_ms, args.realtime):
                await conv.send_audio(chunk)
            if pcm16 and args.text:
                await conv.send_text(args.text, defer=True)
            if pcm16:
                await conv.commit()
            elif args.text:
                await conv.send_text(args.text)
            result.sent_at = time.monotonic()
            await conv.close_input()  # the server answers the turn, then ends the stream

        async def receive() -> None:
            async for event in conv.events():
                result.events.append(event)
                collect(result, event, out)

        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(send(), name="file-send")
                tasks.create_task(receive(), name="file-receive")
        except* VoiceChatError as group:
            raise group.exceptions[0] from None  # one clear message, not a group
    return result


def collect(result: TurnResult, event: Event, out: Any) -> None:
    """Fold one event into the result; stream the reply text to `out`."""
    data = event.data
    if event.kind == "response_started":
        result.response_id = data.response_id
    elif event.kind == "text_delta":
        result.first_text_at = result.first_text_at or event.receive_mono
        if out is not None:
            out.write(data.text)
            out.flush()
    elif event.kind == "audio_chunk":
        result.first_audio_at = result.first_audio_at or event.receive_mono
        result.audio += data.pcm16
    elif event.kind == "response_ended":
        result.ended_at = event.receive_mono
        result.status = status_name(data.status)
        result.reason = data.reason
        result.text = data.text
        if out is not None:
            out.write("\n")
    elif event.kind == "metrics":
        if data.WhichOneof("kind") == "response":
            result.server_metrics = message_dict(data.response)
        else:
            result.decode_batches.append(message_dict(data.decode_batch))
    elif event.kind == "error":
        result.errors.append(f"{data.code}: {data.message}")
        print(f"server error: {data.code}: {data.message}", file=sys.stderr)
    elif event.kind == "go_away":
        print(f"server going away in {data.time_left_ms} ms: {data.reason}", file=sys.stderr)


def finish_converse(result: TurnResult, args: argparse.Namespace) -> int:
    """Save and print what the turn produced; the exit status."""
    if args.out:
        write_wav(args.out, bytes(result.audio))
    if args.transcript:
        Path(args.transcript).write_text(result.text + "\n", encoding="utf-8")
    metrics: dict[str, Any] = {
        "session_id": result.session_id,
        "response_id": result.response_id,
        "status": result.status,
        "text": result.text,
        "client": result.client_metrics(),
        "server": result.server_metrics,
        "decode_batches": result.decode_batches,
        "event_latency_ms": {
            kind: latency_summary([e.latency_ms for e in result.events if e.kind == kind])
            for kind in sorted({e.kind for e in result.events})
        },
    }
    if args.show_metrics:
        print_block("metrics (client)", metrics["client"])
        if result.server_metrics is not None:
            print_block(f"metrics (server, {result.response_id})", result.server_metrics)
            print_block("decode batches", {"decode_batches_seen": len(result.decode_batches)})
    if args.metrics_json:
        Path(args.metrics_json).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if not result.status:
        print("error: the stream ended without a response", file=sys.stderr)
        return 1
    if not result.ok:
        print(f"error: response {result.status.lower()}: {result.reason}", file=sys.stderr)
        return 1
    if args.out and not args.quiet:
        print(f"saved {len(result.audio) / 2 / OUTPUT_SAMPLE_RATE:.2f} s of reply audio to {args.out}", file=sys.stderr)
    return 0


def finish_generate(result: GenerateResult, args: argparse.Namespace) -> int:
    if not args.quiet:
        print(result.text)
    if args.out and result.wav:
        Path(args.out).write_bytes(result.wav)
    if args.transcript:
        Path(args.transcript).write_text(result.text + "\n", encoding="utf-8")
    metrics = {"status": result.status, "elapsed_ms": round(result.elapsed_ms, 1), "audio_ms": result.audio_ms}
    if args.show_metrics:
        print_block("metrics (client)", metrics)
    if args.metrics_json:
        Path(args.metrics_json).write_text(json.dumps({"text": result.text, **metrics}, indent=2) + "\n")
    return 0


async def run(args: argparse.Namespace, pcm16: bytes, rate: int, audio_file: bytes) -> TurnResult | GenerateResult:
    """The network part: one Converse turn, or one Generate call with `--generate`."""
    async with VoiceChatClient.connect(options=options_from_args(args)) as client:
        async with asyncio.timeout(args.timeout):
            if args.generate:
                return await client.generate(
                    text=args.text,
                    audio=audio_file,
                    mode=args.mode,
                    system_prompt=args.system_prompt,
                    deadline_s=args.timeout,
                )
            return await converse_turn(client, args, pcm16, rate, None if args.quiet else sys.stdout)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clients.file",
        description="Send one turn (typed text and/or a WAV file) to a voicechat server and save the reply.",
    )
    add_connection_args(parser)
    turn = parser.add_argument_group("turn")
    turn.add_argument("--text", default="", help="typed text of the turn")
    turn.add_argument("--wav", default="", help="audio file of the turn (WAV, FLAC, ...; any rate, mixed to mono)")
    turn.add_argument("--realtime", action="store_true", help="stream the audio at real-time pace")
    turn.add_argument("--chunk-ms", type=int, default=20, help="audio per message in ms [%(default)s]")
    turn.add_argument("--system-prompt", default="", help="system prompt (default: the server's)")
    turn.add_argument("--generate", action="store_true", help="use the unary Generate call instead of Converse")
    turn.add_argument("--mode", choices=("chat", "transcribe", "synthesize"), default="chat", help="Generate mode")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="", help="save the reply audio to this WAV file (24 kHz PCM16 mono)")
    output.add_argument("--transcript", default="", help="save the reply text to this file")
    output.add_argument("--show-metrics", action="store_true", help="print latency figures")
    output.add_argument("--metrics-json", default="", help="write latency figures to this JSON file")
    output.add_argument("--trace", action="store_true", help="ask the server for its metrics (Converse)")
    output.add_argument("--quiet", action="store_true", help="do not print the reply text")
    output.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds [%(default)s]")
    args = parser.parse_args(argv)
    if not args.text and not args.wav:
        parser.error("give --text, --wav or both")
    if args.chunk_ms <= 0:
        parser.error("--chunk-ms must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pcm16, rate, audio_file = b"", DEFAULT_SEND_RATE, b""
        if args.wav and args.generate:
            audio_file = Path(args.wav).read_bytes()  # Generate takes the file as it is
        elif args.wav:
            pcm16, rate = load_audio(args.wav)
        result = asyncio.run(run(args, pcm16, rate, audio_file))
        if isinstance(result, GenerateResult):
            return finish_generate(result, args)
        return finish_converse(result, args)
    except VoiceChatError as exc:
        print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
    except TimeoutError:
        print(f"error: no complete answer within {args.timeout:g} s", file=sys.stderr)
    except (TargetError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

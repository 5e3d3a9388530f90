"""Load generator: concurrent spoken conversations against a server on 127.0.0.1.

Each simulated user holds one Converse stream on its own connection and, for
every turn, streams an espeak-ng utterance (16 kHz PCM16) at real-time pace in
fixed-size chunks, ends the turn (CommitTurn in manual mode; in server-VAD
mode the microphone simply keeps sending silence until the server commits),
reads the reply while a simulated player plays it at real time, and speaks
again once the playback is over. Tracing is on, so every TextDelta and
AudioChunk says when the model produced it.

The server runs in a subprocess (`ServerProcess`), so its CPU time and memory
are measured apart from the client's; both share the machine's cores.

Definitions (all times in ms, wall clock of this machine):
- end of speech: the moment the last audio chunk of the utterance was written
  (the commit follows at once in manual mode);
- first text / first audio / first playable: end of speech to the first
  TextDelta, the first AudioChunk, and the moment 50 ms of audio are buffered;
- server overhead: receive time minus `source_ts_ms`, per delta and chunk,
  also split at the event's `ts_ms` (whole ms, stamped when the stream's
  writer takes it) into time queued in the server and time to write, send
  and read it;
- first-audio lag: overhead of the first chunk minus the server's decode time
  of the first batch (what the pipeline adds beyond the decode itself);
- jitter: RFC 3550 inter-arrival jitter of the reply's audio chunks against
  their media time;
- underruns: gaps of a player that starts once 50 ms are buffered and then
  plays at real time (each late chunk is one underrun; the player waits);
- reply RTF: audio ms delivered after the first chunk per wall ms between the
  first and the last chunk (above 1 keeps ahead of playback).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
INPUT_RATE = 16_000
PREBUFFER_MS = 50.0
_SERVING_RE = re.compile(r"serving on (\S+):(\d+)")


def now_ms() -> float:
    return time.time() * 1000.0


# ---------------------------------------------------------------------------
# The server under test
# ---------------------------------------------------------------------------


class ServerProcess:
    """`python -m service ...` on 127.0.0.1 with a free port, as a child process."""

    def __init__(self, args: Sequence[str], startup_timeout_s: float = 60.0) -> None:
        self.args = list(args)
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._ps: psutil.Process | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log")  # noqa: SIM115

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "service", *self.args, "--host", "127.0.0.1", "--port", "0"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=self._log
        )
        assert self._proc.stdout is not None
        try:
            # the server prints this one line once the model is loaded and warm
            line = (await asyncio.wait_for(self._proc.stdout.readline(), self.startup_timeout_s)).decode()
        except TimeoutError:
            line = ""
        match = _SERVING_RE.search(line)
        if match is None:
            await self.stop()
            raise RuntimeError(f"server did not start ({' '.join(cmd)}):\n{self.log_tail()}")
        self.port = int(match.group(2))
        self._ps = psutil.Process(self._proc.pid)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self._log.close()

    async def stop(self) -> None:
        """SIGTERM (the server drains), then SIGKILL after 15 s."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the server so far (all threads)."""
        if self._ps is None:
            return 0.0
        times = self._ps.cpu_times()
        return times.user + times.system

    def rss_bytes(self) -> int:
        return self._ps.memory_info().rss if self._ps is not None else 0

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        text = Path(self._log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def scripted_args(pipeline: str, step_ms: float, prefill_ms: float = 0.0, decode_ms: float = 0.0,
                  max_sessions: int = 64) -> list[str]:
    """Server flags for the scripted backend at a GPU-like cadence."""
    return [
        "--backend", "scripted",
        "--pipeline", pipeline,
        "--scripted-step-ms", str(step_ms),
        "--scripted-prefill-ms", str(prefill_ms),
        "--scripted-decode-ms", str(decode_ms),
        "--max-sessions", str(max_sessions),
        "--idle-timeout-seconds", "0",
        "--drain-seconds", "2",
        "--log-level", "WARNING",
    ]


# ---------------------------------------------------------------------------
# One turn, as the client sees it
# ---------------------------------------------------------------------------


@dataclass
class TurnRecord:
    """What one turn measured; latencies are from the end of speech."""

    conversation: int
    turn: int
    error: str = ""
    commit_ms: float | None = None  # end of speech -> turn_committed received
    first_text_ms: float | None = None
    first_audio_ms: float | None = None
    first_playable_ms: float | None = None
    first_audio_lag_ms: float | None = None
    audio_ms: float = 0.0
    chunks: int = 0
    jitter_ms: float = 0.0
    max_gap_ms: float = 0.0
    underruns: int = 0
    stall_ms: float = 0.0
    rtf: float | None = None
    status: str = ""
    text_tokens: int = 0
    audio_frames: int = 0
    server: dict[str, float] = field(default_factory=dict)
    # per-event server overhead, split by what the event is
    text_overhead_ms: list[float] = field(default_factory=list, repr=False)
    batch_head_overhead_ms: list[float] = field(default_factory=list, repr=False)  # first chunk of a decode batch
    audio_overhead_ms: list[float] = field(default_factory=list, repr=False)  # every chunk but the final batch's
    final_batch_overhead_ms: list[float] = field(default_factory=list, repr=False)  # the response's last batch
    decode_ms: list[float] = field(default_factory=list, repr=False)
    decode_frames: list[int] = field(default_factory=list, repr=False)
    # server overhead proper: event ready in the server (text decoded, audio
    # decoded: `ready_ts_ms`) to received by the client
    ready_overhead_ms: list[float] = field(default_factory=list, repr=False)
    # that overhead split at `ts_ms` (whole ms, taken when the stream's writer
    # takes the event): queued in the server / written, sent and read
    queued_ms: list[float] = field(default_factory=list, repr=False)
    wire_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def overhead_ms(self) -> list[float]:
        return self.text_overhead_ms + self.audio_overhead_ms + self.final_batch_overhead_ms

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("text_overhead_ms", "batch_head_overhead_ms", "audio_overhead_ms",
                     "final_batch_overhead_ms", "decode_ms", "decode_frames", "ready_overhead_ms", "queued_ms",
                     "wire_ms"):
            del out[name]
        return out


@dataclass
class Playback:
    """What a simulated real-time player did with one reply (times in epoch ms)."""

    start_ms: float
    end_ms: float
    underruns: int
    stall_ms: float


def simulate_playback(arrivals: Sequence[tuple[float, float]], prebuffer_ms: float = PREBUFFER_MS) -> Playback:
    """Play (arrival time, duration) chunks at real time once `prebuffer_ms`
    is buffered; a chunk that arrives after its play time is an underrun and
    the player waits for it."""
    if not arrivals:
        return Playback(0.0, 0.0, 0, 0.0)
    buffered, start = 0.0, arrivals[-1][0]
    for recv, duration in arrivals:
        buffered += duration
        if buffered >= prebuffer_ms:
            start = recv
            break
    media = stall = 0.0
    underruns = 0
    for recv, duration in arrivals:
        due = start + stall + media
        if recv > due:
            underruns += 1
            stall += recv - due
        media += duration
    return Playback(start, start + stall + media, underruns, stall)


def rfc3550_jitter(arrivals: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(jitter, largest inter-arrival gap) of chunks against their media time."""
    jitter = gap = 0.0
    for (prev_recv, prev_duration), (recv, _) in zip(arrivals, arrivals[1:], strict=False):
        # D(i-1, i): arrival spacing minus media spacing; J += (|D| - J) / 16
        jitter += (abs((recv - prev_recv) - prev_duration) - jitter) / 16
        gap = max(gap, recv - prev_recv)
    return jitter, gap


class _TurnProbe:
    """Collects the events of one turn's response as they arrive."""

    def __init__(self, conversation: int, turn: int) -> None:
        self.record = TurnRecord(conversation, turn)
        self.end_of_speech = 0.0
        self.response_id = ""
        self.committed = 0.0
        self.first_text = 0.0
        self.arrivals: list[tuple[float, float]] = []
        self.sources: list[float] = []  # source_ts_ms of each chunk; a decode batch shares one
        self.done = asyncio.Event()

    def on_event(self, event: pb.ConverseResponse, recv: float) -> None:
        kind = event.WhichOneof("event")
        rec = self.record
        if kind in ("text_delta", "audio_chunk"):
            ready = getattr(event, kind).ready_ts_ms
            if ready:
                rec.ready_overhead_ms.append(recv - ready)
                rec.queued_ms.append(event.ts_ms - ready)
                rec.wire_ms.append(recv - event.ts_ms)
        if kind == "turn_committed":
            self.committed = self.committed or recv
        elif kind == "response_started":
            if not self.response_id:
                self.response_id = event.response_started.response_id
            else:
                rec.error = rec.error or "more than one response in a turn"
        elif kind == "text_delta" and event.text_delta.response_id == self.response_id:
            self.first_text = self.first_text or recv
            if event.text_delta.source_ts_ms:
                rec.text_overhead_ms.append(recv - event.text_delta.source_ts_ms)
        elif kind == "audio_chunk" and event.audio_chunk.response_id == self.response_id:
            chunk = event.audio_chunk
            duration = len(chunk.pcm16) / 2 * 1000 / (chunk.sample_rate_hz or 24_000)
            self.arrivals.append((recv, duration))
            self.sources.append(chunk.source_ts_ms)
        elif kind == "metrics" and event.metrics.response_id == self.response_id:
            which = event.metrics.WhichOneof("kind")
            if which == "decode_batch":
                rec.decode_ms.append(event.metrics.decode_batch.decode_ms)
                rec.decode_frames.append(event.metrics.decode_batch.frames)
            elif which == "response":
                m = event.metrics.response
                rec.server = {
                    "prefill_ms": m.prefill_ms,
                    "commit_to_first_text_ms": m.commit_to_first_text_ms,
                    "commit_to_first_audio_ms": m.commit_to_first_audio_ms,
                    "generation_ms": m.generation_ms,
                    "generation_rtf": m.generation_rtf,
                    "decode_batches": m.decode_batches,
                    "decode_ms_total": m.decode_ms_total,
                    "decode_ms_max": m.decode_ms_max,
                    "server_latency_p50_ms": m.server_latency_p50_ms,
                    "server_latency_max_ms": m.server_latency_max_ms,
                    "queue_high_water": m.queue_high_water,
                    "audio_merged": m.audio_merged,
                    "text_coalesced": m.text_coalesced,
                }
                self.done.set()
        elif kind == "response_ended" and event.response_ended.response_id == self.response_id:
            rec.status = pb.ResponseStatus.Name(event.response_ended.status)
            rec.text_tokens, rec.audio_frames = event.response_ended.text_tokens, event.response_ended.audio_frames
            if event.response_ended.status not in (pb.RESPONSE_STATUS_COMPLETED, pb.RESPONSE_STATUS_MAX_TOKENS):
                rec.error = rec.error or f"{rec.status}: {event.response_ended.reason}"
        elif kind == "error":
            rec.error = rec.error or f"{event.error.code}: {event.error.message}"

    def finish(self) -> TurnRecord:
        rec, end = self.record, self.end_of_speech
        if self.committed:
            rec.commit_ms = self.committed - end
        if self.first_text:
            rec.first_text_ms = self.first_text - end
        if self.arrivals:
            first_recv = self.arrivals[0][0]
            rec.first_audio_ms = first_recv - end
            play = simulate_playback(self.arrivals)
            rec.first_playable_ms = play.start_ms - end
            rec.underruns, rec.stall_ms = play.underruns, play.stall_ms
            rec.audio_ms = sum(d for _, d in self.arrivals)
            rec.chunks = len(self.arrivals)
            rec.jitter_ms, rec.max_gap_ms = rfc3550_jitter(self.arrivals)
            if len(self.arrivals) > 1:
                wall = self.arrivals[-1][0] - first_recv
                rec.rtf = (rec.audio_ms - self.arrivals[0][1]) / wall if wall > 0 else math.inf
            if self.sources[0] and rec.decode_ms:
                rec.first_audio_lag_ms = (first_recv - self.sources[0]) - rec.decode_ms[0]
            self._split_audio_overhead()
        return rec

    def _split_audio_overhead(self) -> None:
        """Overhead per chunk, split into the final decode batch of the response
        (held until the model's end-of-audio step) and the rest."""
        rec = self.record
        if not any(self.sources):
            return
        final_source = self.sources[-1]
        previous = None
        for (recv, _), source in zip(self.arrivals, self.sources, strict=True):
            if not source:
                continue
            overhead = recv - source
            if source == final_source:
                rec.final_batch_overhead_ms.append(overhead)
            else:
                rec.audio_overhead_ms.append(overhead)
                if source != previous:
                    rec.batch_head_overhead_ms.append(overhead)
            previous = source

    def playback_end(self) -> float:
        return simulate_playback(self.arrivals).end_ms if self.arrivals else now_ms()


# ---------------------------------------------------------------------------
# One conversation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    """What every simulated user does."""

    conversations: int
    turns: int
    utterances: tuple[bytes, ...]  # 16 kHz PCM16, trimmed speech
    turn_detection: str = "manual"  # "manual", "vad" or "semantic"
    speculative: bool = True  # server VAD and semantic: start the response in the silence
    input_transcription: bool = False  # ask for a transcript of every spoken turn
    input_chunk_ms: int = 40
    ramp_s: float = 3.0  # conversation starts are spread over this window
    think_ms: float = 200.0  # pause between the end of playback and the next utterance
    turn_timeout_s: float = 60.0
    max_new_tokens: int = 0  # 0: the server's default
    output: pb.OutputAudioConfig | None = None


class _Mic:
    """Writes PCM16 chunks at real-time pace, like a microphone."""

    def __init__(self, call: grpc.aio.StreamStreamCall, chunk_ms: int) -> None:
        self.call = call
        self.chunk_bytes = INPUT_RATE * chunk_ms // 1000 * 2
        self._loop = asyncio.get_running_loop()
        self._base = self._loop.time()
        self._sent_s = 0.0

    def restart_clock(self) -> None:
        self._base, self._sent_s = self._loop.time(), 0.0

    async def send(self, pcm16: bytes) -> None:
        """Send one chunk once its last sample would have been recorded."""
        self._sent_s += len(pcm16) / 2 / INPUT_RATE
        delay = self._base + self._sent_s - self._loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await self.call.write(pb.ConverseRequest(audio=pb.InputAudio(pcm16=pcm16)))

    async def speak(self, pcm16: bytes) -> None:
        for begin in range(0, len(pcm16), self.chunk_bytes):
            await self.send(pcm16[begin : begin + self.chunk_bytes])

    async def silence_until(self, done: asyncio.Event, deadline: float) -> None:
        """Send digital silence until `done` is set (or the loop-time deadline)."""
        quiet = b"\0" * self.chunk_bytes
        while not done.is_set() and self._loop.time() < deadline:
            await self.send(quiet)


async def _conversation(index: int, target: str, plan: LoadPlan, start_delay_s: float) -> list[TurnRecord]:
    await asyncio.sleep(start_delay_s)
    records: list[TurnRecord] = []
    manual = plan.turn_detection == "manual"
    mode = {"manual": pb.TURN_DETECTION_MODE_MANUAL, "vad": pb.TURN_DETECTION_MODE_SERVER_VAD,
            "semantic": pb.TURN_DETECTION_MODE_SEMANTIC}[plan.turn_detection]  # fmt: skip
    config = pb.SessionConfig(
        trace=True,
        input_transcription=plan.input_transcription,
        client_label=f"bench-{index}",
        turn_detection=pb.TurnDetection(mode=mode, speculative=plan.speculative),
    )
    if plan.max_new_tokens:
        config.sampling.max_new_tokens = plan.max_new_tokens
    if plan.output is not None:
        config.output_audio.CopyFrom(plan.output)
    probe: _TurnProbe | None = None
    # a connection per user, as separate clients would have
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = pb_grpc.VoiceChatServiceStub(channel).Converse()

        async def read() -> None:
            while True:
                event = await call.read()
                if event is grpc.aio.EOF:
                    return
                recv = now_ms()
                if probe is not None:
                    probe.on_event(event, recv)

        async def write() -> None:
            nonlocal probe
            loop = asyncio.get_running_loop()
            await call.write(pb.ConverseRequest(config=config))
            mic = _Mic(call, plan.input_chunk_ms)
            for turn in range(plan.turns):
                probe = _TurnProbe(index, turn)
                mic.restart_clock()
                await mic.speak(plan.utterances[(index + turn) % len(plan.utterances)])
                probe.end_of_speech = now_ms()
                deadline = loop.time() + plan.turn_timeout_s
                if manual:
                    await call.write(pb.ConverseRequest(commit_turn=pb.CommitTurn()))
                else:
                    await mic.silence_until(probe.done, deadline)
                try:
                    await asyncio.wait_for(probe.done.wait(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    probe.record.error = probe.record.error or f"no reply within {plan.turn_timeout_s:g} s"
                    records.append(probe.finish())
                    break
                records.append(probe.finish())
                # listen to the reply, think, then speak again
                listen_until = loop.time() + (probe.playback_end() + plan.think_ms - now_ms()) / 1000
                if turn + 1 < plan.turns:
                    if manual:
                        await asyncio.sleep(max(0.0, listen_until - loop.time()))
                    else:
                        await mic.silence_until(asyncio.Event(), listen_until)
            await call.done_writing()

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(read(), name=f"bench-{index}-read")
                group.create_task(write(), name=f"bench-{index}-write")
        except* grpc.aio.AioRpcError as failure:
            error = failure.exceptions[0]
            assert isinstance(error, grpc.aio.AioRpcError)
            text = f"{error.code().name}: {error.details()}"
            if probe is not None and (not records or records[-1] is not probe.record):
                probe.record.error = probe.record.error or text
                records.append(probe.record)
            else:
                records.append(TurnRecord(index, len(records), error=text))
    return records


# ---------------------------------------------------------------------------
# A run: N conversations, aggregated
# ---------------------------------------------------------------------------


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
    clean = [v for v in values if v is not None and math.isfinite(v)]
    if not clean:
        return {f"p{q:g}": None for q in qs}
    return {f"p{q:g}": float(np.percentile(clean, q)) for q in qs}


@dataclass
class RunResult:
    label: str
    settings: dict[str, Any]
    records: list[TurnRecord]
    wall_s: float
    server_cpu_pct: float
    server_rss_mb: float
    client_cpu_pct: float
    loop_lag_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> list[TurnRecord]:
        return [r for r in self.records if not r.error]

    @property
    def errors(self) -> list[str]:
        return [f"conversation {r.conversation} turn {r.turn}: {r.error}" for r in self.records if r.error]

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        overhead = [x for r in ok for x in r.ready_overhead_ms]
        step = [x for r in ok for x in r.overhead_ms]
        server_max = [r.server.get("server_latency_max_ms", 0.0) for r in ok if r.server]
        decode = [x for r in ok for x in r.decode_ms]
        planned = self.settings.get("conversations", 0) * self.settings.get("turns", 0)
        return {
            "label": self.label,
            "settings": self.settings,
            "turns_planned": planned,
            "turns_ok": len(ok),
            "errors": len(self.errors),
            "error_samples": self.errors[:5],
            "wall_s": self.wall_s,
            "throughput_turns_per_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "commit_ms": percentiles([r.commit_ms for r in ok if r.commit_ms is not None]),
            "commit_to_first_audio_ms": percentiles(
                [r.first_audio_ms - r.commit_ms for r in ok if r.first_audio_ms is not None and r.commit_ms is not None]
            ),
            "first_text_ms": percentiles([r.first_text_ms for r in ok if r.first_text_ms is not None]),
            "first_audio_ms": percentiles([r.first_audio_ms for r in ok if r.first_audio_ms is not None]),
            "first_playable_ms": percentiles([r.first_playable_ms for r in ok if r.first_playable_ms is not None]),
            "first_audio_lag_ms": percentiles([r.first_audio_lag_ms for r in ok if r.first_audio_lag_ms is not None]),
            "server_overhead_ms": {**percentiles(overhead), "max": max(overhead, default=None), "events": len(overhead)},
            "step_to_receive_ms": {**percentiles(step), "max": max(step, default=None), "events": len(step)},
            "overhead_text_ms": percentiles([x for r in ok for x in r.text_overhead_ms]),
            "overhead_batch_head_ms": percentiles([x for r in ok for x in r.batch_head_overhead_ms]),
            "overhead_audio_ms": percentiles([x for r in ok for x in r.audio_overhead_ms]),
            "overhead_final_batch_ms": percentiles([x for r in ok for x in r.final_batch_overhead_ms]),
            "overhead_excl_final_batch_ms": percentiles(
                [x for r in ok for x in r.text_overhead_ms + r.audio_overhead_ms]
            ),
            "overhead_queued_ms": percentiles([x for r in ok for x in r.queued_ms]),
            "overhead_wire_ms": percentiles([x for r in ok for x in r.wire_ms]),
            "server_latency_max_ms": percentiles(server_max),
            "client_loop_lag_ms": {**percentiles(self.loop_lag_ms), "max": max(self.loop_lag_ms, default=None)},
            "decode_ms": percentiles(decode),
            "jitter_ms": percentiles([r.jitter_ms for r in ok if r.chunks > 1]),
            "max_gap_ms": percentiles([r.max_gap_ms for r in ok if r.chunks > 1]),
            "underruns": sum(r.underruns for r in ok),
            "turns_with_underrun": sum(r.underruns > 0 for r in ok),
            "stall_ms_total": sum(r.stall_ms for r in ok),
            "rtf": {**percentiles([r.rtf for r in ok if r.rtf is not None], (5, 50)),
                    "min": min((r.rtf for r in ok if r.rtf is not None), default=None)},
            "reply_audio_ms": percentiles([r.audio_ms for r in ok]),
            "audio_chunks_merged": sum(int(r.server.get("audio_merged", 0)) for r in ok),
            "queue_high_water_max": max((int(r.server.get("queue_high_water", 0)) for r in ok), default=0),
            "server_cpu_pct": self.server_cpu_pct,
            "server_rss_mb": self.server_rss_mb,
            "client_cpu_pct": self.client_cpu_pct,
        }


async def run_load(server: ServerProcess, plan: LoadPlan, label: str, settings: dict[str, Any]) -> RunResult:
    """Run `plan` against `server`; measures server and client CPU over the run."""
    client = psutil.Process()
    peak_rss = server.rss_bytes()
    stop = asyncio.Event()

    lags: list[float] = []

    async def sample() -> None:
        # the server's peak memory, and how late this client's own event loop
        # wakes up (that lateness is part of every receive time measured here)
        nonlocal peak_rss
        loop = asyncio.get_running_loop()
        ticks = 0
        while not stop.is_set():
            if ticks % 25 == 0:
                peak_rss = max(peak_rss, server.rss_bytes())
            ticks += 1
            due = loop.time() + 0.02
            await asyncio.sleep(0.02)
            lags.append((loop.time() - due) * 1000)

    server_cpu0, client_cpu0 = server.cpu_seconds(), sum(client.cpu_times()[:2])
    started = time.monotonic()
    sampler = asyncio.create_task(sample(), name="bench-sampler")
    try:
        n = plan.conversations
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_conversation(i, server.target, plan, plan.ramp_s * i / n), name=f"bench-{i}")
                for i in range(n)
            ]
    finally:
        stop.set()
        await sampler
    wall = time.monotonic() - started
    server_cpu = server.cpu_seconds() - server_cpu0
    client_cpu = sum(client.cpu_times()[:2]) - client_cpu0
    records = [r for task in tasks for r in task.result()]
    return RunResult(
        label=label,
        settings={**settings, "conversations": plan.conversations, "turns": plan.turns,
                  "turn_detection": plan.turn_detection, "input_chunk_ms": plan.input_chunk_ms},
        records=records,
        wall_s=wall,
        server_cpu_pct=100 * server_cpu / wall,
        server_rss_mb=peak_rss / 2**20,
        client_cpu_pct=100 * client_cpu / wall,
        loop_lag_ms=lags,
    )

"""An importable asyncio client for voicechat.v1.

    from clients.aio import VoiceChatClient, make_config

    async with VoiceChatClient.connect("127.0.0.1:50051") as client:
        print(await client.health())                          # "SERVING"
        async with client.conversation(make_config(manual=True)) as conv:
            await conv.send_text("Hello!")
            await conv.close_input()                          # answer, then end
            async for event in conv.events():
                if event.kind == "text_delta":
                    print(event.data.text, end="")
                elif event.kind == "audio_chunk":
                    speaker.write(event.data.pcm16)           # PCM16 24 kHz mono
        reply = await client.generate(text="Hi", mode="synthesize")

`events()` yields `Event`s: the event's name as `kind` ("session_started",
"text_delta", "audio_chunk", ...), the protobuf message of that kind as
`data`, the server's `seq` and `ts_ms`, and when it arrived (`receive_ts`,
epoch ms, and `receive_mono`, `time.monotonic()` seconds); `latency_ms` is
`receive_ts - ts_ms` (meaningful when both clocks are in sync).

Leaving `conversation()` early cancels the call ("stop now"); to finish in
order, `close_input()` and read `events()` to the end. gRPC failures are raised
as `VoiceChatError` with the status code and the server's message.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.connection import ConnectionOptions, open_channel, resolve
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

OUTPUT_SAMPLE_RATE = 24_000
INPUT_SAMPLE_RATES = (16_000, 24_000, 48_000)
EVENT_KINDS: tuple[str, ...] = tuple(f.name for f in pb.ConverseResponse.DESCRIPTOR.oneofs_by_name["event"].fields)
GENERATE_MODES = {
    "chat": pb.GENERATE_MODE_CHAT,
    "transcribe": pb.GENERATE_MODE_TRANSCRIBE,
    "synthesize": pb.GENERATE_MODE_SYNTHESIZE,
}

Metadata = Sequence[tuple[str, str]]
Sampling = pb.SamplingParams | Mapping[str, float | int]


class VoiceChatError(Exception):
    """A call failed with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> VoiceChatError:
        return cls(exc.code(), exc.details() or "")


@dataclass(frozen=True, slots=True)
class Event:
    """One server event, as received."""

    kind: str  # name of the ConverseResponse oneof field, e.g. "text_delta"
    data: Any  # the protobuf message of that kind, e.g. pb.TextDelta
    seq: int
    ts_ms: int  # server wall clock when written, epoch ms
    receive_ts: float  # client wall clock when read, epoch ms
    receive_mono: float  # time.monotonic() when read, seconds

    @property
    def latency_ms(self) -> float:
        """Server write to client read, in ms (needs synchronised clocks)."""
        return self.receive_ts - self.ts_ms

    @property
    def response_id(self) -> str:
        """The response the event belongs to, "" for session-level events."""
        return str(getattr(self.data, "response_id", ""))

    @classmethod
    def from_proto(cls, message: pb.ConverseResponse) -> Event:
        kind = message.WhichOneof("event") or ""
        data = getattr(message, kind) if kind else None
        return cls(kind, data, message.seq, message.ts_ms, time.time() * 1000, time.monotonic())


@dataclass(frozen=True, slots=True)
class GenerateResult:
    """The answer of one Generate call."""

    text: str
    wav: bytes  # a WAV file (PCM16 mono), b"" when the mode returns no audio
    sample_rate_hz: int
    status: str  # "COMPLETED" or "MAX_TOKENS"
    audio_ms: int
    elapsed_ms: float  # call duration measured by the client


def sampling_params(sampling: Sampling | None) -> pb.SamplingParams | None:
    if sampling is None or isinstance(sampling, pb.SamplingParams):
        return sampling
    return pb.SamplingParams(**sampling)  # type: ignore[arg-type]


def make_config(
    *,
    input_sample_rate_hz: int = 16_000,
    manual: bool = False,
    trace: bool = False,
    system_prompt: str = "",
    client_label: str = "",
    sampling: Sampling | None = None,
    silence_duration_ms: int | None = None,
    interrupt_response: bool | None = None,
    chunk_ms: int = 0,
    first_chunk_frames: int = 0,
) -> pb.SessionConfig:
    """A SessionConfig from keyword arguments; unset values use the server's defaults."""
    turn = pb.TurnDetection(
        mode=pb.TURN_DETECTION_MODE_MANUAL if manual else pb.TURN_DETECTION_MODE_SERVER_VAD,
    )
    if silence_duration_ms is not None:
        turn.silence_duration_ms = silence_duration_ms
    if interrupt_response is not None:
        turn.interrupt_response = interrupt_response
    return pb.SessionConfig(
        input_sample_rate_hz=input_sample_rate_hz,
        system_prompt=system_prompt,
        sampling=sampling_params(sampling),
        turn_detection=turn,
        output_audio=pb.OutputAudioConfig(chunk_ms=chunk_ms, first_chunk_frames=first_chunk_frames),
        trace=trace,
        client_label=client_label,
    )


def as_pcm16(audio: bytes | bytearray | memoryview | np.ndarray) -> bytes:
    """PCM16 little-endian bytes from bytes, int16 samples or float samples in [-1, 1]."""
    if isinstance(audio, np.ndarray):
        if audio.dtype.kind == "f":
            audio = np.round(np.clip(audio, -1.0, 1.0) * 32767)
        return np.ascontiguousarray(audio, dtype="<i2").tobytes()
    return bytes(audio)


class Conversation:
    """One Converse stream. Created by `VoiceChatClient.conversation`."""

    def __init__(self, call: grpc.aio.StreamStreamCall, config: pb.SessionConfig) -> None:
        self._call = call
        self.config = config
        self.session: pb.SessionStarted | None = None  # set once the stream is open
        self.gaps = 0  # events missing from the seq numbering (should stay 0)
        self._first: Event | None = None
        self._last_seq = 0
        self._write_lock = asyncio.Lock()
        self._input_closed = False

    @property
    def session_id(self) -> str:
        return self.session.session_id if self.session else ""

    @property
    def done(self) -> bool:
        return self._call.done()

    async def _open(self) -> None:
        await self._send(pb.ConverseRequest(config=self.config))
        first = await self._read()
        if first is None:
            raise VoiceChatError(grpc.StatusCode.UNAVAILABLE, "the stream ended before session_started")
        self._first = first
        if first.kind == "session_started":
            self.session = first.data

    async def _read(self) -> Event | None:
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise VoiceChatError.from_rpc(exc) from exc
        if message is grpc.aio.EOF:
            return None
        event = Event.from_proto(message)
        if self._last_seq and event.seq != self._last_seq + 1:
            self.gaps += 1
        self._last_seq = event.seq
        return event

    async def events(self) -> AsyncIterator[Event]:
        """Every event from `session_started` to the end of the stream.

        Ends when the server closes the stream normally; raises
        `VoiceChatError` when it ends with an error status. One reader only."""
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        while (event := await self._read()) is not None:
            yield event

    async def _send(self, request: pb.ConverseRequest) -> None:
        # grpc.aio allows one write in flight at a time; callers may be several tasks
        async with self._write_lock:
            try:
                await self._call.write(request)
            except grpc.aio.AioRpcError as exc:
                raise VoiceChatError.from_rpc(exc) from exc
            except asyncio.InvalidStateError as exc:  # input already closed, or the call is over
                raise VoiceChatError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot send: {exc}") from exc

    async def send_audio(self, audio: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Microphone audio for the current turn, at the session's input rate."""
        await self._send(pb.ConverseRequest(audio=pb.InputAudio(pcm16=as_pcm16(audio))))

    async def send_text(self, text: str, defer: bool = False) -> None:
        """Typed text; ends the turn unless `defer` (then `commit()` answers it)."""
        await self._send(pb.ConverseRequest(text=pb.InputText(text=text, defer_response=defer)))

    async def commit(self) -> None:
        """End the user's turn: answer what was sent since the last one."""
        await self._send(pb.ConverseRequest(commit_turn=pb.CommitTurn()))

    async def cancel(self, response_id: str = "") -> None:
        """Stop generating a response (the current one by default)."""
        await self._send(pb.ConverseRequest(cancel_response=pb.CancelResponse(response_id=response_id)))

    async def truncate(self, response_id: str, played_ms: int) -> None:
        """Tell the server how much of a response was actually played."""
        truncate = pb.TruncateResponse(response_id=response_id, audio_played_ms=max(0, int(played_ms)))
        await self._send(pb.ConverseRequest(truncate=truncate))

    async def update(
        self,
        *,
        sampling: Sampling | None = None,
        turn_detection: pb.TurnDetection | None = None,
        trace: bool | None = None,
    ) -> None:
        """Change sampling, turn detection or tracing from the next response on."""
        update = pb.UpdateConfig(sampling=sampling_params(sampling), turn_detection=turn_detection)
        if trace is not None:
            update.trace = trace
        await self._send(pb.ConverseRequest(update_config=update))

    async def close_input(self) -> None:
        """Half-close: the server answers the pending turn, then ends the stream."""
        if self._input_closed or self._call.done():
            return
        self._input_closed = True
        async with self._write_lock:
            try:
                await self._call.done_writing()
            except grpc.aio.AioRpcError as exc:
                raise VoiceChatError.from_rpc(exc) from exc

    def cancel_call(self) -> None:
        """Abandon the stream at once; the server cancels what it is doing."""
        self._call.cancel()


class VoiceChatClient:
    """A connection to a voicechat server. Use `VoiceChatClient.connect(...)`."""

    def __init__(self, channel: grpc.aio.Channel, options: ConnectionOptions) -> None:
        self.channel = channel
        self.options = options
        self.stub = pb_grpc.VoiceChatServiceStub(channel)
        self._metadata = options.metadata()

    @property
    def target(self) -> str:
        return self.options.target

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        target: str | None = None,
        *,
        tls: bool | None = None,
        token: str | None = None,
        ca_file: str = "",
        modal_key: str = "",
        modal_secret: str = "",
        modal_app: str = "",
        options: ConnectionOptions | None = None,
    ) -> AsyncIterator[VoiceChatClient]:
        """Open a channel; keyword arguments override `options`.

        `token=None` reads the bearer token from `VOICECHAT_TOKEN`; `tls=None`
        turns TLS on for port 443. The channel connects lazily: the first call
        fails with UNAVAILABLE when the server cannot be reached."""
        base = options or ConnectionOptions()
        overrides: dict[str, Any] = {
            "target": target,
            "tls": tls,
            "ca_file": ca_file,
            "modal_key": modal_key,
            "modal_secret": modal_secret,
            "modal_app": modal_app,
        }
        merged = replace(base, **{k: v for k, v in overrides.items() if v not in (None, "")})
        if token is not None:
            merged = replace(merged, token=token)
        elif not merged.token:
            merged = replace(merged, token=os.environ.get("VOICECHAT_TOKEN", ""))
        resolved = await resolve(merged)
        channel = open_channel(resolved)
        try:
            yield cls(channel, resolved)
        finally:
            await channel.close()

    def _call_metadata(self, extra: Metadata = ()) -> tuple[tuple[str, str], ...]:
        return (*self._metadata, *extra)

    @asynccontextmanager
    async def conversation(
        self, config: pb.SessionConfig | None = None, *, trace: bool = False, metadata: Metadata = ()
    ) -> AsyncIterator[Conversation]:
        """Open a Converse stream, send `config` and wait for `session_started`.

        `trace=True` asks for Metrics events (the `x-trace: 1` header)."""
        extra = (*metadata, ("x-trace", "1")) if trace else tuple(metadata)
        call = self.stub.Converse(metadata=self._call_metadata(extra))
        conversation = Conversation(call, config or pb.SessionConfig())
        try:
            await conversation._open()
            yield conversation
        finally:
            if not call.done():
                call.cancel()

    async def generate(
        self,
        text: str = "",
        audio: bytes = b"",
        *,
        mode: str | int = "chat",
        system_prompt: str = "",
        sampling: Sampling | None = None,
        deadline_s: float | None = None,
    ) -> GenerateResult:
        """One-shot generation: `text` and/or `audio` (a WAV, FLAC or MP3 file) in,
        text and a WAV file out. `mode`: chat, transcribe or synthesize;
        `deadline_s` is the gRPC deadline (the server stops work past it)."""
        mode_value = GENERATE_MODES[mode.lower()] if isinstance(mode, str) else mode
        request = pb.GenerateRequest(
            text=text,
            audio=audio,
            system_prompt=system_prompt,
            sampling=sampling_params(sampling),
            mode=mode_value,  # type: ignore[arg-type]
        )
        started = time.monotonic()
        try:
            reply = await self.stub.Generate(request, metadata=self._call_metadata(), timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            raise VoiceChatError.from_rpc(exc) from exc
        return GenerateResult(
            text=reply.text,
            wav=reply.wav,
            sample_rate_hz=reply.sample_rate_hz,
            status=pb.ResponseStatus.Name(reply.status).removeprefix("RESPONSE_STATUS_"),
            audio_ms=reply.audio_ms,
            elapsed_ms=(time.monotonic() - started) * 1000,
        )

    async def health(self, service: str = "", deadline_s: float | None = 10.0) -> str:
        """The grpc.health.v1 status, e.g. "SERVING" or "NOT_SERVING"."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), metadata=self._call_metadata(), timeout=deadline_s
            )
        except grpc.aio.AioRpcError as exc:
            raise VoiceChatError.from_rpc(exc) from exc
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def status_name(status: int) -> str:
    """A ResponseStatus without its prefix, e.g. COMPLETED."""
    return pb.ResponseStatus.Name(status).removeprefix("RESPONSE_STATUS_")  # type: ignore[arg-type]


# -- reporting helpers shared by the command-line clients ---------------------------


def latency_summary(values: Sequence[float]) -> dict[str, float]:
    """count, p50, p95, max and mean of a list of latencies (ms)."""
    if not values:
        return {"count": 0}
    data = np.asarray(values, dtype=np.float64)
    return {
        "count": int(data.size),
        "p50": round(float(np.percentile(data, 50)), 2),
        "p95": round(float(np.percentile(data, 95)), 2),
        "max": round(float(data.max()), 2),
        "mean": round(float(data.mean()), 2),
    }


def message_dict(message: Any) -> dict[str, Any]:
    """A protobuf message as a dict with proto field names and every field."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def print_block(title: str, values: Mapping[str, Any]) -> None:
    """`title:` then one `  name  value` line per number: the --show-metrics format."""
    numbers = {k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    width = max((len(k) for k in numbers), default=0)
    lines = [f"{title}:"]
    lines += [f"  {k:<{width}}  {round(v, 2) if isinstance(v, float) else v}" for k, v in numbers.items()]
    print("\n".join(lines), flush=True)

"""The gRPC servicer: proto in, session out. Validation of the first message,
admission, and the stream's one writer live here; everything else is in
`service.session` and `service.pipeline`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from service.audio import decode_audio_file, encode_wav, float_to_pcm16
from service.backends.base import (
    FRAME_MS,
    OUTPUT_SAMPLE_RATE,
    AudioFrame,
    EndReason,
    Finished,
    GenerateMode,
    TextToken,
    is_end_of_audio,
)
from service.errors import Internal, InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from service.options import resolve_options, resolve_sampling
from service.outbox import StreamEnd
from service.session import ChatSession, Runtime
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_CONFIG_TIMEOUT_S = 10.0  # the first request (config) must arrive within this time

_MODES = {
    pb.GENERATE_MODE_UNSPECIFIED: GenerateMode.CHAT,
    pb.GENERATE_MODE_CHAT: GenerateMode.CHAT,
    pb.GENERATE_MODE_TRANSCRIBE: GenerateMode.TRANSCRIBE,
    pb.GENERATE_MODE_SYNTHESIZE: GenerateMode.SYNTHESIZE,
}


class Admission:
    """Counts calls holding the model; beyond the limit calls are refused at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.ready = False
        self.draining = False

    def acquire(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; reconnect to another instance")
        if not self.ready:
            raise Unavailable("the model is still loading; retry in a few seconds")
        if self.active >= self.limit:
            raise ResourceExhausted(f"the server is at its limit of {self.limit} concurrent sessions; retry later")
        self.active += 1

    def release(self) -> None:
        self.active -= 1


class VoiceChatServicer(pb_grpc.VoiceChatServiceServicer):
    def __init__(self, runtime: Runtime, admission: Admission) -> None:
        self.runtime = runtime
        self.admission = admission
        self.sessions: set[ChatSession] = set()
        self.all_closed = asyncio.Event()  # set while no session is open (drain waits on it)
        self.all_closed.set()

    async def Converse(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ConverseResponse]:
        try:
            self.admission.acquire()
        except ServiceError as exc:
            await context.abort(exc.code, exc.message)
        try:
            session = await self._open(request_iterator, context)
            if session is None:
                return
            started = time.monotonic()
            self.sessions.add(session)
            self.all_closed.clear()
            log.info("%s started peer=%s label=%r", session.id, context.peer(), session.options.client_label)
            outcome = "ok"
            try:
                while True:
                    item = await session.outbox.get()
                    if isinstance(item, StreamEnd):
                        if item.code is None:
                            return
                        outcome = f"{item.code.name}: {item.details}"
                        await context.abort(item.code, item.details)
                        return
                    yield item
            except asyncio.CancelledError:
                outcome = "client went away"
                raise
            finally:
                await session.close()
                self.sessions.discard(session)
                if not self.sessions:
                    self.all_closed.set()
                log.info(
                    "%s ended after %.1f s, %d responses: %s",
                    session.id,
                    time.monotonic() - started,
                    session.response_count,
                    outcome,
                )
        finally:
            self.admission.release()

    async def _open(
        self, requests: AsyncIterator[pb.ConverseRequest], context: grpc.aio.ServicerContext
    ) -> ChatSession | None:
        settings = self.runtime.settings
        # a slot is held from the first byte: a client that never configures must not keep it
        timeout = min(settings.idle_timeout_seconds or _CONFIG_TIMEOUT_S, _CONFIG_TIMEOUT_S)
        try:
            first = await asyncio.wait_for(anext(aiter(requests)), timeout)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no config within {timeout} s")
        if first.WhichOneof("kind") != "config":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the first ConverseRequest must be `config` (a SessionConfig, may be empty)",
            )
        metadata = dict(context.invocation_metadata() or ())
        trace = str(metadata.get("x-trace", "")).lower() in ("1", "true", "yes")
        backend = self.runtime.backend
        try:
            options = resolve_options(
                first.config,
                settings,
                backend.default_sampling(),
                settings.system_prompt or backend.default_system_prompt(),
                trace,
            )
        except ServiceError as exc:
            await context.abort(exc.code, exc.message)
        session = ChatSession(self.runtime, options)
        await session.start(requests)
        return session

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        try:
            self.admission.acquire()
        except ServiceError as exc:
            await context.abort(exc.code, exc.message)
        try:
            return await self._generate(request)
        except ServiceError as exc:
            await context.abort(exc.code, exc.message)
        finally:
            self.admission.release()
        raise AssertionError("unreachable")  # context.abort raises

    async def _generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        settings, backend, executors = self.runtime.settings, self.runtime.backend, self.runtime.executors
        mode = _MODES.get(request.mode)
        if mode is None:
            raise InvalidArgument(f"mode {request.mode} is not a GenerateMode", "mode")
        if len(request.text) > settings.max_text_chars:
            raise InvalidArgument(f"text is longer than {settings.max_text_chars} characters", "text")
        if not request.text.strip() and not request.audio:
            raise InvalidArgument("set text, audio, or both", "text")
        if mode is GenerateMode.TRANSCRIBE and not request.audio:
            raise InvalidArgument("GENERATE_MODE_TRANSCRIBE needs audio", "audio")
        if mode is GenerateMode.SYNTHESIZE and not request.text.strip():
            raise InvalidArgument("GENERATE_MODE_SYNTHESIZE needs text", "text")
        audio, rate = None, 0
        if request.audio:
            try:
                audio, rate = decode_audio_file(request.audio)
            except ValueError as exc:
                raise InvalidArgument(f"audio: {exc}", "audio") from exc
            if len(audio) > settings.max_generate_audio_seconds * rate:
                raise InvalidArgument(f"audio is longer than {settings.max_generate_audio_seconds} s", "audio")
        base = dataclasses.replace(backend.default_sampling(mode), max_new_tokens=settings.default_max_new_tokens)
        sampling = resolve_sampling(base, request.sampling, settings.max_new_tokens, "sampling")
        conversation = backend.new_conversation(request.system_prompt or backend.default_system_prompt(mode), mode)
        stop = threading.Event()

        def run() -> tuple[list[int], list[np.ndarray], EndReason]:
            if audio is not None:
                conversation.add_user_audio(audio, rate)
            if request.text.strip():
                conversation.add_user_text(request.text)
            tokens, frames = [], []
            end = EndReason.END_OF_TURN
            for step in conversation.generate(sampling, stop):
                if isinstance(step, TextToken):
                    tokens.append(step.token_id)
                elif isinstance(step, AudioFrame):
                    if not is_end_of_audio(step.codes):
                        frames.append(step.codes)
                elif isinstance(step, Finished):
                    end = step.reason
            return tokens, frames, end

        def decode(frames: list[np.ndarray]) -> np.ndarray:
            decoder = backend.new_decoder()
            try:
                return np.concatenate([decoder.decode(frames), decoder.flush()])
            finally:
                decoder.close()

        loop = asyncio.get_running_loop()
        try:
            tokens, frames, end = await loop.run_in_executor(executors.generate, run)
            pcm = await loop.run_in_executor(executors.decode, decode, frames) if frames else np.zeros(0, np.float32)
        except asyncio.CancelledError:
            stop.set()  # the client went away: stop the model at its next step
            raise
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - a model failure fails this call only
            log.exception("Generate failed")
            raise Internal(f"generation failed: {exc}") from exc
        wav = encode_wav(float_to_pcm16(pcm), OUTPUT_SAMPLE_RATE) if frames else b""
        return pb.GenerateResponse(
            text=backend.detokenize(tokens),
            wav=wav,
            content_type="audio/wav",
            sample_rate_hz=OUTPUT_SAMPLE_RATE,
            status=pb.RESPONSE_STATUS_MAX_TOKENS if end is EndReason.MAX_TOKENS else pb.RESPONSE_STATUS_COMPLETED,
            audio_ms=len(frames) * FRAME_MS,
        )

"""One-shot generation: the unary `Generate` call and input transcription.

Both go through the same engine as `Converse` (there is no second generation
path): open a conversation, submit one request, collect its steps, release
the conversation. Audio-file decoding, the model, audio decoding and WAV
encoding all run off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.audio import encode_wav, float_to_pcm16, read_audio_file
from service.backends.base import (
    FRAME_MS,
    OUTPUT_SAMPLE_RATE,
    AudioFrame,
    EndReason,
    GenerateMode,
    Sampling,
    TextToken,
    is_end_of_audio,
)
from service.config import Settings
from service.engine.api import Engine, EngineBusy, GenerationRequest, UserTurn
from service.errors import Internal, InvalidArgument, ResourceExhausted
from service.options import check_system_prompt, resolve_sampling
from voicechat.v1 import voicechat_pb2 as pb

log = logging.getLogger(__name__)

MODES = {
    pb.GENERATE_MODE_UNSPECIFIED: GenerateMode.CHAT,
    pb.GENERATE_MODE_CHAT: GenerateMode.CHAT,
    pb.GENERATE_MODE_TRANSCRIBE: GenerateMode.TRANSCRIBE,
    pb.GENERATE_MODE_SYNTHESIZE: GenerateMode.SYNTHESIZE,
}


@dataclass
class OneShotResult:
    text: str = ""
    frames: list[np.ndarray] = field(default_factory=list)  # audio frames with sound
    end: EndReason | None = None


class _CollectingSink:
    """Collects one request's steps on the engine thread; completes a future on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.result = OneShotResult()
        self._text: list[str] = []
        self.done: asyncio.Future[BaseException | None] = loop.create_future()

    def started(self, ts_ms: float) -> None:
        pass

    def steps(self, items: Sequence[TextToken | AudioFrame], ts_ms: float) -> None:
        for step in items:
            if isinstance(step, TextToken):
                self._text.append(step.text)
            elif not is_end_of_audio(step.codes):
                self.result.frames.append(step.codes)

    def finished(self, reason: EndReason | None, error: BaseException | None) -> None:
        self.result.text, self.result.end = "".join(self._text), reason
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            self._loop.call_soon_threadsafe(self._set, error)

    def _set(self, error: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result(error)


async def generate_once(
    engine: Engine, system_prompt: str, mode: GenerateMode, user: UserTurn, sampling: Sampling, owner: str = ""
) -> OneShotResult:
    """Run one request on a fresh conversation; abort it if the caller is cancelled."""
    conversation = engine.open(system_prompt or engine.backend.default_system_prompt(mode), mode)
    sink = _CollectingSink(asyncio.get_running_loop())
    try:
        handle = engine.submit(GenerationRequest(conversation, user, sampling, owner=owner), sink)
        try:
            error = await asyncio.shield(sink.done)
        except asyncio.CancelledError:
            handle.abort()  # the caller went away: stop the model at its next step
            raise
    finally:
        engine.release(conversation)
    if isinstance(error, EngineBusy):  # refused by the engine's caps or its wait bound
        raise ResourceExhausted(f"the model is busy: {error}; retry later")
    if error is not None:
        log.error("one-shot %s generation failed", mode.value, exc_info=error)
        raise Internal(f"generation failed: {type(error).__name__}")
    return sink.result


def transcript_tokens(seconds: float) -> int:
    """A bound on the tokens of a transcript: speech runs at 2-4 tokens a second,
    so this never cuts a real one and stops a model that does not end."""
    return 32 + int(8 * seconds)


async def transcribe(engine: Engine, audio: np.ndarray, rate: int = 16_000, owner: str = "") -> str:
    """The text of a user turn (mono float32 at `rate`), by the model in ASR mode;
    `owner` (a session) is what the engine's per-session caps count against."""
    mode = GenerateMode.TRANSCRIBE
    sampling = dataclasses.replace(
        engine.backend.default_sampling(mode), max_new_tokens=transcript_tokens(len(audio) / rate)
    )
    result = await generate_once(engine, "", mode, UserTurn(audio, audio_rate=rate), sampling, owner)
    return result.text.strip()


def _validate(request: pb.GenerateRequest, settings: Settings) -> GenerateMode:
    mode = MODES.get(request.mode)
    if mode is None:
        raise InvalidArgument(f"mode {request.mode} is not a GenerateMode", "mode")
    if len(request.text) > settings.max_text_chars:
        raise InvalidArgument(f"text is longer than {settings.max_text_chars} characters ({len(request.text)})", "text")
    check_system_prompt(request.system_prompt, settings, "system_prompt")
    if not request.text.strip() and not request.audio:
        raise InvalidArgument("set text, audio, or both", "text")
    if mode is GenerateMode.TRANSCRIBE and not request.audio:
        raise InvalidArgument("GENERATE_MODE_TRANSCRIBE needs audio", "audio")
    if mode is GenerateMode.SYNTHESIZE and not request.text.strip():
        raise InvalidArgument("GENERATE_MODE_SYNTHESIZE needs text", "text")
    return mode


async def generate(
    engine: Engine, settings: Settings, decode_pool: Executor, request: pb.GenerateRequest
) -> pb.GenerateResponse:
    """Serve one `Generate` call."""
    mode = _validate(request, settings)
    base = dataclasses.replace(engine.backend.default_sampling(mode), max_new_tokens=settings.default_max_new_tokens)
    sampling = resolve_sampling(base, request.sampling, settings.max_new_tokens, "sampling")
    audio = None
    if request.audio:
        try:
            audio, _ = await asyncio.to_thread(read_audio_file, request.audio, settings.max_generate_audio_seconds)
        except ValueError as exc:
            raise InvalidArgument(f"audio: {exc}", "audio") from exc
    user = UserTurn(audio, text=request.text if request.text.strip() else "")
    result = await generate_once(engine, request.system_prompt, mode, user, sampling)
    wav = b""
    if result.frames:
        loop = asyncio.get_running_loop()
        pcm = await loop.run_in_executor(decode_pool, _decode_all, engine, result.frames)
        wav = await asyncio.to_thread(lambda: encode_wav(float_to_pcm16(pcm), OUTPUT_SAMPLE_RATE))
    return pb.GenerateResponse(
        text=result.text,
        wav=wav,
        content_type="audio/wav",
        sample_rate_hz=OUTPUT_SAMPLE_RATE,
        status=pb.RESPONSE_STATUS_MAX_TOKENS if result.end is EndReason.MAX_TOKENS else pb.RESPONSE_STATUS_COMPLETED,
        audio_ms=len(result.frames) * FRAME_MS,
    )


def _decode_all(engine: Engine, frames: list[np.ndarray]) -> np.ndarray:
    decoder = engine.backend.new_decoder()
    try:
        return np.concatenate([decoder.decode(frames), decoder.flush()])
    finally:
        decoder.close()

"""One response: the generation loop, the text consumer and the audio consumer.

The backend's synchronous generator runs in a worker thread and hands every
step to the event loop with `call_soon_threadsafe`. On the loop, two consumers
turn steps into events and put them in the session's `Outbox`, which the one
writer drains in order:

- the text consumer emits a TextDelta as soon as tokens decode to whole
  characters (a trailing partial UTF-8 sequence is held back);
- the audio consumer decodes frames in a second worker thread with a streaming
  decoder: first as soon as `first_frames` exist (the fast path), then in
  strides that double up to `max_stride` as the backlog allows, and re-frames
  the PCM into fixed-size chunks.

Frames and tokens of one response are bounded by its max_new_tokens, so the
step buffers need no further bound; what the client has not read is bounded by
the Outbox.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.audio import PcmReframer, float_to_pcm16
from service.backends.base import (
    FRAME_MS,
    OUTPUT_SAMPLE_RATE,
    AssistantTurn,
    AudioFrame,
    Backend,
    Conversation,
    EndReason,
    Finished,
    Sampling,
    TextToken,
    is_end_of_audio,
)
from service.outbox import Outbox, SlowReader, WriteStats, now_ms
from voicechat.v1 import voicechat_pb2 as pb

log = logging.getLogger(__name__)
SAMPLES_PER_MS = OUTPUT_SAMPLE_RATE // 1000


@dataclass(frozen=True)
class OutputPolicy:
    """When to decode and how to frame the audio of a response.

    `chunk_samples=None` and `adaptive=False` reproduce the predecessor's
    policy (fixed stride, no fast path, one chunk per decode batch); the
    benchmark compares the two.
    """

    chunk_samples: int | None
    first_frames: int
    max_stride: int
    adaptive: bool = True

    def stride(self, batches_done: int) -> int:
        """Frames to wait for before the next decode."""
        if not self.adaptive:
            return self.max_stride
        return min(self.max_stride, self.first_frames << batches_done)


@dataclass
class UserInput:
    """A committed user turn."""

    turn_id: str
    audio: np.ndarray | None = None  # float32 mono at `audio_rate`
    audio_rate: int = 16_000
    text: str = ""
    commit_ts: float = 0.0
    speech_end_ts: float = 0.0


@dataclass
class ResponseResult:
    status: int  # pb.ResponseStatus
    reason: str
    turn: AssistantTurn
    text: str
    audio_ms: int
    text_tokens: int
    audio_frames: int


@dataclass
class Executors:
    """Worker threads shared by every session of a server."""

    generate: Executor
    decode: Executor


@dataclass
class _Timing:
    start: float = 0.0
    first_step: float = 0.0
    last_step: float = 0.0
    tokens_before_audio: int = -1
    decode_batches: int = 0
    decode_ms: list[float] = field(default_factory=list)


class ResponseRun:
    """Generates and streams one response; `stop()` ends it early."""

    def __init__(
        self,
        *,
        response_id: str,
        backend: Backend,
        conversation: Conversation,
        sampling: Sampling,
        policy: OutputPolicy,
        outbox: Outbox,
        executors: Executors,
        trace: bool,
    ) -> None:
        self.response_id = response_id
        self._backend = backend
        self._conversation = conversation
        self._sampling = sampling
        self._policy = policy
        self._outbox = outbox
        self._executors = executors
        self._trace = trace
        self._stop = threading.Event()
        self._stopped_status: int | None = None
        self._stop_reason = ""
        self._changed = asyncio.Event()
        self._text_ids: list[int] = []
        self._frames: list[np.ndarray] = []
        self._frame_ts: list[float] = []
        self._steps: list[TextToken | AudioFrame] = []
        self._end: EndReason | None = None
        self._error: BaseException | None = None
        self._done = False
        self.stats = WriteStats()
        self.timing = _Timing()
        self._text_parts: list[str] = []
        self._audio_samples_sent = 0
        self._last_text_ts = 0.0
        self._audio_runs_ended = 0
        self._in_audio_run = False

    # -- control ------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stopped_status is not None

    def stop(self, status: int, reason: str = "") -> None:
        """End the response early (cancel, barge-in, slow reader, shutdown).

        Generation stops at the next model step; queued text and audio that
        the client has not received yet are dropped."""
        if self._stopped_status is None:
            self._stopped_status, self._stop_reason = status, reason
        self._stop.set()
        self._outbox.purge(self.response_id)
        self._changed.set()

    # -- the worker-thread side ----------------------------------------------
    def _generate_in_thread(self, loop: asyncio.AbstractEventLoop, user: UserInput) -> None:
        end: EndReason | None = None
        error: BaseException | None = None
        try:
            if user.audio is not None and len(user.audio):
                self._conversation.add_user_audio(user.audio, user.audio_rate)
            if user.text:
                self._conversation.add_user_text(user.text)
            for step in self._conversation.generate(self._sampling, self._stop):
                if isinstance(step, Finished):
                    end = step.reason
                    break
                loop.call_soon_threadsafe(self._on_step, step, now_ms())
        except BaseException as exc:  # noqa: BLE001 - the loop side reports it as a failed response
            error = exc
        finally:
            loop.call_soon_threadsafe(self._on_finished, end, error)

    # -- the event-loop side -------------------------------------------------
    def _on_step(self, step: TextToken | AudioFrame, ts: float) -> None:
        timing = self.timing
        timing.first_step = timing.first_step or ts
        timing.last_step = ts
        self._steps.append(step)
        if isinstance(step, TextToken):
            self._text_ids.append(step.token_id)
            self._last_text_ts = ts
            if self._in_audio_run:
                # the model switched to text: no audio frame comes for a few
                # steps, so frames waiting for a stride to fill are decoded now
                self._audio_runs_ended += 1
                self._in_audio_run = False
        elif is_end_of_audio(step.codes):
            pass  # end of audio: the consumer finishes with whatever is pending
        else:
            if timing.tokens_before_audio < 0:
                timing.tokens_before_audio = len(self._steps) - 1
            self._frames.append(step.codes)
            self._frame_ts.append(ts)
            self._in_audio_run = True
        self._changed.set()

    def _on_finished(self, end: EndReason | None, error: BaseException | None) -> None:
        self._end, self._error, self._done = end, error, True
        self._changed.set()

    async def run(self, user: UserInput) -> ResponseResult:
        loop = asyncio.get_running_loop()
        self.timing.start = now_ms()
        gen = loop.run_in_executor(self._executors.generate, self._generate_in_thread, loop, user)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._consume_text())
                group.create_task(self._consume_audio())
        except* SlowReader as slow:
            self.stop(pb.RESPONSE_STATUS_FAILED, str(slow.exceptions[0]))
        except* Exception as failure:  # noqa: BLE001 - a decode failure fails this response only
            log.exception("response %s: output failed", self.response_id, exc_info=failure.exceptions[0])
            self.stop(pb.RESPONSE_STATUS_FAILED, f"audio decode failed: {failure.exceptions[0]}")
        finally:
            # the worker thread ends within one model step once stopped
            if not self._done:
                self._stop.set()
            await asyncio.shield(gen)
        return self._result()

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            self._changed.clear()
            await self._changed.wait()

    async def _consume_text(self) -> None:
        held: list[int] = []
        consumed = 0
        while True:

            def ready(c: int = consumed) -> bool:
                return len(self._text_ids) > c or self._done or self.stopping

            await self._wait(ready)
            if self.stopping:
                return
            new = self._text_ids[consumed:]
            consumed += len(new)
            held += new
            text = self._backend.detokenize(held) if held else ""
            finished = self._done and consumed == len(self._text_ids)
            # a trailing U+FFFD is an incomplete UTF-8 sequence: wait for its next byte
            if text and (finished or not text.endswith("\ufffd")):
                self._put_text(text)
                held = []
            if finished:
                return
            # yield so other producers interleave fairly with a fast generator
            await asyncio.sleep(0)

    def _put_text(self, text: str) -> None:
        self._text_parts.append(text)
        delta = pb.TextDelta(response_id=self.response_id, text=text)
        if self._trace:
            delta.source_ts_ms = self._last_text_ts
            delta.ready_ts_ms = now_ms()
        self._outbox.put(pb.ConverseResponse(text_delta=delta), self.stats, self.response_id)

    async def _consume_audio(self) -> None:
        loop = asyncio.get_running_loop()
        policy = self._policy
        decoder = self._backend.new_decoder()
        reframer = PcmReframer(policy.chunk_samples) if policy.chunk_samples else None
        taken = 0
        runs_seen = 0
        try:
            while True:
                need = policy.stride(self.timing.decode_batches)

                def ready(t: int = taken, n: int = need, r: int = runs_seen) -> bool:
                    pending = len(self._frames) - t
                    run_ended = policy.adaptive and pending and self._audio_runs_ended > r
                    return pending >= n or bool(run_ended) or self._done or self.stopping

                await self._wait(ready)
                runs_seen = self._audio_runs_ended
                if self.stopping:
                    return
                pending = len(self._frames) - taken
                if pending == 0:
                    if self._done:
                        break
                    continue
                count = min(pending, policy.max_stride) if policy.adaptive else min(pending, need)
                batch = self._frames[taken : taken + count]
                source_ts = self._frame_ts[taken + count - 1]
                taken += count
                started = time.perf_counter()
                pcm = await loop.run_in_executor(self._executors.decode, decoder.decode, batch)
                decode_ms = (time.perf_counter() - started) * 1000
                self.timing.decode_batches += 1
                self.timing.decode_ms.append(decode_ms)
                if self.stopping:
                    return
                self._put_audio(pcm, reframer, source_ts, final=False)
                if self._trace:
                    self._outbox.put(
                        pb.ConverseResponse(
                            metrics=pb.Metrics(
                                response_id=self.response_id,
                                decode_batch=pb.DecodeBatchMetrics(
                                    frames=count, decode_ms=decode_ms, backlog_frames=pending
                                ),
                            )
                        )
                    )
            tail = await loop.run_in_executor(self._executors.decode, decoder.flush)
            last_ts = self._frame_ts[-1] if self._frame_ts else 0.0
            self._put_audio(tail, reframer, last_ts, final=True)
        finally:
            decoder.close()

    def _put_audio(self, pcm: np.ndarray, reframer: PcmReframer | None, source_ts: float, final: bool) -> None:
        ready_ts = now_ms()
        data = float_to_pcm16(pcm)
        if reframer is None:
            chunks = [data] if data else []
        else:
            chunks = reframer.push(data)
            if final:
                rest = reframer.flush()
                chunks += [rest] if rest else []
        for chunk in chunks:
            samples = len(chunk) // 2
            audio = pb.AudioChunk(
                response_id=self.response_id,
                pcm16=chunk,
                sample_rate_hz=OUTPUT_SAMPLE_RATE,
                duration_ms=round(samples / SAMPLES_PER_MS),
                offset_ms=round(self._audio_samples_sent / SAMPLES_PER_MS),
            )
            if self._trace:
                audio.source_ts_ms = source_ts
                audio.ready_ts_ms = ready_ts
            self._audio_samples_sent += samples
            self._outbox.put(pb.ConverseResponse(audio_chunk=audio), self.stats, self.response_id)

    def _result(self) -> ResponseResult:
        turn = AssistantTurn(list(self._steps))
        if self._stopped_status is not None:
            status, reason = self._stopped_status, self._stop_reason
            if status != pb.RESPONSE_STATUS_FAILED:
                # keep in the history what the listener can have heard: audio that
                # was sent, and at real-time playback no more than has elapsed since
                # the first chunk; a TruncateResponse from the client refines it
                s = self.stats
                played = min(s.audio_ms_written, now_ms() - s.first_audio_ts) if s.first_audio_ts else 0
                turn = turn.truncated(-(-int(played) // FRAME_MS))
        elif self._error is not None:
            status, reason = pb.RESPONSE_STATUS_FAILED, f"model error: {self._error}"
        elif self._end is EndReason.MAX_TOKENS:
            status, reason = pb.RESPONSE_STATUS_MAX_TOKENS, f"reached max_new_tokens={self._sampling.max_new_tokens}"
        else:
            status, reason = pb.RESPONSE_STATUS_COMPLETED, ""
        return ResponseResult(
            status=status,
            reason=reason,
            turn=turn,
            text="".join(self._text_parts),
            audio_ms=round(self._audio_samples_sent / SAMPLES_PER_MS),
            text_tokens=len(self._text_ids),
            audio_frames=len(self._frames),
        )

    def metrics(self, user: UserInput) -> pb.ResponseMetrics:
        """The response summary; call when the writer has sent the response."""
        t, s = self.timing, self.stats
        commit = user.commit_ts or t.start
        latencies = sorted(s.latencies_ms)
        step_latencies = sorted(s.step_latencies_ms)
        audio_s = sum(isinstance(x, AudioFrame) and not is_end_of_audio(x.codes) for x in self._steps) * FRAME_MS / 1000
        generation_ms = max(t.last_step - t.start, 1e-3)
        return pb.ResponseMetrics(
            speech_end_to_commit_ms=(commit - user.speech_end_ts) if user.speech_end_ts else 0.0,
            prefill_ms=(t.first_step - commit) if t.first_step else 0.0,
            commit_to_first_text_ms=(s.first_text_ts - commit) if s.first_text_ts else 0.0,
            commit_to_first_audio_ms=(s.first_audio_ts - commit) if s.first_audio_ts else 0.0,
            tokens_before_first_audio=max(t.tokens_before_audio, 0),
            generation_ms=generation_ms,
            generation_rtf=audio_s / (generation_ms / 1000),
            decode_batches=t.decode_batches,
            decode_ms_total=sum(t.decode_ms),
            decode_ms_max=max(t.decode_ms, default=0.0),
            server_latency_p50_ms=latencies[len(latencies) // 2] if latencies else 0.0,
            server_latency_max_ms=latencies[-1] if latencies else 0.0,
            queue_high_water=self._outbox.high_water,
            text_coalesced=s.text_coalesced,
            audio_merged=s.audio_merged,
            first_chunk_frames=self._policy.first_frames,
            max_stride_frames=self._policy.max_stride,
            step_to_write_p50_ms=step_latencies[len(step_latencies) // 2] if step_latencies else 0.0,
            step_to_write_max_ms=step_latencies[-1] if step_latencies else 0.0,
        )

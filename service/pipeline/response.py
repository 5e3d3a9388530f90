"""One response: a generation request to the engine, and its output consumers.

The engine (`service.backends.engine`) generates on its own thread and hands
every step to the event loop through a `StepSink` that uses
`call_soon_threadsafe`. On the loop the steps become events in the session's
`Outbox`, which the one writer drains in order:

- text arrives detokenized from the engine (a partial UTF-8 character is held
  back there) and goes out as a TextDelta at once;
- the audio consumer decodes frames in a worker thread with a streaming
  decoder: first as soon as `first_frames` exist (the fast path), then in
  strides that double up to `max_stride` as the backlog allows, and re-frames
  the PCM into fixed-size chunks.

A speculative response (started before its turn is committed) writes into a
`HeldOutput` instead: nothing reaches the client until `promote()`, and the
engine pauses it at its first audio frame.

A response speaks in the domain events of `service.events` through an
`EventSink` (the session maps them to the contract); it knows no protobuf.

Frames and tokens of one response are bounded by its max_new_tokens, so the
step buffers need no further bound; what the client has not read is bounded by
the Outbox.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.audio import PcmReframer, float_to_pcm16
from service.backends.base import (
    FRAME_MS,
    OUTPUT_SAMPLE_RATE,
    AssistantTurn,
    AudioDecoder,
    AudioFrame,
    Backend,
    EndReason,
    Sampling,
    TextToken,
    is_end_of_audio,
)
from service.clock import now_ms
from service.engine.api import ConversationRef, Engine, EngineBusy, GenerationRequest, RequestHandle, UserTurn
from service.events import (
    AudioChunk,
    DecodeBatch,
    Event,
    EventSink,
    Later,
    ResponseMetrics,
    ResponseStatus,
    TextDelta,
)
from service.outbox import SlowReader, WriteStats

log = logging.getLogger(__name__)
SAMPLES_PER_MS = OUTPUT_SAMPLE_RATE // 1000
_MAX_HELD_EVENTS = 256  # a held response pauses at its first audio: far fewer events than this


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
    audio: np.ndarray | None = None  # float32 mono at 16 kHz
    text: str = ""
    commit_ts: float = 0.0
    speech_end_ts: float = 0.0
    end_of_turn_probability: float = 0.0


@dataclass
class ResponseResult:
    status: ResponseStatus
    reason: str
    turn: AssistantTurn  # what the listener received
    heard_frames: int | None  # audio frames of `turn` they are estimated to have heard (None: all)
    text: str
    audio_ms: int
    text_tokens: int
    audio_frames: int


@dataclass
class _Timing:
    start: float = 0.0
    admitted: float = 0.0
    first_step: float = 0.0
    last_step: float = 0.0
    tokens_before_audio: int = -1
    decode_batches: int = 0
    decode_ms: list[float] = field(default_factory=list)


class HeldOutput:
    """The event sink of a speculative response: events wait here until `release`.

    Bounded: a held response is paused at its first audio, so it holds a few
    text deltas and one or two chunks; past `_MAX_HELD_EVENTS` the response is
    failed as a slow reader would be (it cannot happen with a sane backend)."""

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._held: list[tuple[Event | Later, WriteStats | None]] = []
        self.released = False

    @property
    def high_water(self) -> int:
        return self._sink.high_water

    def put(self, event: Event | Later, stats: WriteStats | None = None) -> None:
        if self.released:
            self._sink.put(event, stats)
            return
        if len(self._held) >= _MAX_HELD_EVENTS:
            raise SlowReader(f"a speculative response held more than {_MAX_HELD_EVENTS} events")
        self._held.append((event, stats))

    def purge(self, response_id: str) -> int:
        if self.released:
            return self._sink.purge(response_id)
        dropped = len(self._held)
        self._held = []
        return dropped

    def release(self) -> None:
        """Send everything held, in order; later events go straight out."""
        held, self._held = self._held, []
        self.released = True
        now = now_ms()
        for event, stats in held:
            if isinstance(event, TextDelta | AudioChunk) and event.ready_ts_ms:
                event = dataclasses.replace(event, ready_ts_ms=now)  # server latency counts from the release
            self._sink.put(event, stats)


class _LoopSink:
    """The engine's StepSink for one response: hands everything to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, run: ResponseRun) -> None:
        self._loop, self._run = loop, run

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self._loop.call_soon_threadsafe(fn, *args)

    def started(self, ts_ms: float) -> None:
        self._call(self._run._on_started, ts_ms)

    def steps(self, items: Sequence[TextToken | AudioFrame], ts_ms: float) -> None:
        self._call(self._run._on_steps, items, ts_ms)

    def finished(self, reason: EndReason | None, error: BaseException | None) -> None:
        self._call(self._run._on_finished, reason, error)


class ResponseRun:
    """Generates and streams one response; `stop()` ends it early."""

    def __init__(
        self,
        *,
        response_id: str,
        engine: Engine,
        conversation: ConversationRef,
        sampling: Sampling,
        policy: OutputPolicy,
        events: EventSink,
        decode_pool: Executor,
        trace: bool,
        speculative: bool = False,
        owner: str = "",
    ) -> None:
        self.response_id = response_id
        self._owner = owner  # the session: the engine shares the model round robin across owners
        self._engine = engine
        self._backend: Backend = engine.backend
        self._conversation = conversation
        self._sampling = sampling
        self._policy = policy
        self._held = HeldOutput(events) if speculative else None
        self._events: EventSink = self._held or events
        self._decode_pool = decode_pool
        self._trace = trace
        self.speculative = speculative
        self._handle: RequestHandle | None = None
        self._stopped_status: ResponseStatus | None = None
        self._stopped_at = 0.0
        self._stop_reason = ""
        self._changed = asyncio.Event()
        self._finished = asyncio.Event()
        self._frames: list[np.ndarray] = []
        self._frame_ts: list[float] = []
        self._steps: list[TextToken | AudioFrame] = []
        self._end: EndReason | None = None
        self._error: BaseException | None = None
        self._done = False
        self.stats = WriteStats()
        self.timing = _Timing()
        self._text_parts: list[str] = []
        self._text_tokens = 0
        self._audio_samples_sent = 0
        self._audio_runs_ended = 0
        self._in_audio_run = False

    # -- control ------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stopped_status is not None

    @property
    def held(self) -> bool:
        """A speculative response not promoted yet: nothing of it was sent."""
        return self._held is not None and not self._held.released

    def stop(self, status: ResponseStatus, reason: str = "") -> None:
        """End the response early (cancel, barge-in, slow reader, shutdown).

        Generation stops at the next model step; queued text and audio that
        the client has not received yet are dropped."""
        if self._stopped_status is None:
            self._stopped_status, self._stop_reason = status, reason
            self._stopped_at = now_ms()
        if self._handle is not None:
            self._handle.abort()
        self._events.purge(self.response_id)
        self._changed.set()

    def promote(self) -> None:
        """The turn this speculative response answers was committed: send what
        it holds and let it go on generating."""
        assert self._held is not None
        self._held.release()
        if self._handle is not None:
            self._handle.promote()  # a committed turn now: its class in the engine, and it goes on

    # -- the engine's side (called on the loop through _LoopSink) ------------
    def _on_started(self, ts: float) -> None:
        self.timing.admitted = ts

    def _on_steps(self, items: Sequence[TextToken | AudioFrame], ts: float) -> None:
        timing = self.timing
        timing.first_step = timing.first_step or ts
        timing.last_step = ts
        for step in items:
            self._steps.append(step)
            if isinstance(step, TextToken):
                self._text_tokens += 1
                if step.text and not self.stopping:
                    self._put_text(step.text, ts)
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
        if self.held and end is EndReason.STOPPED and not self.stopping:
            # the engine took back a speculation's place for a committed turn: it cannot be promoted
            self.stop(ResponseStatus.CANCELLED, "speculation preempted by a committed turn")
        self._end, self._error, self._done = end, error, True
        self._finished.set()
        self._changed.set()

    # -- the loop side --------------------------------------------------------
    async def run(self, user: UserInput) -> ResponseResult:
        loop = asyncio.get_running_loop()
        self.timing.start = now_ms()
        request = GenerationRequest(
            self._conversation,
            UserTurn(user.audio, text=user.text),
            self._sampling,
            speculative=self.speculative,
            owner=self._owner,
        )
        self._handle = self._engine.submit(request, _LoopSink(loop, self))
        if self.stopping:
            self._handle.abort()
        try:
            await self._consume_audio()
        except SlowReader as slow:
            self.stop(ResponseStatus.FAILED, str(slow))
        except Exception as failure:  # noqa: BLE001 - a decode failure fails this response only
            log.exception("response %s: output failed", self.response_id)
            self.stop(ResponseStatus.FAILED, f"audio decode failed: {type(failure).__name__}")
        finally:
            if not self._done:
                self._handle.abort()
            # the engine ends an aborted request within one model step
            await self._finished.wait()
        return self._result()

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            self._changed.clear()
            await self._changed.wait()

    def _put_text(self, text: str, source_ts: float) -> None:
        self._text_parts.append(text)
        if self._trace:
            self._events.put(TextDelta(self.response_id, text, source_ts, ready_ts_ms=now_ms()), self.stats)
        else:
            self._events.put(TextDelta(self.response_id, text), self.stats)

    async def _consume_audio(self) -> None:
        loop = asyncio.get_running_loop()
        policy = self._policy
        decoder: AudioDecoder = await loop.run_in_executor(self._decode_pool, self._backend.new_decoder)
        reframer = PcmReframer(policy.chunk_samples) if policy.chunk_samples else None
        taken = 0
        runs_seen = 0
        in_flight: concurrent.futures.Future[np.ndarray] | None = None
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
                in_flight = self._decode_pool.submit(decoder.decode, batch)
                pcm = await asyncio.wrap_future(in_flight)
                decode_ms = (time.perf_counter() - started) * 1000
                self.timing.decode_batches += 1
                self.timing.decode_ms.append(decode_ms)
                if self.stopping:
                    return
                self._put_audio(pcm, reframer, source_ts, final=False)
                if self._trace:
                    self._events.put(DecodeBatch(self.response_id, count, decode_ms, backlog_frames=pending))
            in_flight = self._decode_pool.submit(decoder.flush)
            tail = await asyncio.wrap_future(in_flight)
            last_ts = self._frame_ts[-1] if self._frame_ts else 0.0
            self._put_audio(tail, reframer, last_ts, final=True)
        finally:
            self._close_decoder(decoder, in_flight)

    def _close_decoder(self, decoder: AudioDecoder, in_flight: concurrent.futures.Future[np.ndarray] | None) -> None:
        """Close the decoder in the decode pool once its last decode is over
        (a pooled decoder must not be handed out while a thread still uses it)."""

        def close(_: object = None) -> None:
            try:
                self._decode_pool.submit(decoder.close)
            except RuntimeError:  # the pool is shut down: the server is stopping
                decoder.close()

        if in_flight is None or in_flight.done():
            close()
        else:
            in_flight.add_done_callback(close)

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
            audio = AudioChunk(
                response_id=self.response_id,
                pcm16=chunk,
                sample_rate_hz=OUTPUT_SAMPLE_RATE,
                duration_ms=round(samples / SAMPLES_PER_MS),
                offset_ms=round(self._audio_samples_sent / SAMPLES_PER_MS),
                source_ts_ms=source_ts if self._trace else 0.0,
                ready_ts_ms=ready_ts if self._trace else 0.0,
            )
            self._audio_samples_sent += samples
            self._events.put(audio, self.stats)

    def _result(self) -> ResponseResult:
        turn = AssistantTurn(list(self._steps))
        heard: int | None = None
        if self._stopped_status is not None:
            status, reason = self._stopped_status, self._stop_reason
            if status is not ResponseStatus.FAILED:
                # the history keeps what the listener can have heard: of the audio
                # that was sent, no more than real-time playback from the first chunk
                # to the stop; a TruncateResponse from the client refines it
                s = self.stats
                turn = turn.truncated(-(-s.audio_ms_written // FRAME_MS))
                played = min(s.audio_ms_written, self._stopped_at - s.first_audio_ts) if s.first_audio_ts else 0
                heard = -(-int(played) // FRAME_MS)
        elif isinstance(self._error, EngineBusy):  # refused by the engine's caps or its wait bound: retry later
            status, reason = ResponseStatus.FAILED, f"the model is busy: {self._error}; retry later"
        elif self._error is not None:
            status, reason = ResponseStatus.FAILED, f"model error: {type(self._error).__name__}: {self._error}"
        elif self._end is EndReason.MAX_TOKENS:
            status, reason = ResponseStatus.MAX_TOKENS, f"reached max_new_tokens={self._sampling.max_new_tokens}"
        else:
            status, reason = ResponseStatus.COMPLETED, ""
        return ResponseResult(
            status=status,
            reason=reason,
            turn=turn,
            heard_frames=heard,
            text="".join(self._text_parts),
            audio_ms=round(self._audio_samples_sent / SAMPLES_PER_MS),
            text_tokens=self._text_tokens,
            audio_frames=len(self._frames),
        )

    def metrics(self, user: UserInput) -> ResponseMetrics:
        """The response summary; call when the writer has sent the response."""
        t, s = self.timing, self.stats
        commit = user.commit_ts or t.start
        latencies = sorted(s.latencies_ms)
        step_latencies = sorted(s.step_latencies_ms)
        audio_s = sum(isinstance(x, AudioFrame) and not is_end_of_audio(x.codes) for x in self._steps) * FRAME_MS / 1000
        generation_ms = max(t.last_step - t.start, 1e-3)
        return ResponseMetrics(
            speech_end_to_commit_ms=(commit - user.speech_end_ts) if user.speech_end_ts else 0.0,
            prefill_ms=max(0.0, t.first_step - commit) if t.first_step else 0.0,
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
            queue_high_water=self._events.high_water,
            text_coalesced=s.text_coalesced,
            audio_merged=s.audio_merged,
            first_chunk_frames=self._policy.first_frames,
            max_stride_frames=self._policy.max_stride,
            step_to_write_p50_ms=step_latencies[len(step_latencies) // 2] if step_latencies else 0.0,
            step_to_write_max_ms=step_latencies[-1] if step_latencies else 0.0,
            speculative=self.speculative,
            end_of_turn_probability=user.end_of_turn_probability,
            engine_wait_ms=max(0.0, t.admitted - t.start) if t.admitted else 0.0,
        )

"""ResponseRun: one response, from the engine's request to its result."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.backends.base import FRAME_MS, AssistantTurn, AudioFrame, EndReason, Sampling, TextToken, is_end_of_audio
from service.clock import now_ms
from service.engine.api import ConversationRef, Engine, EngineBusy, GenerationRequest, RequestHandle, UserTurn
from service.events import EventSink, ResponseMetrics, ResponseStatus, TextDelta
from service.outbox import SlowReader, WriteStats
from service.pipeline.audio_out import SAMPLES_PER_MS, AudioStreamer, OutputPolicy
from service.pipeline.held import HeldOutput
from service.pipeline.steps import Steps, Timing

log = logging.getLogger(__name__)


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
class _Stop:
    """Why a response was ended early, and when."""

    status: ResponseStatus
    reason: str
    at: float


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
        self.speculative = speculative
        self._owner = owner  # the session: the engine shares the model round robin across owners
        self._engine = engine
        self._conversation = conversation
        self._sampling = sampling
        self._policy = policy
        self._trace = trace
        self._held = HeldOutput(events) if speculative else None
        self._events: EventSink = self._held or events
        self._handle: RequestHandle | None = None
        self._stop: _Stop | None = None
        self._end: EndReason | None = None
        self._error: BaseException | None = None
        self._finished = asyncio.Event()
        self._steps = Steps()
        self.stats = WriteStats()
        self.timing = Timing()
        self._audio = AudioStreamer(
            response_id=response_id,
            backend=engine.backend,
            decode_pool=decode_pool,
            policy=policy,
            events=self._events,
            stats=self.stats,
            timing=self.timing,
            trace=trace,
        )

    # -- control ------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stop is not None

    @property
    def held(self) -> bool:
        """A speculative response not promoted yet: nothing of it was sent."""
        return self._held is not None and not self._held.released

    def stop(self, status: ResponseStatus, reason: str = "") -> None:
        """End the response early (cancel, barge-in, slow reader, shutdown).

        Generation stops at the next model step; queued text and audio that
        the client has not received yet are dropped."""
        if self._stop is None:
            self._stop = _Stop(status, reason, now_ms())
        if self._handle is not None:
            self._handle.abort()
        self._events.purge(self.response_id)
        self._steps.changed.set()

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
        timing, steps = self.timing, self._steps
        timing.first_step = timing.first_step or ts
        timing.last_step = ts
        for step in items:
            steps.items.append(step)
            if isinstance(step, TextToken):
                steps.text_tokens += 1
                if step.text and not self.stopping:
                    self._put_text(step.text, ts)
                if steps.in_audio_run:
                    # the model switched to text: no audio frame comes for a few
                    # steps, so frames waiting for a stride to fill are decoded now
                    steps.audio_runs_ended += 1
                    steps.in_audio_run = False
            elif is_end_of_audio(step.codes):
                pass  # end of audio: the consumer finishes with whatever is pending
            else:
                if timing.tokens_before_audio < 0:
                    timing.tokens_before_audio = len(steps.items) - 1
                steps.frames.append(step.codes)
                steps.frame_ts.append(ts)
                steps.in_audio_run = True
        steps.changed.set()

    def _on_finished(self, end: EndReason | None, error: BaseException | None) -> None:
        if self.held and end is EndReason.STOPPED and not self.stopping:
            # the engine took back a speculation's place for a committed turn: it cannot be promoted
            self.stop(ResponseStatus.CANCELLED, "speculation preempted by a committed turn")
        self._end, self._error, self._steps.done = end, error, True
        self._finished.set()
        self._steps.changed.set()

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
            hold_at_frames=self._policy.stride(0),  # a speculation holds once its first chunk can be decoded
        )
        self._handle = self._engine.submit(request, _LoopSink(loop, self))
        if self.stopping:
            self._handle.abort()
        try:
            await self._audio.run(self._steps, lambda: self.stopping)
        except SlowReader as slow:
            self.stop(ResponseStatus.FAILED, str(slow))
        except Exception as failure:  # noqa: BLE001 - a decode failure fails this response only
            log.exception("response %s: output failed", self.response_id)
            self.stop(ResponseStatus.FAILED, f"audio decode failed: {type(failure).__name__}")
        finally:
            if not self._steps.done:
                self._handle.abort()
            # the engine ends an aborted request within one model step
            await self._finished.wait()
        return self._result()

    def _put_text(self, text: str, source_ts: float) -> None:
        self._steps.text_parts.append(text)
        if self._trace:
            self._events.put(TextDelta(self.response_id, text, source_ts, ready_ts_ms=now_ms()), self.stats)
        else:
            self._events.put(TextDelta(self.response_id, text), self.stats)

    def _result(self) -> ResponseResult:
        steps = self._steps
        turn = AssistantTurn(list(steps.items))
        heard: int | None = None
        if self._stop is not None:
            status, reason = self._stop.status, self._stop.reason
            if status is not ResponseStatus.FAILED:
                # the history keeps what the listener can have heard: of the audio
                # that was sent, no more than real-time playback from the first chunk
                # to the stop; a TruncateResponse from the client refines it
                s = self.stats
                turn = turn.truncated(-(-s.audio_ms_written // FRAME_MS))
                played = min(s.audio_ms_written, self._stop.at - s.first_audio_ts) if s.first_audio_ts else 0
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
            text="".join(steps.text_parts),
            audio_ms=round(self._audio.samples_sent / SAMPLES_PER_MS),
            text_tokens=steps.text_tokens,
            audio_frames=len(steps.frames),
        )

    def metrics(self, user: UserInput) -> ResponseMetrics:
        """The response summary; call when the writer has sent the response."""
        t, s = self.timing, self.stats
        commit = user.commit_ts or t.start
        latencies = sorted(s.latencies_ms)
        step_latencies = sorted(s.step_latencies_ms)
        audio_frames = sum(isinstance(x, AudioFrame) and not is_end_of_audio(x.codes) for x in self._steps.items)
        audio_s = audio_frames * FRAME_MS / 1000
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

"""The audio consumer of one response: decode the model's audio frames as
they come, and re-frame the PCM into the chunks the client receives."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.audio import PcmReframer, float_to_pcm16
from service.backends.base import OUTPUT_SAMPLE_RATE, AudioDecoder, Backend
from service.clock import now_ms
from service.events import AudioChunk, DecodeBatch, EventSink
from service.outbox import WriteStats
from service.pipeline.steps import Steps, Timing

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


class AudioStreamer:
    """Decodes a response's frames in the decode pool with a streaming decoder,
    first as soon as `first_frames` exist, then in strides that double up to
    `max_stride` as the backlog allows, and puts the PCM out as AudioChunks."""

    def __init__(
        self,
        *,
        response_id: str,
        backend: Backend,
        decode_pool: Executor,
        policy: OutputPolicy,
        events: EventSink,
        stats: WriteStats,
        timing: Timing,
        trace: bool,
    ) -> None:
        self._response_id = response_id
        self._backend = backend
        self._decode_pool = decode_pool
        self._policy = policy
        self._events = events  # the response's sink (a speculative one's holds its events)
        self._stats = stats
        self._timing = timing
        self._trace = trace
        self.samples_sent = 0

    async def run(self, steps: Steps, stopping: Callable[[], bool]) -> None:
        """Decode and send until the response is done (or `stopping()`)."""
        loop = asyncio.get_running_loop()
        policy, timing = self._policy, self._timing
        decoder: AudioDecoder = await loop.run_in_executor(self._decode_pool, self._backend.new_decoder)
        reframer = PcmReframer(policy.chunk_samples) if policy.chunk_samples else None
        taken = 0
        runs_seen = 0
        in_flight: concurrent.futures.Future[np.ndarray] | None = None
        try:
            while True:
                need = policy.stride(timing.decode_batches)

                def ready(t: int = taken, n: int = need, r: int = runs_seen) -> bool:
                    pending = len(steps.frames) - t
                    run_ended = policy.adaptive and pending and steps.audio_runs_ended > r
                    return pending >= n or bool(run_ended) or steps.done or stopping()

                await steps.wait(ready)
                runs_seen = steps.audio_runs_ended
                if stopping():
                    return
                pending = len(steps.frames) - taken
                if pending == 0:
                    if steps.done:
                        break
                    continue
                count = min(pending, policy.max_stride) if policy.adaptive else min(pending, need)
                batch = steps.frames[taken : taken + count]
                source_ts = steps.frame_ts[taken + count - 1]
                taken += count
                started = time.perf_counter()
                in_flight = self._decode_pool.submit(decoder.decode, batch)
                pcm = await asyncio.wrap_future(in_flight)
                decode_ms = (time.perf_counter() - started) * 1000
                timing.decode_batches += 1
                timing.decode_ms.append(decode_ms)
                if stopping():
                    return
                self._put(pcm, reframer, source_ts, final=False)
                if self._trace:
                    self._events.put(DecodeBatch(self._response_id, count, decode_ms, backlog_frames=pending))
            in_flight = self._decode_pool.submit(decoder.flush)
            tail = await asyncio.wrap_future(in_flight)
            last_ts = steps.frame_ts[-1] if steps.frame_ts else 0.0
            self._put(tail, reframer, last_ts, final=True)
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

    def _put(self, pcm: np.ndarray, reframer: PcmReframer | None, source_ts: float, final: bool) -> None:
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
                response_id=self._response_id,
                pcm16=chunk,
                sample_rate_hz=OUTPUT_SAMPLE_RATE,
                duration_ms=round(samples / SAMPLES_PER_MS),
                offset_ms=round(self.samples_sent / SAMPLES_PER_MS),
                source_ts_ms=source_ts if self._trace else 0.0,
                ready_ts_ms=ready_ts if self._trace else 0.0,
            )
            self.samples_sent += samples
            self._events.put(audio, self._stats)

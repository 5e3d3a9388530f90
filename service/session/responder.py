"""The responder: answers committed turns one after another.

It takes turns (and speculations, see `service.session.speculation`) from a
short queue and runs each with a `ResponseRun`, records each response in the
history, tells the playback ledger, and sends `ResponseEnded` (and, when
tracing, the response's figures). Input transcriptions run beside it and are
waited for before the stream ends after the client's half-close.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

import numpy as np

from service.config import Settings
from service.errors import ServiceError, Unavailable
from service.events import (
    InputTranscription,
    ResponseEnded,
    ResponseStarted,
    ResponseStatus,
    ResponseSummary,
)
from service.oneshot import transcribe
from service.options import SessionOptions
from service.pipeline import SAMPLES_PER_MS, OutputPolicy, ResponseResult, ResponseRun, UserInput
from service.session.ledger import PlaybackLedger
from service.session.speculation import Speculation, Speculator
from service.session.stream import Stream

log = logging.getLogger(__name__)

MAX_QUEUED_TURNS = 4  # committed turns waiting for the running response


def output_policy(options: SessionOptions, settings: Settings) -> OutputPolicy:
    if settings.pipeline == "baseline":
        return OutputPolicy(chunk_samples=None, first_frames=16, max_stride=16, adaptive=False)
    return OutputPolicy(
        chunk_samples=options.chunk_ms * SAMPLES_PER_MS,
        first_frames=options.first_chunk_frames,
        max_stride=options.max_stride_frames,
    )


class Responder:
    """`run` answers the turns `enqueue`d, in order, until `finish` (the end of
    input) or the server's drain; then it ends the stream through `end`."""

    def __init__(
        self,
        stream: Stream,
        speculation: Speculator,
        ledger: PlaybackLedger,
        end: Callable[[ServiceError | None], None],
    ) -> None:
        self._stream = stream
        self._speculation = speculation
        self._ledger = ledger
        self._end = end
        # turns to answer; None after the last (the client half-closed)
        self._turns: asyncio.Queue[UserInput | Speculation | None] = asyncio.Queue(MAX_QUEUED_TURNS + 1)
        self.current: ResponseRun | None = None  # the response being generated and sent
        self.count = 0  # responses started (their ids: resp_1, resp_2, ...)
        self._transcriptions: set[asyncio.Task[None]] = set()  # owned by the TaskGroup; waited for at the end

    # -- the queue ---------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Turns (and speculations) waiting for the response in flight."""
        return self._turns.qsize()

    def enqueue(self, item: UserInput | Speculation) -> None:
        self._turns.put_nowait(item)

    async def finish(self) -> None:
        """No turn follows: answer those queued, then end the stream."""
        await self._turns.put(None)

    def cancel(self, response_id: str) -> None:
        """The client's CancelResponse ("" for whatever is generating)."""
        run = self.current
        if run is not None and response_id in ("", run.response_id):
            run.stop(ResponseStatus.CANCELLED, "cancelled by the client")

    def transcribe(self, turn_id: str, audio: np.ndarray) -> None:
        """Send the transcript of a committed audio turn when it is ready."""
        task = self._stream.spawn(self._transcribe(turn_id, audio), f"transcribe-{turn_id}")
        if task is not None:
            self._transcriptions.add(task)
            task.add_done_callback(self._transcriptions.discard)

    # -- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        stream = self._stream
        while (item := await self._turns.get()) is not None:
            if isinstance(item, Speculation):
                await self._run_speculation(item)
            else:
                await self._respond(item)
            if stream.draining and self._turns.empty():
                self._end(Unavailable("the server is shutting down; reconnect"))
                return
        if self._transcriptions:  # the transcripts of the last turns are part of the answer
            await asyncio.wait(set(self._transcriptions))
        self._end(None)

    def _new_run(self, response_id: str, speculative: bool = False) -> ResponseRun:
        stream = self._stream
        options, rt = stream.options, stream.runtime
        return ResponseRun(
            response_id=response_id,
            engine=stream.engine,
            conversation=stream.conversation,
            sampling=options.sampling,
            policy=output_policy(options, rt.settings),
            events=stream.events,
            decode_pool=rt.decode_pool,
            trace=options.trace,
            speculative=speculative,
            owner=stream.id,
        )

    async def _respond(self, user: UserInput) -> None:
        self.count += 1
        response_id = f"resp_{self.count}"
        self._stream.events.put(ResponseStarted(response_id=response_id, turn_id=user.turn_id))
        self._ledger.response_started(response_id)
        run = self._new_run(response_id)
        self.current = run
        try:
            result = await run.run(user)
        finally:
            self.current = None
        self._finish_response(run, result, user)

    async def _run_speculation(self, spec: Speculation) -> None:
        stream, speculation = self._stream, self._speculation
        if spec.discarded:
            speculation.discards += 1
            speculation.settle(spec)
            return
        if not stream.engine.backend.can_undo:  # the engine runs a speculation on a fork it can drop
            log.info("%s: speculation off (the backend cannot undo a response)", stream.id, extra=stream.log_extra)
            speculation.turn_off(spec)
            if spec.user is not None:
                await self._respond(spec.user)
            return
        run = self._new_run(f"resp_{self.count + 1}", speculative=True)
        spec.run = run
        if spec.discarded:
            run.stop(ResponseStatus.CANCELLED, "speculation discarded")
        elif spec.user is not None:
            self.promote(spec)
        try:
            result = await run.run(UserInput(turn_id="", audio=spec.audio))
            # a short answer can be complete before its turn is: wait for the verdict
            await spec.decided.wait()
        finally:
            if self.current is run:
                self.current = None
        if run.held:
            # never committed: the engine drops its fork (stopped, or at the conversation's next operation)
            speculation.discards += 1
            speculation.settle(spec)
            return
        assert spec.user is not None
        self._finish_response(run, result, spec.user)

    def promote(self, spec: Speculation) -> None:
        """The turn was committed with the speculation's audio: let it be seen."""
        run, user = spec.run, spec.user
        assert run is not None and user is not None
        self.count += 1
        self._stream.events.put(ResponseStarted(response_id=run.response_id, turn_id=user.turn_id))
        self._ledger.response_started(run.response_id)
        self.current = run
        run.promote()

    def _finish_response(self, run: ResponseRun, result: ResponseResult, user: UserInput) -> None:
        stream = self._stream
        response_id = run.response_id
        turn, heard = result.turn, result.heard_frames
        stream.edit(lambda c: c.record_response(turn, heard), "record a response")
        self._ledger.response_ended(response_id, run.stats.first_audio_ts, result.audio_ms)
        if result.status is ResponseStatus.FAILED:
            log.warning("%s %s failed: %s", stream.id, response_id, result.reason,
                        extra={**stream.log_extra, "response_id": response_id})  # fmt: skip
        stream.runtime.metrics.response_ended(result.status)
        stream.events.put(
            ResponseEnded(
                response_id=response_id,
                status=result.status,
                reason=result.reason,
                text=result.text,
                text_tokens=result.text_tokens,
                audio_frames=result.audio_frames,
                audio_ms=result.audio_ms,
                heard_text=(turn if heard is None else turn.truncated(heard)).text,
                summary=lambda: run.metrics(user),
            )
        )
        if stream.options.trace:
            starts, discards = self._speculation.starts, self._speculation.discards

            def summary() -> ResponseSummary:
                figures = dataclasses.replace(
                    run.metrics(user), speculative_starts=starts, speculative_discards=discards
                )
                return ResponseSummary(response_id, figures)

            stream.events.put(summary)

    async def _transcribe(self, turn_id: str, audio: np.ndarray) -> None:
        stream = self._stream
        try:
            text = await transcribe(stream.engine, audio, owner=stream.id)
        except ServiceError as exc:
            stream.error(exc)
            return
        stream.runtime.metrics.input_transcription()
        stream.events.put(InputTranscription(turn_id=turn_id, text=text))

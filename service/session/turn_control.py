"""Turn control: what the user says becomes turns, and turns become responses.

Audio goes through turn detection (the shared turn pool, or at once in manual
mode); its events, text and the client's commits decide when a turn is
committed and handed to the responder. Turn control also starts and discards
speculations (`service.session.speculation`) as the speech pauses and
resumes, and carries out barge-in: the user speaking over a response stops it,
or flushes what the client still plays of a finished one.
"""

from __future__ import annotations

import contextlib

import numpy as np

from service.clock import now_ms
from service.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from service.events import (
    CommitReason,
    PlaybackInterrupted,
    ResponseStatus,
    SpeechStarted,
    SpeechStopped,
    TurnCommitted,
)
from service.options import SessionOptions
from service.pipeline import UserInput
from service.session.ledger import PlaybackLedger
from service.session.responder import MAX_QUEUED_TURNS, Responder
from service.session.speculation import Speculator
from service.session.stream import Stream
from service.turns import InterruptSpeech, SpeechPaused, SpeechResumed, TurnEvent, TurnMode, TurnReady, TurnTracker
from service.turns import SpeechStarted as SpeechBegan
from service.turns import SpeechStopped as SpeechEnded


class TurnControl:
    def __init__(self, stream: Stream, speculation: Speculator, responder: Responder, ledger: PlaybackLedger) -> None:
        self._stream = stream
        self._speculation = speculation
        self._responder = responder
        self._ledger = ledger
        self.tracker = TurnTracker(stream.options.turn, stream.options.input_sample_rate_hz)
        self._turn_feed = stream.runtime.turn_pool.feed(self.tracker, self._on_turn_events)
        self._pending_text: list[str] = []
        self._turn_count = 0
        self._speech_end_ts = 0.0

    async def settle(self) -> None:
        """Wait until the events of the audio received so far are handled
        (requests apply after the audio sent before them)."""
        await self._turn_feed.settle()

    def close(self) -> None:
        self._turn_feed.close()

    # -- input -------------------------------------------------------------------------
    async def on_audio(self, data: bytes) -> None:
        if len(data) % 2:
            raise InvalidArgument(
                f"audio.pcm16 must hold whole 16-bit samples (an even number of bytes), got {len(data)} bytes",
                "audio.pcm16",
            )
        if self._stream.options.turn.mode is TurnMode.MANUAL:
            self._dispatch(self.tracker.push(data))
        else:
            # voice and end-of-turn detection run models in the shared turn pool; their
            # events come back through _on_turn_events
            await self._turn_feed.put(data)

    def on_text(self, text: str, defer_response: bool) -> None:
        limit = self._stream.runtime.settings.max_text_chars
        if len(text) > limit:
            raise InvalidArgument(f"text.text is longer than {limit} characters ({len(text)})", "text.text")
        if not text.strip():
            raise InvalidArgument("text.text is empty", "text.text")
        if sum(map(len, self._pending_text)) + len(text) > limit:
            raise InvalidArgument(
                f"the pending turn's text would exceed {limit} characters; commit it first", "text.text"
            )
        self._speculation.discard()  # the turn now holds text the speculation did not see
        self._pending_text.append(text)
        if not defer_response:
            self._commit(self._client_commit(), CommitReason.TEXT_INPUT)

    def on_commit(self) -> None:
        """The client's CommitTurn."""
        self._commit(self._client_commit(), CommitReason.CLIENT_COMMIT, required=True)

    def on_update(self, options: SessionOptions) -> None:
        """The session's options after an UpdateConfig."""
        stream = self._stream
        before, stream.options = stream.options, options
        spec, turn = self._speculation.current, options.turn
        answers_otherwise = (options.sampling, options.trace) != (before.sampling, before.trace)
        if spec is not None and (answers_otherwise or not turn.speculative or turn.mode is TurnMode.MANUAL):
            # the speculative response was started with the settings before: start
            # it again with these (if they still allow speculation), as a response
            # started at the commit would be
            self._speculation.discard()
            self.speculate(spec.audio, again=True)
        self._dispatch(self.tracker.update(options.turn))

    async def end_of_input(self) -> None:
        """Half-close: answer what is pending, then end the stream cleanly."""
        await self._turn_feed.settle()
        with contextlib.suppress(ServiceError):
            self._commit(self.tracker.commit("end_of_input"), CommitReason.END_OF_INPUT)
        self._speculation.discard()
        await self._responder.finish()

    # -- turn detection ------------------------------------------------------------------
    def _on_turn_events(self, events: list[TurnEvent]) -> None:
        if self._stream.ending:
            return  # the stream is ending: as a request would be, ignored
        try:
            self._dispatch(events)
        except ServiceError as exc:
            self._stream.error(exc)

    def _dispatch(self, events: list[TurnEvent]) -> None:
        put = self._stream.events.put
        for event in events:
            if isinstance(event, SpeechBegan):
                self._speculation.discard()
                put(SpeechStarted(audio_start_ms=int(event.audio_start_ms)))
            elif isinstance(event, InterruptSpeech):
                self._barge_in(int(event.audio_start_ms))
            elif isinstance(event, SpeechPaused):
                self.speculate(event.audio)
            elif isinstance(event, SpeechResumed):
                self._speculation.discard()
            elif isinstance(event, SpeechEnded):
                # the detector confirms the end only after some silence: date the end
                # of speech back by the audio received since (input arrives in real time)
                self._speech_end_ts = self._turn_feed.heard_ts(event.audio_end_ms)
                put(SpeechStopped(audio_end_ms=int(event.audio_end_ms)))
            elif isinstance(event, TurnReady):
                reason = CommitReason.SERVER_VAD
                if event.reason == "max_turn_length":
                    reason = CommitReason.MAX_TURN_LENGTH
                self._commit(event, reason)

    def _barge_in(self, audio_start_ms: int) -> None:
        if not self._stream.options.turn.interrupt_response:
            return
        run = self._responder.current
        if run is not None and not run.stopping:
            run.stop(ResponseStatus.INTERRUPTED, "the user started speaking")
            self._stream.events.put(PlaybackInterrupted(response_id=run.response_id, audio_start_ms=audio_start_ms))
        elif run is None:
            self._ledger.interrupt(audio_start_ms)  # generation is over, but the client may still play it

    # -- commit ---------------------------------------------------------------------------
    def _client_commit(self) -> TurnReady | None:
        """The pending audio turn, closing a speech segment still open."""
        in_speech = self.tracker.in_speech
        ready = self.tracker.commit("client_commit")
        if in_speech and ready is not None:
            self._stream.events.put(SpeechStopped(audio_end_ms=int(ready.audio_end_ms)))
        return ready

    def _commit(self, ready: TurnReady | None, reason: CommitReason, required: bool = False) -> None:
        stream = self._stream
        text = "\n".join(self._pending_text)
        if ready is None and not text:
            if required:
                raise FailedPrecondition("commit_turn with nothing to commit: send audio or text first", "commit_turn")
            return
        if stream.draining:
            raise Unavailable("the server is shutting down: no new turns; reconnect", "commit_turn")
        spec = self._speculation.adopts(ready, text)
        if spec is None:
            self._speculation.discard()
            if self._responder.waiting >= MAX_QUEUED_TURNS:
                raise ResourceExhausted(
                    f"{MAX_QUEUED_TURNS} turns already wait for an answer; cancel the response or wait", "commit_turn"
                )
        self._pending_text = []
        self._turn_count += 1
        turn_id = f"turn_{self._turn_count}"
        user = UserInput(
            turn_id=turn_id,
            audio=ready.audio if ready is not None else None,
            text=text,
            commit_ts=now_ms(),
            speech_end_ts=self._speech_end_ts if reason is CommitReason.SERVER_VAD else 0.0,
            end_of_turn_probability=getattr(ready, "end_of_turn_probability", 0.0),
        )
        self._speech_end_ts = 0.0
        stream.runtime.metrics.turn_committed(reason)
        stream.events.put(
            TurnCommitted(
                turn_id=turn_id,
                audio_duration_ms=int(ready.duration_ms) if ready is not None else 0,
                text_chars=len(text),
                reason=reason,
            )
        )
        if ready is not None and stream.options.input_transcription:
            self._responder.transcribe(turn_id, ready.audio)
        if spec is not None:
            self._speculation.adopt(spec, user)
            if spec.run is not None:
                self._responder.promote(spec)
        else:
            self._responder.enqueue(user)

    # -- speculation ------------------------------------------------------------------------
    def speculate(self, audio: np.ndarray, again: bool = False) -> None:
        """Start answering the turn so far, if nothing else is going on.
        `again`: the speculation on this audio was just discarded and starts
        anew (it may still wait in the queue, where it is skipped)."""
        stream, turn = self._stream, self._stream.options.turn
        if not (turn.speculative and stream.runtime.settings.speculative and self._speculation.enabled):
            return
        if turn.mode is TurnMode.MANUAL:
            return
        busy = self._speculation.current or self._responder.current or self._pending_text
        if busy or not (again or self._responder.waiting == 0):
            return
        if stream.draining or stream.ending or not len(audio):
            return
        if stream.engine.stats.waiting:
            return  # the model is saturated: a speculative row would take a committed turn's place
        self._responder.enqueue(self._speculation.start(audio))

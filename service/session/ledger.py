"""The playback ledger: the latest response as the client plays it, and
cutting the history to what the listener heard.

The client plays a response in real time from its first audio chunk on, so
the ledger estimates what was heard from the clock; a `TruncateResponse` from
the client, or a barge-in while the client still plays a finished response,
cuts the response in the history to that. Cuts are engine edits applied in
order with generation and acknowledged with `ResponseTruncated` (or an error
when the response is no longer the latest). A truncation of the response still
generating waits for its end (the latest one wins), and cuts of one response
not applied yet replace each other: a flood of them is one engine edit and one
acknowledgement at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass

from service.backends.base import FRAME_MS, AssistantTurn, Conversation
from service.clock import now_ms
from service.errors import FailedPrecondition, InvalidArgument
from service.events import PlaybackInterrupted, ResponseTruncated
from service.session.speculation import Speculator
from service.session.stream import Stream


class _Cut:
    """A truncation queued in the engine; later cuts of the same response replace its frame count."""

    def __init__(self, response_id: str, kept_frames: int, required: bool) -> None:
        self.response_id, self.kept_frames, self.required = response_id, kept_frames, required
        self.future: concurrent.futures.Future[AssistantTurn | None] = concurrent.futures.Future()

    def apply(self, conversation: Conversation) -> AssistantTurn | None:  # on the engine thread
        return conversation.truncate_response(self.kept_frames)


@dataclass
class _Playback:
    """The latest response as the client plays it (estimated in real time)."""

    response_id: str = ""
    start: float = 0.0
    end: float = 0.0


class PlaybackLedger:
    def __init__(self, stream: Stream, speculation: Speculator) -> None:
        self._stream = stream
        self._speculation = speculation
        self._generating = ""  # the response being generated and sent, if any
        self._playback = _Playback()
        self._pending: tuple[str, int] | None = None  # a truncation of the response still generating
        self._cut: _Cut | None = None  # the latest truncation sent to the engine

    # -- what the responder reports ------------------------------------------------
    def response_started(self, response_id: str) -> None:
        """The client was told of `response_id` (ResponseStarted) and gets its events."""
        self._generating = response_id

    def response_ended(self, response_id: str, first_audio_ts: float, audio_ms: int) -> None:
        """`response_id` is done generating (its history recorded): it plays until
        `audio_ms` after its first chunk was written."""
        self._generating = ""
        pending, self._pending = self._pending, None
        self._playback.response_id = response_id
        self._playback.start = first_audio_ts or now_ms()
        self._playback.end = self._playback.start + audio_ms
        if pending and pending[0] == response_id:
            self._truncate(response_id, pending[1], required=True)

    # -- what the client and turn control ask ----------------------------------------
    def truncate(self, response_id: str, played_ms: int) -> None:
        """The client's TruncateResponse."""
        if not response_id:
            raise InvalidArgument("truncate.response_id is required", "truncate.response_id")
        if response_id == self._generating:
            self._pending = (response_id, played_ms)
            return
        if response_id != self._playback.response_id:
            raise _stale_truncate(response_id)
        self._truncate(response_id, played_ms, required=True)

    def interrupt(self, audio_start_ms: int) -> None:
        """The user started speaking with nothing generating: if the client is
        still playing the latest response, flush it and keep in the history only
        what was played so far (real-time playback since the first chunk was
        written; a TruncateResponse refines it)."""
        if now_ms() >= self._playback.end:
            return
        played_ms = max(0, int(now_ms() - self._playback.start))
        response_id = self._playback.response_id
        self._stream.events.put(PlaybackInterrupted(response_id=response_id, audio_start_ms=audio_start_ms))
        self._playback.end = 0.0
        self._truncate(response_id, played_ms, required=False)

    # -- the cut ---------------------------------------------------------------------
    def _truncate(self, response_id: str, played_ms: int, required: bool) -> None:
        """Cut the latest response to what was heard, in the engine's order (a
        speculative response waits for it, see `Speculator.edit_history`);
        acknowledge with ResponseTruncated (or an error when it is too late)."""
        self._speculation.edit_history(lambda: self._send_cut(response_id, played_ms, required))

    def _send_cut(self, response_id: str, played_ms: int, required: bool) -> None:
        kept_frames = -(-played_ms // FRAME_MS)  # frames that were at least partly heard
        cut = self._cut
        if cut is not None and cut.response_id == response_id and not cut.future.done():
            # a cut of this response is queued and not applied yet: this one replaces it
            # (one engine edit and one acknowledgement, of what was applied, for a flood)
            cut.kept_frames, cut.required = kept_frames, cut.required or required
            return
        stream = self._stream
        cut = _Cut(response_id, kept_frames, required)
        cut.future = stream.engine.edit(stream.conversation, cut.apply, coalesce=f"truncate:{response_id}")
        self._cut = cut
        stream.spawn(self._acknowledge(cut), "truncate")

    async def _acknowledge(self, cut: _Cut) -> None:
        kept = await asyncio.wrap_future(cut.future)
        response_id, required = cut.response_id, cut.required
        if kept is None:
            if required:
                self._stream.error(_stale_truncate(response_id))
            return
        audio_kept_ms = kept.audio_frames * FRAME_MS
        self._stream.events.put(ResponseTruncated(response_id, audio_kept_ms=audio_kept_ms, heard_text=kept.text))


def _stale_truncate(response_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"truncate.response_id {response_id!r} is not the latest response, or a new turn already started after it",
        "truncate.response_id",
    )

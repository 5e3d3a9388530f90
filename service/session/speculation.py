"""Speculative responses: answering the turn so far before it is committed.

When turn detection sees the speech stop (`SpeechPaused`) and the session is
idle, turn control starts a `Speculation`: the responder generates on the turn
so far, with its events held back (`HeldOutput`). The engine runs it on a fork
of the conversation and pauses it once its first audio chunk can be decoded.
If the turn is committed with that very audio, the response is adopted
(`RequestHandle.promote`): `turn_committed`, `response_started` and the held
events go out at once. If the user speaks again first, the run is aborted, the
engine drops the fork, and nothing of it was ever sent.

A history edit the client asks for meanwhile (a truncation) must apply to the
history without the speculation: `Speculator.edit_history` discards the
speculation, applies the edit after it (the engine drops the fork first), and
starts the speculation again on the edited history.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.events import ResponseStatus
from service.pipeline import ResponseRun, UserInput
from service.turns import TurnReady


@dataclass
class Speculation:
    """A response started on the turn so far, before the turn was committed."""

    audio: np.ndarray
    run: ResponseRun | None = None
    user: UserInput | None = None  # set when the turn is committed
    discarded: bool = False
    decided: asyncio.Event = field(default_factory=asyncio.Event)  # committed or discarded
    # history edits the client asked for meanwhile (a truncation), applied once
    # the speculative response is undone, so that the undo cannot revert them
    after_undo: list[Callable[[], None]] = field(default_factory=list)


class Speculator:
    """The speculation of one session: at most one live, and its history edits.

    `restart(audio)` starts a speculation on `audio` again if the session
    still allows one (turn control's rule)."""

    def __init__(self, restart: Callable[[np.ndarray], None]) -> None:
        self._restart = restart
        self.current: Speculation | None = None  # live: neither committed nor discarded
        # the latest speculation whose effect on the history is not settled yet
        # (neither committed nor undone): history edits wait behind its undo
        self._unsettled: Speculation | None = None
        self.enabled = True  # off for good once the backend turned out unable to undo a response
        self.starts = 0
        self.discards = 0

    def start(self, audio: np.ndarray) -> Speculation:
        self.current = self._unsettled = spec = Speculation(audio)
        self.starts += 1
        return spec

    def discard(self) -> None:
        spec, self.current = self.current, None
        if spec is None:
            return
        spec.discarded = True
        spec.decided.set()
        if spec.run is not None:
            spec.run.stop(ResponseStatus.CANCELLED, "speculation discarded")

    def adopts(self, ready: TurnReady | None, text: str) -> Speculation | None:
        """The live speculation, if a commit of `ready` (and `text`) is the very
        turn it answers, and it can still be sent."""
        spec = self.current
        if spec is None or ready is None or text or len(ready.audio) != len(spec.audio):
            return None
        if spec.run is not None and spec.run.stopping:
            return None
        return spec

    def adopt(self, spec: Speculation, user: UserInput) -> None:
        """The turn `spec` answers is committed as `user`: its history is the conversation's now."""
        self.current = None  # committed: no longer something to discard
        spec.user = user
        spec.decided.set()
        self.settle(spec)

    def settle(self, spec: Speculation) -> None:
        """The speculation was committed, or its undo is queued (or it never
        touched the history): the edits that waited for it go to the engine now."""
        if self._unsettled is spec:
            self._unsettled = None
        edits, spec.after_undo = spec.after_undo, []
        for edit in edits:
            edit()

    def turn_off(self, spec: Speculation) -> None:
        """The backend cannot undo a response: answer committed turns only."""
        self.enabled = False
        if self.current is spec:
            self.current = None
        self.settle(spec)

    def edit_history(self, edit: Callable[[], None]) -> None:
        """Apply `edit` (to the latest response) as if no speculation had
        happened: a live one was generated on the history before the edit, so
        it is discarded and started again on the edited history, and the edit
        waits until the undo of a speculation not settled yet is queued."""
        spec = self.current
        self.discard()
        if self._unsettled is not None:
            self._unsettled.after_undo.append(edit)
        else:
            edit()
        if spec is not None:
            self._restart(spec.audio)

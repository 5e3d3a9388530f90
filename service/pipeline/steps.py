"""What the engine generated for one response so far, as the event loop received it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.backends.base import AudioFrame, TextToken


@dataclass
class Timing:
    """When a response's stages happened (ms on the service clock) and what decoding cost."""

    start: float = 0.0
    admitted: float = 0.0
    first_step: float = 0.0
    last_step: float = 0.0
    tokens_before_audio: int = -1
    decode_batches: int = 0
    decode_ms: list[float] = field(default_factory=list)


@dataclass
class Steps:
    """The steps of one response in order, with its audio frames apart for the
    audio consumer. `changed` is set at every change (steps, the end, a stop)."""

    items: list[TextToken | AudioFrame] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)  # audio codes, end of audio excluded
    frame_ts: list[float] = field(default_factory=list)  # when each frame's step reached the loop
    text_parts: list[str] = field(default_factory=list)  # the text sent
    text_tokens: int = 0
    # runs of audio the model ended by switching to text: frames waiting for a
    # stride to fill are decoded at once then, as no frame comes for a few steps
    audio_runs_ended: int = 0
    in_audio_run: bool = False
    done: bool = False  # the engine finished the request
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            self.changed.clear()
            await self.changed.wait()

"""Small helpers shared by the tests: request builders and event collection."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import numpy as np

from service.backends.base import AudioFrame, EndReason, TextToken
from service.engine.api import RequestHandle
from voicechat.v1 import voicechat_pb2 as pb

Request = pb.ConverseRequest | float  # a float means: wait that many seconds


def config(**fields: object) -> pb.ConverseRequest:
    return pb.ConverseRequest(config=pb.SessionConfig(**fields))  # type: ignore[arg-type]


def manual_config(**fields: object) -> pb.ConverseRequest:
    turn = pb.TurnDetection(mode=pb.TURN_DETECTION_MODE_MANUAL)
    return config(turn_detection=turn, **fields)


def text(value: str, defer: bool = False) -> pb.ConverseRequest:
    return pb.ConverseRequest(text=pb.InputText(text=value, defer_response=defer))


def audio(pcm16: bytes) -> pb.ConverseRequest:
    return pb.ConverseRequest(audio=pb.InputAudio(pcm16=pcm16))


def commit() -> pb.ConverseRequest:
    return pb.ConverseRequest(commit_turn=pb.CommitTurn())


def tone(seconds: float, rate: int = 16_000, freq: float = 220.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes()


async def requests(items: Iterable[Request], hold: float = 30.0) -> AsyncIterator[pb.ConverseRequest]:
    """Yield the requests (sleeping on floats), then keep the stream open for
    `hold` seconds so the server can answer before the half-close."""
    for item in items:
        if isinstance(item, float | int):
            await asyncio.sleep(item)
        else:
            yield item
    await asyncio.sleep(hold)


def kinds(events: list[pb.ConverseResponse]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


async def collect_until(
    call: AsyncIterator[pb.ConverseResponse], stop_kind: str = "response_ended", count: int = 1, within: float = 20
) -> list[pb.ConverseResponse]:
    """Read events until `count` events of `stop_kind` arrived."""
    events: list[pb.ConverseResponse] = []

    async def read() -> None:
        seen = 0
        async for event in call:
            events.append(event)
            if event.WhichOneof("event") == stop_kind:
                seen += 1
                if seen >= count:
                    return

    await asyncio.wait_for(read(), within)
    return events


def response_text(events: list[pb.ConverseResponse], response_id: str | None = None) -> str:
    return "".join(
        e.text_delta.text
        for e in events
        if e.WhichOneof("event") == "text_delta" and response_id in (None, e.text_delta.response_id)
    )


def response_audio(events: list[pb.ConverseResponse], response_id: str | None = None) -> bytes:
    return b"".join(
        e.audio_chunk.pcm16
        for e in events
        if e.WhichOneof("event") == "audio_chunk" and response_id in (None, e.audio_chunk.response_id)
    )


_METRIC_LINE = re.compile(r"^  (\w+)\s+(-?\d+(?:\.\d+)?)$")


def metric_blocks(text: str) -> dict[str, dict[str, float]]:
    """Parse what the clients' --show-metrics prints: `title:` lines, then `  name  value` lines."""
    blocks: dict[str, dict[str, float]] = {}
    current: dict[str, float] | None = None
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            current = blocks.setdefault(line[:-1], {})
        elif current is not None and (match := _METRIC_LINE.match(line)):
            current[match.group(1)] = float(match.group(2))
        else:
            current = None
    return blocks


def open_stream(stub, first: pb.ConverseRequest):
    """A Converse call fed from a queue: put requests, put None to half-close."""
    queue: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()

    async def reqs():
        while (item := await queue.get()) is not None:
            yield item

    queue.put_nowait(first)
    return stub.Converse(reqs()), queue


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll server state (it has no event to await) every 20 ms until `condition` holds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


STEP_WAIT_S = 120  # longest wait for an engine request in tests (the tiny model on a loaded CPU)


class StepCollector:
    """An engine StepSink that collects one request's output. `on_step(n)` runs
    on the engine thread after the n-th step; `abort_after` aborts the request there."""

    def __init__(self, on_step: Callable[[int], None] | None = None, abort_after: int | None = None) -> None:
        self.items: list[TextToken | AudioFrame] = []
        self.reason: EndReason | None = None
        self.error: BaseException | None = None
        self.finished_calls = 0
        self.started_calls = 0
        self.done = threading.Event()
        self._on_step = on_step
        self._abort_after = abort_after
        self._handle: RequestHandle | None = None
        self._has_handle = threading.Event()

    def set_handle(self, handle: RequestHandle) -> None:
        self._handle = handle
        self._has_handle.set()

    def started(self, ts_ms: float) -> None:
        self.started_calls += 1

    def steps(self, items: Sequence[TextToken | AudioFrame], ts_ms: float) -> None:
        self.items.extend(items)
        if self._on_step is not None:
            self._on_step(len(self.items))
        if self._abort_after is not None and len(self.items) == self._abort_after:
            assert self._has_handle.wait(10)
            assert self._handle is not None
            self._handle.abort()

    def finished(self, reason: EndReason | None, error: BaseException | None) -> None:
        self.finished_calls += 1
        self.reason, self.error = reason, error
        self.done.set()

    def wait(self) -> StepCollector:
        assert self.done.wait(STEP_WAIT_S), "the request never finished"
        return self

    @property
    def values(self) -> list[object]:
        return [
            (s.token_id, s.text) if isinstance(s, TextToken) else tuple(int(c) for c in s.codes) for s in self.items
        ]

    @property
    def kinds(self) -> str:
        return "".join("T" if isinstance(s, TextToken) else "A" for s in self.items)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.items if isinstance(s, TextToken))

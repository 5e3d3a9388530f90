"""Small helpers shared by the tests: request builders and event collection."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable

import numpy as np

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

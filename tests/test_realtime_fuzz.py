"""Random client events never crash or wedge the realtime bridge: after hundreds of them (known and unknown
types, fields of every JSON kind, bad and good base64), the session still answers, and no event ever made the
bridge fail (`internal` errors, close code 1011)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from typing import Any

import pytest
import websockets

from clients.connection import ConnectionOptions
from realtime.app import BridgeSettings, RealtimeBridge
from tests.conftest import StartServer

TYPES = (
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "conversation.item.create", "conversation.item.truncate", "conversation.item.retrieve",
    "conversation.item.delete", "response.create", "response.cancel", "output_audio_buffer.clear", "no.such.event",
)  # fmt: skip
KEYS = ("session", "audio", "item", "item_id", "audio_end_ms", "content_index", "response", "response_id",
        "previous_item_id", "type", "turn_detection", "instructions", "content", "role", "text", "metadata")  # fmt: skip


def value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(11 if depth < 3 else 7)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**31, 10**20, 0.5, -0.0, 1e308])
    if choice == 3:
        return rng.choice(["", "realtime", "server_vad", "semantic_vad", "user", "message", "input_text", "x" * 5000])
    if choice == 4:
        return base64.b64encode(rng.randbytes(rng.choice([0, 1, 2, 480, 4801]))).decode()
    if choice == 5:
        return "%%not base64%%"
    if choice == 6:
        return rng.choice(["audio/pcm", "audio/pcmu", "inf", "auto", "item_000001", "resp_1", "item_resp_1"])
    if choice in (7, 8):
        return {rng.choice(KEYS): value(rng, depth + 1) for _ in range(rng.randrange(4))}
    if choice == 9:
        return [value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}


def random_event(rng: random.Random) -> dict[str, Any]:
    event: dict[str, Any] = {"type": rng.choice(TYPES), "event_id": f"evt_{rng.randrange(1000)}"}
    for _ in range(rng.randrange(4)):
        event[rng.choice(KEYS[:-4])] = value(rng)
    return event


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_events_leave_the_session_usable(
    start_server: StartServer, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_server(max_turn_ms=3000)
    bridge = RealtimeBridge(BridgeSettings(connection=ConnectionOptions(target=running.target), port=0))
    await bridge.start()
    rng = random.Random(seed)
    try:
        async with websockets.connect(f"ws://127.0.0.1:{bridge.port}/v1/realtime", max_size=None) as ws:
            received: list[dict[str, Any]] = []

            async def read_to_the_end() -> None:
                async for message in ws:
                    event = json.loads(message)
                    received.append(event)
                    if event["type"] == "error" and event["error"]["event_id"] == "last":
                        return

            reader = asyncio.create_task(read_to_the_end())  # reads while the events go out
            for _ in range(300):
                await ws.send(json.dumps(random_event(rng)))
            await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "the-end", "event_id": "last"}))
            await asyncio.wait_for(reader, 60)  # the session still answers, in order
            assert ws.close_code is None
            codes = {e["error"]["code"] for e in received if e["type"] == "error"}
            assert "internal" not in codes, codes
            assert received[0]["type"] == "session.created"
        assert not [r for r in caplog.records if r.name.startswith("realtime") and r.levelno >= logging.ERROR]
    finally:
        await bridge.stop()

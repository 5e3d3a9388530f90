"""What the realtime bridge adds to the latency of each audio delta, WebSocket against gRPC.

    python -m bench.realtime                 # 30 turns, under a minute
    python -m bench.realtime --turns 3       # a smoke run
    python -m bench.realtime --json out.json

A server subprocess runs the scripted backend at a GPU-like `--step-ms` per model step. In this
process the bridge dials it like any gRPC client, and a WebSocket client holds typed turns through the
bridge. Every audio chunk is timed twice on one monotonic clock: when the bridge's gRPC client read it
(`Event.receive_mono`, the moment a direct gRPC client has it) and when the WebSocket client has parsed
the matching `response.output_audio.delta` and decoded its base64. The difference is what the bridge
adds: translation, JSON, the WebSocket hop and the client's parse, per delta and for the first audio
of each response. The bridge and the WebSocket client share one event loop here, so their scheduling
is in the figures too (an upper bound).

For reference the run also times turns with a direct gRPC client (`clients.aio`), alternating with the
WebSocket turns: request to first audio over each path, which includes the model's own time and the
machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import websockets

from bench.load import ServerProcess
from clients.aio import Event, VoiceChatClient, make_config
from clients.connection import ConnectionOptions
from realtime.app import BridgeSettings, RealtimeBridge
from realtime.session import RealtimeSession

TEXT = "Tell me about the sea #frames=40"  # 3.2 s of audio in 80 chunks of 40 ms


class TimedSession(RealtimeSession):
    """Notes when the bridge's gRPC client read each audio chunk, in order, per response."""

    reads: dict[tuple[str, str], list[float]] = {}  # (session id, response id) -> read times

    async def _translate(self, event: Event) -> None:
        if event.kind == "audio_chunk" and self._started is not None:
            key = (self._started.session_id, event.data.response_id)
            self.reads.setdefault(key, []).append(event.receive_mono)
        await super()._translate(event)


def _summary(values: Sequence[float]) -> dict[str, float]:
    data = np.asarray(values, dtype=np.float64)
    return {"n": int(data.size), "p50": round(float(np.percentile(data, 50)), 3),
            "p95": round(float(np.percentile(data, 95)), 3), "max": round(float(data.max()), 3)}  # fmt: skip


async def grpc_turn(client: VoiceChatClient) -> float:
    """Request to first audio chunk (ms) of one typed turn over gRPC."""
    async with client.conversation(make_config(manual=True, input_sample_rate_hz=24_000)) as conv:
        started = time.monotonic()
        await conv.send_text(TEXT)
        first = 0.0
        async for event in conv.events():
            if event.kind == "audio_chunk" and not first:
                first = (event.receive_mono - started) * 1000
            elif event.kind == "response_ended":
                return first
    raise RuntimeError("the stream ended before the response")


async def ws_turn(url: str) -> tuple[tuple[str, str], float, list[float]]:
    """One typed turn over the bridge: (session, response) ids, request to first audio (ms), delta arrivals."""
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        manual = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
        await ws.send(json.dumps({"type": "session.update", "session": manual}))
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": TEXT}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        session_id = ""
        while (event := json.loads(await ws.recv()))["type"] != "conversation.item.done":
            if event["type"] == "session.updated":
                session_id = event["session"]["id"]  # the stream reopened for the new turn detection
        started = time.monotonic()
        await ws.send(json.dumps({"type": "response.create"}))
        arrivals: list[float] = []
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "response.output_audio.delta":
                base64.b64decode(event["delta"])
                arrivals.append(time.monotonic())
            elif event["type"] == "response.done":
                return (session_id, event["response"]["id"]), (arrivals[0] - started) * 1000, arrivals


async def run(turns: int, step_ms: float) -> dict[str, Any]:
    args = ["--backend", "scripted", "--scripted-step-ms", str(step_ms), "--no-speculative", "--log-level", "WARNING"]
    async with ServerProcess(args) as server, VoiceChatClient.connect(server.target, token="") as client:
        bridge = RealtimeBridge(BridgeSettings(connection=ConnectionOptions(target=server.target), port=0))
        bridge.session_class = TimedSession
        await bridge.start()
        try:
            url = f"ws://127.0.0.1:{bridge.port}/v1/realtime?model=lfm2"
            await grpc_turn(client)  # warm both paths
            await ws_turn(url)
            first_grpc: list[float] = []
            first_ws: list[float] = []
            first_added: list[float] = []
            per_delta: list[float] = []
            for _ in range(turns):
                first_grpc.append(await grpc_turn(client))
                key, first, arrivals = await ws_turn(url)
                first_ws.append(first)
                reads = TimedSession.reads.pop(key)
                assert len(reads) == len(arrivals), (len(reads), len(arrivals))
                added = [(ws - read) * 1000 for ws, read in zip(arrivals, reads, strict=True)]
                first_added.append(added[0])
                per_delta.extend(added)
        finally:
            await bridge.stop()
    return {
        "turns": turns,
        "step_ms": step_ms,
        "deltas_per_turn": len(per_delta) // max(1, turns),
        "bridge_added_first_audio_ms": _summary(first_added),
        "bridge_added_per_delta_ms": _summary(per_delta),
        "first_audio_grpc_ms": _summary(first_grpc),
        "first_audio_ws_ms": _summary(first_ws),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.realtime", description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=30, help="WebSocket turns (and as many gRPC ones) [%(default)s]")
    parser.add_argument("--step-ms", type=float, default=15.0, help="scripted model step [%(default)s ms]")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args.turns, args.step_ms))
    for name, value in figures.items():
        print(f"{name:28} {value}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=1)


if __name__ == "__main__":
    main()

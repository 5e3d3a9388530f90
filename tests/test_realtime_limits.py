"""The realtime bridge's doors and limits, against a real server: bearer token and client secrets,
a full server, oversized messages, a client that vanishes mid-response, drain, and the HTTP routes."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import websockets
from openai import AsyncOpenAI

from clients.connection import ConnectionOptions
from realtime.app import BridgeSettings, RealtimeBridge
from tests.conftest import Running, StartServer
from tests.helpers import wait_until

TOKEN = "s3cret-token-for-tests"
WITHIN_S = 30.0


@pytest.fixture
async def bridge_for() -> AsyncIterator[Callable[..., Awaitable[RealtimeBridge]]]:
    bridges: list[RealtimeBridge] = []

    async def start(running: Running, token: str = "", **settings: Any) -> RealtimeBridge:
        connection = ConnectionOptions(target=running.target, token=token)
        bridge = RealtimeBridge(BridgeSettings(connection=connection, port=0, **settings))
        await bridge.start()
        bridges.append(bridge)
        return bridge

    yield start
    for bridge in bridges:
        await bridge.stop()


class Reply:
    def __init__(self, status_code: int, body: bytes) -> None:
        self.status_code = status_code
        self.text = body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.text)


async def http(url: str, *, method: str = "GET", headers: dict[str, str] | None = None, body: Any = None,
               content: bytes | None = None) -> Reply:  # fmt: skip
    data = content if content is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)

    def call() -> Reply:
        try:
            with urllib.request.urlopen(request, timeout=WITHIN_S) as reply:
                return Reply(reply.status, reply.read())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.read())

    return await asyncio.to_thread(call)


def ws_url(bridge: RealtimeBridge) -> str:
    return f"ws://127.0.0.1:{bridge.port}/v1/realtime?model=lfm2"


async def next_event(ws: Any, kind: str, within: float = WITHIN_S) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == kind:
                return event

    return await asyncio.wait_for(read(), within)


async def typed_turn(ws: Any, text: str) -> dict[str, Any]:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
    await ws.send(json.dumps({"type": "response.create"}))
    return await next_event(ws, "response.done")


@pytest.fixture
async def secured(start_server: StartServer, bridge_for: Any) -> RealtimeBridge:
    return await bridge_for(await start_server(auth_token=TOKEN), token=TOKEN)


async def test_the_token_is_required_and_works_with_the_sdk(secured: RealtimeBridge) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url(secured), additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403
    client = AsyncOpenAI(api_key=TOKEN, websocket_base_url=f"ws://127.0.0.1:{secured.port}/v1", max_retries=0)
    async with client.realtime.connect(model="lfm2") as conn:
        assert (await conn.recv()).type == "session.created"


async def test_client_secrets_for_browsers(secured: RealtimeBridge, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"http://127.0.0.1:{secured.port}/v1/realtime/client_secrets"
    assert (await http(url, method="POST")).status_code == 401
    assert (await http(url, method="POST", headers={"Authorization": "Bearer nope"})).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = await http(url, method="POST", headers=auth, body={"expires_after": {"anchor": "created_at", "seconds": 5}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "expires_after.seconds"
    bad = await http(url, method="POST", headers=auth, body={"session": {"type": "realtime", "tools": [{"name": "f"}]}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "session.tools"
    assert (await http(url, method="POST", headers=auth, content=b"{oops")).status_code == 400
    made = await http(
        url, method="POST", headers=auth, body={"session": {"type": "realtime", "instructions": "Be kind."}}
    )
    assert made.status_code == 200
    secret = made.json()["value"]
    assert secret.startswith("ek_") and made.json()["expires_at"] > 0
    # a browser sends the secret as a subprotocol (it cannot set headers); the bridge picks "realtime"
    protocols = ["realtime", f"openai-insecure-api-key.{secret}"]
    async with websockets.connect(ws_url(secured), subprotocols=protocols) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "realtime"
        created = await next_event(ws, "session.created")
        assert created["session"]["instructions"] == "Be kind."  # the secret's session applies
        assert (await typed_turn(ws, "hi"))["response"]["status"] == "completed"
    # the real token is not accepted as a subprotocol: it would sit in browser-visible places
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(ws_url(secured), subprotocols=["realtime", f"openai-insecure-api-key.{TOKEN}"]):  # type: ignore[list-item]
            pass
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("websockets.client", "openai")))
    assert TOKEN not in ours and secret not in ours


async def test_a_full_server_answers_with_an_error_and_close_code_1013(
    start_server: StartServer, bridge_for: Any
) -> None:
    bridge = await bridge_for(await start_server(max_sessions=1))
    async with websockets.connect(ws_url(bridge)) as first:
        await next_event(first, "session.created")
        async with websockets.connect(ws_url(bridge)) as second:
            error = await next_event(second, "error")
            assert error["error"]["code"] == "resource_exhausted"
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(second.recv(), WITHIN_S)
            assert second.close_code == 1013
        assert (await typed_turn(first, "still served"))["response"]["status"] == "completed"


async def test_an_oversized_message_closes_with_1009(start_server: StartServer, bridge_for: Any) -> None:
    bridge = await bridge_for(await start_server(), max_message_bytes=64 * 1024)
    async with websockets.connect(ws_url(bridge), max_size=None) as ws:
        await next_event(ws, "session.created")
        audio = base64.b64encode(bytes(80 * 1024)).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(next_event(ws, "never"), WITHIN_S)
        assert ws.close_code == 1009
    # large appends under the limit are split below the server's message limit
    bridge = await bridge_for(await start_server(max_message_bytes=16 * 1024, max_turn_ms=5000))
    async with websockets.connect(ws_url(bridge)) as ws:
        await next_event(ws, "session.created")
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {
            "input": {"turn_detection": None}}}}))  # fmt: skip
        await next_event(ws, "session.updated")
        audio = base64.b64encode(bytes(100 * 1024)).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        done = await next_event(ws, "response.done")
        assert "I heard 2.1 seconds" in done["response"]["output"][0]["content"][0]["transcript"]
        # the push-to-talk buffer holds at most the server's longest turn (5 s here: 240 000 bytes)
        for _ in range(3):
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        assert (await next_event(ws, "error"))["error"]["code"] == "input_audio_buffer_full"


async def test_a_client_that_vanishes_mid_response_frees_the_stream(start_server: StartServer, bridge_for: Any) -> None:
    running = await start_server(scripted_step_ms=5)
    bridge = await bridge_for(running)
    ws = await websockets.connect(ws_url(bridge))
    await next_event(ws, "session.created")
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "long #frames=2000"}]}
    await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
    await ws.send(json.dumps({"type": "response.create"}))
    await next_event(ws, "response.output_audio.delta")
    ws.transport.abort()  # no close frame: the peer is simply gone
    await wait_until(lambda: not running.server.servicer.sessions and not bridge.sessions, within=WITHIN_S)


async def test_a_client_that_stops_reading_does_not_grow_the_bridge(start_server: StartServer, bridge_for: Any) -> None:
    # the bridge has no queue of its own: an unread WebSocket pushes back on the Converse stream, and the
    # server fails the response once more than max_pending_audio_ms waits for the reader
    running = await start_server(max_pending_audio_ms=2000)
    bridge = await bridge_for(running)
    async with websockets.connect(ws_url(bridge), max_queue=1) as ws:
        await next_event(ws, "session.created")
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x #frames=4000"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        await ws.send(json.dumps({"type": "response.create"}))
        await asyncio.sleep(2.0)  # reading nothing meanwhile
        done = await next_event(ws, "response.done", within=60)
        assert done["response"]["status"] == "failed"
        audio_frames = done["response"]["usage"]["output_token_details"]["audio_tokens"]
        assert audio_frames < 4000


async def test_drain_tells_the_client_then_closes(start_server: StartServer) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    running = await start_server(realtime_port=port, scripted_step_ms=5)
    assert running.server.realtime is not None and running.server.realtime.port == port
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime") as ws:
        await next_event(ws, "session.created")
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x #frames=50"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        await ws.send(json.dumps({"type": "response.create"}))
        await next_event(ws, "response.created")
        stopping = asyncio.create_task(running.server.stop(5.0))
        warning = await next_event(ws, "error")
        assert warning["error"]["code"] == "session_ending"
        done = await next_event(ws, "response.done")  # the response in flight finishes
        assert done["response"]["status"] == "completed"
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(next_event(ws, "never"), WITHIN_S)
        assert ws.close_code in (1000, 1012)
        await stopping


async def test_http_routes(start_server: StartServer, bridge_for: Any) -> None:
    bridge = await bridge_for(await start_server())
    base = f"http://127.0.0.1:{bridge.port}"
    page = await http(base + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert (await http(base + "/static/worklets.js")).status_code == 200
    health = await http(base + "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "SERVING"}


async def test_the_session_time_limit_warns_then_closes_with_1001(start_server: StartServer, bridge_for: Any) -> None:
    bridge = await bridge_for(await start_server(max_session_seconds=2))
    async with websockets.connect(ws_url(bridge)) as ws:
        created = await next_event(ws, "session.created")
        assert created["session"]["expires_at"] > 0
        assert (await next_event(ws, "error"))["error"]["code"] == "session_ending"
        assert (await next_event(ws, "error"))["error"]["code"] == "out_of_range"
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(next_event(ws, "never"), WITHIN_S)
        assert ws.close_code == 1001

"""The realtime bridge's Modal web function (deploy/modal_app.py), checked offline as tests/test_deploy.py
checks the GPU Server: what Modal is handed, then the function's own body run here, its ASGI app served on
127.0.0.1 in front of a scripted server, answering a typed turn over the WebSocket."""

from __future__ import annotations

import os

for _var in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
    os.environ.pop(_var, None)

import asyncio  # noqa: E402 - tokens must be gone before modal is imported
import json  # noqa: E402
import socket  # noqa: E402
from collections.abc import AsyncIterator, Callable  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import uvicorn  # noqa: E402
import websockets  # noqa: E402
from modal._utils.async_utils import synchronizer  # noqa: E402
from modal.mount import _Mount  # noqa: E402
from modal_proto import api_pb2  # noqa: E402

from deploy import modal_app  # noqa: E402
from tests.conftest import StartServer  # noqa: E402

TOKEN = "modal-test-token"


def _closure(fn: Callable[..., Any]) -> dict[str, Any]:
    """The variables a Modal loader captured when the object was defined (as tests/test_deploy.py reads them)."""
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True)}


@pytest.fixture(scope="module")
def bridge_def() -> dict[str, Any]:
    return _closure(synchronizer._translate_in(modal_app.realtime)._load)


def test_bridge_is_a_cpu_asgi_function_with_a_stable_label(bridge_def: dict[str, Any]) -> None:
    assert bridge_def["gpu"] is None
    assert bridge_def["cpu"] == modal_app.REALTIME_CPU
    assert bridge_def["webhook_config"].type == api_pb2.WEBHOOK_TYPE_ASGI_APP  # WebSockets included
    assert bridge_def["webhook_config"].requested_suffix == "voicechat-realtime"
    assert [s.app_name if hasattr(s, "app_name") else repr(s) for s in bridge_def["secrets"]] == [
        "modal.Secret.from_name('voicechat-auth')"
    ]


def test_bridge_holds_every_conversation_the_servers_can(bridge_def: dict[str, Any]) -> None:
    assert bridge_def["max_concurrent_inputs"] == modal_app.MAX_CONTAINERS * modal_app.MAX_CONCURRENCY
    assert bridge_def["min_containers"] == 1
    # a WebSocket is one input: it may last as long as the server's longest session
    assert bridge_def["timeout"] >= 3600


def test_bridge_app_is_separate_from_the_gpu_app() -> None:
    bridge_app = synchronizer._translate_in(modal_app.realtime_app)._local_state
    assert list(bridge_app.functions) == ["realtime"]
    assert modal_app.realtime_app.name == modal_app.REALTIME_APP_NAME != modal_app.APP_NAME


def test_bridge_image_carries_the_bridge_its_page_and_the_client() -> None:
    img = synchronizer._translate_in(modal_app.realtime_image)
    files: set[str] = set()
    pending = [img]
    while pending:
        current = pending.pop()
        for dep in current._deps():
            if isinstance(dep, _Mount):
                files |= {str(remote) for entry in dep._entries for _, remote in entry.get_files_to_upload()}
            else:
                pending.append(dep)
    for needed in (
        "/root/realtime/app.py",
        "/root/realtime/session.py",
        "/root/realtime/static/index.html",
        "/root/realtime/static/app.js",
        "/root/realtime/static/worklets.js",
        "/root/clients/aio.py",
        "/root/service/server.py",
        "/root/voicechat/v1/voicechat_pb2.py",
    ):
        assert needed in files, needed


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://acme--voicechat-voicechat.modal.run", ("acme--voicechat-voicechat.modal.run:443", True, "t")),
        ("http://127.0.0.1:5000", ("127.0.0.1:5000", False, "t")),
    ],
)
def test_bridge_dials_the_server_url(url: str, expected: tuple[str, bool, str]) -> None:
    assert modal_app.realtime_connection(url, "t") == expected


@pytest.fixture
async def served_bridge(start_server: StartServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[int]:
    """The web function's body run here: its ASGI app served by uvicorn, dialing a scripted server."""
    running = await start_server(auth_token=TOKEN)
    monkeypatch.setattr(modal_app, "server_url", lambda: f"http://{running.target}")
    monkeypatch.setenv(modal_app.AUTH_SECRET_KEY, TOKEN)
    app = modal_app.realtime._get_source_info().raw_f()  # the function body, as a container runs it
    config = uvicorn.Config(app, lifespan="off", log_config=None, ws="websockets-sansio")
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    sock = socket.create_server(("127.0.0.1", 0))
    await server.startup(sockets=[sock])
    yield sock.getsockname()[1]
    server.should_exit = server.force_exit = True
    await server.shutdown(sockets=[sock])


async def test_web_function_answers_a_typed_turn_with_the_token(served_bridge: int) -> None:
    url = f"ws://127.0.0.1:{served_bridge}/v1/realtime?model=lfm2"
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(url):
            pass
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:

        async def next_event(kind: str) -> dict[str, Any]:
            while (event := json.loads(await ws.recv()))["type"] != kind:
                pass
            return event

        await asyncio.wait_for(next_event("session.created"), 30)
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        await ws.send(json.dumps({"type": "response.create"}))
        done = await asyncio.wait_for(next_event("response.done"), 30)
        assert done["response"]["output"][0]["content"][0]["transcript"] == "Turn 1. You said: hi."

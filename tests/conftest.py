"""Fixtures: a real VoiceChatServer on 127.0.0.1 port 0 with the scripted backend."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest

from service.config import Settings
from service.server import VoiceChatServer
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

# a Modal token in the environment would make deploy tests try the network
os.environ.pop("MODAL_TOKEN_ID", None)
os.environ.pop("MODAL_TOKEN_SECRET", None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In CI nothing may be skipped: `make test` installs every tool the tests
    need (espeak-ng, sox, PortAudio, openssl, Node.js, buf), so a skip there is a
    broken set-up, not a missing optional tool. Locally a skip names what to install."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    for item in items:
        for mark in item.iter_markers("skipif"):
            if any(bool(c) for c in mark.args):
                raise pytest.UsageError(
                    f"{item.nodeid} would be skipped in CI ({mark.kwargs.get('reason', '')}): fix the set-up"
                )


@dataclass
class Running:
    server: VoiceChatServer
    channel: grpc.aio.Channel
    stub: pb_grpc.VoiceChatServiceStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


StartServer = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start servers with Settings overrides; all are stopped at teardown."""
    running: list[Running] = []

    async def start(backend=None, **overrides: object) -> Running:
        values: dict[str, object] = {"backend": "scripted", "host": "127.0.0.1", "port": 0}
        values.update(overrides)
        server = VoiceChatServer(Settings(**values), backend=backend)  # type: ignore[arg-type]
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        item = Running(server, channel, pb_grpc.VoiceChatServiceStub(channel))
        running.append(item)
        return item

    yield start
    for item in running:
        await item.channel.close()
        await item.server.stop(0)


@pytest.fixture
async def running(start_server: StartServer) -> Running:
    return await start_server()


@pytest.fixture
async def stub(running: Running) -> pb_grpc.VoiceChatServiceStub:
    return running.stub

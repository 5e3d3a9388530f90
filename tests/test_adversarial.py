"""Clients that try to exhaust the server: they read slowly or not at all, or
flood it with requests that fail. Against the real server, memory stays bounded
(measured as the process's RSS, printed), other sessions keep working, and a
client that never reads still loses its slot at the session's limits."""

from __future__ import annotations

import asyncio
import gc
import re
from collections.abc import AsyncIterator
from types import TracebackType

import grpc
import psutil
import pytest

from service.session import ChatSession
from tests.conftest import StartServer
from tests.helpers import collect_until, config, requests, text, wait_until
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

FLOOD = 100_000  # failing requests sent by one client that reads nothing


def _slow_channel(target: str) -> grpc.aio.Channel:
    # a small HTTP/2 window that never grows (no BDP probing): an application
    # that does not read really does push back on the server
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 * 1024)]
    return grpc.aio.insecure_channel(target, options=options)


class RssPeak:
    """Samples this process's RSS while the block runs; `grown_mb` is the peak over the start."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._before = 0
        self._peak = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def grown_mb(self) -> float:
        return (self._peak - self._before) / 2**20

    async def _sample(self) -> None:
        while True:
            self._peak = max(self._peak, self._process.memory_info().rss)
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> RssPeak:
        gc.collect()
        self._before = self._peak = self._process.memory_info().rss
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        assert self._task is not None
        self._task.cancel()
        self._peak = max(self._peak, self._process.memory_info().rss)


async def _warm_up(stub: pb_grpc.VoiceChatServiceStub) -> None:
    """One normal conversation, so pools and caches exist before a baseline."""
    call = stub.Converse(requests([config(), text("#frames=10 warm up")]))
    events = await collect_until(call)
    assert events[-1].response_ended.status == pb.RESPONSE_STATUS_COMPLETED
    call.cancel()


async def test_slow_readers_keep_server_memory_bounded(start_server: StartServer) -> None:
    running = await start_server()
    servicer = running.server.servicer
    await _warm_up(running.stub)
    await wait_until(lambda: servicer.admission.active == 0, 5)
    channels = [_slow_channel(running.target) for _ in range(4)]
    async with RssPeak() as rss:
        calls = [
            pb_grpc.VoiceChatServiceStub(c).Converse(requests([config(), text("#frames=1000 a long story")]))
            for c in channels
        ]
        # each reply fails once 20 s of its audio wait for the reader (the outbox's bound)
        await wait_until(
            lambda: (
                len(servicer.sessions) == 4
                and all(s.response_count == 1 and s.current is None for s in servicer.sessions)
            ),
            within=30,
        )
    print(f"4 slow readers: server RSS grew by {rss.grown_mb:.1f} MiB")
    assert rss.grown_mb < 64
    for call in calls:
        events = await collect_until(call)
        ended = events[-1].response_ended
        assert ended.status == pb.RESPONSE_STATUS_FAILED and "not reading" in ended.reason
        # what was written before the reply failed is exact: whole, contiguous chunks
        position = 0
        for chunk in (e.audio_chunk for e in events if e.WhichOneof("event") == "audio_chunk"):
            assert chunk.offset_ms == position and len(chunk.pcm16) == chunk.duration_ms * 48
            position += chunk.duration_ms
        call.cancel()
    for channel in channels:
        await channel.close()


async def test_a_flood_of_failing_requests_keeps_memory_bounded_and_the_session_alive(
    start_server: StartServer,
) -> None:
    running = await start_server()
    servicer = running.server.servicer
    await _warm_up(running.stub)
    await wait_until(lambda: servicer.admission.active == 0, 5)
    flooded, go_on = asyncio.Event(), asyncio.Event()

    async def flood() -> AsyncIterator[pb.ConverseRequest]:
        yield config()
        bad = [pb.ConverseRequest(commit_turn=pb.CommitTurn()), pb.ConverseRequest()]  # 2 and 0 bytes
        for i in range(FLOOD):
            yield bad[i % 2]
        flooded.set()
        await go_on.wait()
        yield text("#frames=3 still there?")
        await asyncio.sleep(30)

    channel = _slow_channel(running.target)
    call = pb_grpc.VoiceChatServiceStub(channel).Converse(flood())
    async with RssPeak() as rss:
        await asyncio.wait_for(flooded.wait(), 60)
        # another session on the same server is served meanwhile
        other = running.stub.Converse(requests([config(), text("#frames=10 hello")]))
        other_events = await collect_until(other)
        assert other_events[-1].response_ended.status == pb.RESPONSE_STATUS_COMPLETED
        other.cancel()
        go_on.set()
        # the flooding session survives: it answers the turn after the flood
        events = await collect_until(call, within=60)
    print(f"{FLOOD} failing requests unread: server RSS grew by {rss.grown_mb:.1f} MiB")
    assert events[-1].response_ended.status == pb.RESPONSE_STATUS_COMPLETED
    session = next(s for s in servicer.sessions if s.response_count == 1 and s.outbox.errors_dropped)
    assert session.outbox.high_water <= 100  # 32 errors, their summary, the events of one short turn
    errors = [e.error for e in events if e.WhichOneof("event") == "error"]
    written = [e for e in errors if "more errors were dropped" not in e.message]
    summaries = [int(m.group(1)) for e in errors if (m := re.match(r"(\d+) more errors were dropped", e.message))]
    assert summaries and all(e.code in ("FAILED_PRECONDITION", "INVALID_ARGUMENT") for e in written)
    assert len(written) + sum(summaries) == FLOOD  # every failed request is accounted for
    assert session.outbox.errors_dropped == sum(summaries)
    assert rss.grown_mb < 24
    call.cancel()
    await channel.close()


async def test_a_client_that_takes_turns_and_never_reads_is_ended(start_server: StartServer) -> None:
    running = await start_server(max_pending_audio_ms=2000)
    servicer = running.server.servicer
    await _warm_up(running.stub)
    await wait_until(lambda: servicer.admission.active == 0, 5)
    sessions: list[ChatSession] = []

    async def turns() -> AsyncIterator[pb.ConverseRequest]:
        yield config()
        await wait_until(lambda: bool(servicer.sessions), 5)
        session = next(iter(servicer.sessions))
        sessions.append(session)
        for i in range(1, 2000):
            if session.outbox.ended.is_set():
                break
            yield text(f"#frames=1 turn {i}")
            # one turn at a time, so that none is refused: each one queues its events
            await wait_until(lambda n=i: session.response_count >= n or session.outbox.ended.is_set(), 10)  # type: ignore[misc]
        await asyncio.sleep(30)

    channel = _slow_channel(running.target)
    call = pb_grpc.VoiceChatServiceStub(channel).Converse(turns())
    async with RssPeak() as rss:
        await wait_until(lambda: bool(sessions) and sessions[0].outbox.overflowed, 30)
    session = sessions[0]
    print(f"{session.response_count} turns unread: server RSS grew by {rss.grown_mb:.1f} MiB")
    assert session.outbox.high_water <= 1024 and len(session.outbox) <= 1
    assert rss.grown_mb < 32
    # the stream ends with RESOURCE_EXHAUSTED and the slot comes back, though the client reads nothing
    await wait_until(lambda: servicer.admission.active == 0, 10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "events wait to be sent" in (info.value.details() or "")
    await channel.close()


@pytest.mark.parametrize(
    ("limits", "code"),
    [
        ({"idle_timeout_seconds": 1}, grpc.StatusCode.DEADLINE_EXCEEDED),
        ({"max_session_seconds": 2}, grpc.StatusCode.OUT_OF_RANGE),
    ],
    ids=["idle-timeout", "session-limit"],
)
async def test_a_client_that_never_reads_loses_its_slot_at_the_limit(
    start_server: StartServer, limits: dict[str, int], code: grpc.StatusCode
) -> None:
    running = await start_server(**limits)
    servicer = running.server.servicer
    admission = servicer.admission
    channel = _slow_channel(running.target)
    # a reply of 3.2 s (150 KB of audio) that is generated at once, far more than
    # the client's window: the writer is stuck in a write when the limit comes
    call = pb_grpc.VoiceChatServiceStub(channel).Converse(requests([config(), text("#frames=40 never read")]))
    await wait_until(lambda: any(s.response_count == 1 and s.current is None for s in servicer.sessions), 5)
    assert admission.active == 1 and all(len(s.outbox) > 20 for s in servicer.sessions)
    # the limit is 1-2 s away; the slot must come back within a few seconds after it
    await wait_until(lambda: admission.active == 0, 12)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == code
    await channel.close()

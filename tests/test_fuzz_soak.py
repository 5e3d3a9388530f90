"""Property-based fuzzing of request sequences, and a bounded soak test.

The fuzzer drives a real server (in a background thread, so each example can
use a plain blocking client) with random interleavings of config, audio of
random sizes and rates, text, commits, cancels, truncates, config updates,
half-closes and disconnects. The server must never crash or hang, and must
always answer with a documented status or event.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
from collections.abc import Iterator

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.server import VoiceChatServer
from tests.helpers import collect_until, config, text
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.CANCELLED,  # the client's own cancel
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
EVENTS = {f.name for f in pb.ConverseResponse.DESCRIPTOR.oneofs_by_name["event"].fields}


class ServerThread:
    """A VoiceChatServer on its own event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = VoiceChatServer(settings)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)

    def call(self, fn):  # run a sync function on the server's loop
        async def wrapped():
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerThread]:
    server = ServerThread(
        Settings(backend="scripted", host="127.0.0.1", port=0, scripted_step_ms=0.5, max_text_chars=200,
                 max_new_tokens=300, default_max_new_tokens=120, max_message_bytes=64 * 1024)
    )
    yield server
    server.stop()


rates = st.sampled_from([0, 16_000, 24_000, 48_000, 8_000, 44_100])
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
sampling = st.builds(
    pb.SamplingParams,
    text_temperature=st.one_of(st.none(), floats),
    audio_temperature=st.one_of(st.none(), floats),
    audio_top_k=st.one_of(st.none(), st.integers(0, 5000)),
    max_new_tokens=st.one_of(st.none(), st.integers(0, 400)),
)
turns = st.builds(
    pb.TurnDetection,
    mode=st.sampled_from([0, 1, 2]),
    silence_duration_ms=st.one_of(st.none(), st.integers(0, 6000)),
    threshold=st.one_of(st.none(), floats),
)
requests_st = st.one_of(
    st.builds(lambda r, s, t: pb.ConverseRequest(config=pb.SessionConfig(input_sample_rate_hz=r, sampling=s, turn_detection=t)), rates, sampling, turns),
    st.builds(lambda n: pb.ConverseRequest(audio=pb.InputAudio(pcm16=bytes(random.Random(n).getrandbits(8) for _ in range(n)))), st.integers(0, 5000)),
    st.builds(lambda s, d: pb.ConverseRequest(text=pb.InputText(text=s, defer_response=d)), st.text(max_size=250), st.booleans()),
    st.just(pb.ConverseRequest(commit_turn=pb.CommitTurn())),
    st.builds(lambda r: pb.ConverseRequest(cancel_response=pb.CancelResponse(response_id=r)), st.sampled_from(["", "resp_1", "nope"])),
    st.builds(lambda r, ms: pb.ConverseRequest(truncate=pb.TruncateResponse(response_id=r, audio_played_ms=ms)),
              st.sampled_from(["", "resp_1", "resp_2"]), st.integers(0, 10**6)),
    st.builds(lambda s, t: pb.ConverseRequest(update_config=pb.UpdateConfig(sampling=s, turn_detection=t)), sampling, turns),
    st.just(pb.ConverseRequest()),
)


# a flood of failing requests (empty, or commits with nothing to commit) at some point of the sequence
floods = st.tuples(
    st.integers(0, 12),
    st.integers(50, 3000),
    st.sampled_from([pb.ConverseRequest(), pb.ConverseRequest(commit_turn=pb.CommitTurn())]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    first_is_config=st.booleans(),
    body=st.lists(requests_st, max_size=12),
    flood=st.one_of(st.none(), floods),
    disconnect_after=st.one_of(st.none(), st.integers(0, 30)),
)
def test_fuzzed_request_sequences_get_documented_answers(
    fuzz_server: ServerThread,
    first_is_config: bool,
    body: list[pb.ConverseRequest],
    flood: tuple[int, int, pb.ConverseRequest] | None,
    disconnect_after: int | None,
) -> None:
    if flood is not None:
        at, count, request = flood
        body = body[:at] + [request] * count + body[at:]
    items = ([pb.ConverseRequest(config=pb.SessionConfig())] if first_is_config else []) + body
    with grpc.insecure_channel(f"127.0.0.1:{fuzz_server.port}") as channel:
        stub = pb_grpc.VoiceChatServiceStub(channel)
        call = stub.Converse(iter(items), timeout=20)
        code = grpc.StatusCode.OK
        seen = 0
        try:
            for event in call:
                assert event.WhichOneof("event") in EVENTS
                seen += 1
                if disconnect_after is not None and seen >= disconnect_after:
                    call.cancel()
                    break
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
        assert code in DOCUMENTED, (code, call.details() if code != grpc.StatusCode.OK else "")
    # the server is still healthy and holds nothing for finished streams
    deadline = time.monotonic() + 5
    while fuzz_server.call(lambda: fuzz_server.server.servicer.admission.active) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fuzz_server.call(lambda: fuzz_server.server.servicer.admission.active) == 0


def test_fuzz_server_still_serving_afterwards(fuzz_server: ServerThread) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{fuzz_server.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert pb_grpc.VoiceChatServiceStub(channel).Generate(pb.GenerateRequest(text="ok"), timeout=5).text


async def _conversation(stub: pb_grpc.VoiceChatServiceStub, rng: random.Random, turns: int) -> str:
    queue: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()

    async def reqs():
        while (item := await queue.get()) is not None:
            yield item

    call = stub.Converse(reqs())
    await queue.put(config())
    try:
        for turn in range(turns):
            await queue.put(text(f"#frames={rng.randint(5, 40)} turn {turn}"))
            action = rng.random()
            if action < 0.15:
                call.cancel()  # disconnect mid-turn
                return "disconnected"
            if action < 0.35:
                await collect_until(call, stop_kind="audio_chunk")
                await queue.put(pb.ConverseRequest(cancel_response=pb.CancelResponse()))
            await collect_until(call)
        await queue.put(None)
        async for _ in call:
            pass
        return "completed"
    finally:
        call.cancel()


async def _soak_round(target: str, sessions: int, turns: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.VoiceChatServiceStub(channel)
        results = await asyncio.gather(*(_conversation(stub, random.Random(rng.random()), turns) for _ in range(sessions)))
    return {r: results.count(r) for r in set(results)}


async def test_soak_many_sessions_return_to_baseline() -> None:
    server = VoiceChatServer(Settings(backend="scripted", host="127.0.0.1", port=0, scripted_step_ms=1))
    port = await server.start()
    target = f"127.0.0.1:{port}"
    process = psutil.Process()
    await _soak_round(target, sessions=10, turns=2, seed=1)  # warm pools and caches
    await asyncio.sleep(0.3)
    gc.collect()
    tasks_before = len(asyncio.all_tasks())
    threads_before = threading.active_count()
    rss_before = process.memory_info().rss
    outcome = await _soak_round(target, sessions=40, turns=5, seed=2)
    await asyncio.sleep(0.5)
    gc.collect()
    assert outcome.get("completed", 0) > 0 and outcome.get("disconnected", 0) > 0
    assert server.servicer.admission.active == 0 and not server.servicer.sessions
    assert len(asyncio.all_tasks()) == tasks_before
    # worker pools may have grown to serve 40 concurrent sessions, but are bounded by max_sessions
    assert threading.active_count() <= threads_before + 2 * (server.settings.max_sessions + 4)
    grown_mb = (process.memory_info().rss - rss_before) / 2**20
    assert grown_mb < 80, f"RSS grew by {grown_mb:.1f} MiB"
    await server.stop(0)

"""Cancels, disconnects, slow readers, tracing, admission, auth and drain,
against the real server on loopback."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.backends import scripted
from tests.conftest import Running, StartServer
from tests.helpers import collect_until, config, kinds, requests, response_audio, text, wait_until
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

LONG = "#frames=400 a long story"  # 32 s of audio


def _session_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("sess_")]




async def test_cancel_response_mid_generation(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=5)
    queue: asyncio.Queue[pb.ConverseRequest] = asyncio.Queue()

    async def reqs():
        while True:
            yield await queue.get()

    call = running.stub.Converse(reqs())
    await queue.put(config())
    await queue.put(text(LONG))
    events: list[pb.ConverseResponse] = []
    async for event in call:
        events.append(event)
        if event.WhichOneof("event") == "audio_chunk":
            cancelled_at = time.monotonic()
            await queue.put(pb.ConverseRequest(cancel_response=pb.CancelResponse()))
            break
    events += await collect_until(call, within=5)
    latency = time.monotonic() - cancelled_at
    ended = events[-1].response_ended
    assert ended.status == pb.RESPONSE_STATUS_CANCELLED
    assert ended.audio_frames < 100  # generation stopped long before its 400 frames
    assert latency < 1.0
    # the session goes on
    await queue.put(text("after"))
    more = await collect_until(call)
    assert more[-1].response_ended.status == pb.RESPONSE_STATUS_COMPLETED
    call.cancel()


def _threads_in_the_model() -> list[str]:
    """Threads whose stack is inside the scripted model's code (an idle pool thread is not)."""
    frames = sys._current_frames()
    return [
        thread.name
        for thread in threading.enumerate()
        if thread.ident in frames
        and any(f.f_code.co_filename == scripted.__file__ for f, _ in traceback.walk_stack(frames[thread.ident]))
    ]


async def _model_goes_idle(within: float) -> None:
    """Wait until no thread was inside the model for 10 polls in a row: a generating
    thread spends nearly all its time there, asleep in the model's step."""
    deadline = time.monotonic() + within
    idle_polls = 0
    while idle_polls < 10:
        busy = _threads_in_the_model()
        assert time.monotonic() < deadline, f"the model is still generating in {busy}"
        idle_polls = 0 if busy else idle_polls + 1
        await asyncio.sleep(0.01)


async def test_client_vanishing_mid_response_frees_everything(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=5)
    servicer = running.server.servicer
    # 2048 tokens take over 10 s at 5 ms a step: unless the cancel really stops
    # the model, it is still generating when the deadline below runs out
    sampling = pb.SamplingParams(max_new_tokens=2048)
    call = running.stub.Converse(requests([config(sampling=sampling), text("#frames=4000 a very long story")]))
    async for event in call:
        if event.WhichOneof("event") == "audio_chunk":
            break
    assert servicer.admission.active == 1 and len(_session_tasks()) == 4  # reader, responder, watchdog, writer
    started = time.monotonic()
    call.cancel()
    await wait_until(lambda: servicer.admission.active == 0 and not servicer.sessions and not _session_tasks())
    freed_after = time.monotonic() - started
    assert freed_after < 2.0
    # the model thread stopped too: no thread is still generating
    await _model_goes_idle(within=3.0)
    # and after stop no engine, generation or decode thread is left
    await running.server.stop(0)
    workers = ("engine", "generate", "decode", "turns", "lfm2-engine")
    await wait_until(lambda: not [t.name for t in threading.enumerate() if t.name.startswith(workers)])


async def test_trace_off_sends_no_metrics_and_trace_on_sends_them(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=5)
    call = running.stub.Converse(requests([config(), text("plain")]))
    events = await collect_until(call)
    call.cancel()
    assert "metrics" not in kinds(events)
    assert all(e.audio_chunk.source_ts_ms == 0 for e in events if e.WhichOneof("event") == "audio_chunk")

    for call in (
        running.stub.Converse(requests([config(trace=True), text("traced")])),
        running.stub.Converse(requests([config(), text("traced")]), metadata=(("x-trace", "1"),)),
    ):
        events = []
        async for event in call:
            events.append(event)
            if event.WhichOneof("event") == "metrics" and event.metrics.HasField("response"):
                break
        call.cancel()
        summary = events[-1].metrics.response
        batches = [e.metrics.decode_batch for e in events if e.WhichOneof("event") == "metrics" and e.metrics.HasField("decode_batch")]
        # the fast path decodes the first 2 frames, the stride doubles, and the
        # frames of an audio run are decoded as soon as the model turns to text
        assert [b.frames for b in batches[:3]] == [2, 4, 6]
        assert summary.tokens_before_first_audio == 6
        assert 0 < summary.commit_to_first_text_ms <= summary.commit_to_first_audio_ms < 1000
        assert summary.decode_batches == len(batches)
        assert summary.generation_rtf > 0 and summary.server_latency_max_ms >= summary.server_latency_p50_ms >= 0
        assert summary.first_chunk_frames == 2 and summary.max_stride_frames == 8
        chunks = [e.audio_chunk for e in events if e.WhichOneof("event") == "audio_chunk"]
        assert all(c.ready_ts_ms >= c.source_ts_ms > 0 for c in chunks)
        assert all(e.ts_ms >= int(e.audio_chunk.ready_ts_ms) for e in events if e.WhichOneof("event") == "audio_chunk")
        assert summary.step_to_write_max_ms >= summary.server_latency_max_ms


async def test_slow_reader_does_not_stall_generation_and_memory_stays_bounded(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=1, max_pending_audio_ms=3000)
    # no BDP probing: the client's HTTP/2 window stays small, so an application
    # that does not read really does push back on the server
    channel = grpc.aio.insecure_channel(running.target, options=[("grpc.http2.bdp_probe", 0)])
    stub = pb_grpc.VoiceChatServiceStub(channel)
    call = stub.Converse(requests([config(), text("#frames=2000 endless")]))
    first = await collect_until(call, stop_kind="response_started")
    assert first
    servicer = running.server.servicer
    session = next(iter(servicer.sessions))
    peak = 0
    for _ in range(40):  # read nothing for 2 s
        peak = max(peak, session.outbox.pending_audio_ms)
        await asyncio.sleep(0.05)
    assert peak <= 3000
    events = await collect_until(call, within=10)
    ended = events[-1].response_ended
    assert ended.status == pb.RESPONSE_STATUS_FAILED
    assert "not reading" in ended.reason
    call.cancel()
    await channel.close()


async def test_other_sessions_are_unaffected_by_a_slow_reader(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=2, max_pending_audio_ms=3000)
    slow = running.stub.Converse(requests([config(), text("#frames=1500 never read")]))
    await collect_until(slow, stop_kind="response_started")
    started = time.monotonic()
    fast = running.stub.Converse(requests([config(), text("#frames=30 quick")]))
    events = await collect_until(fast)
    assert events[-1].response_ended.status == pb.RESPONSE_STATUS_COMPLETED
    assert time.monotonic() - started < 3.0
    slow.cancel()
    fast.cancel()


async def test_max_sessions_refuses_immediately(start_server: StartServer) -> None:
    running = await start_server(max_sessions=1)
    first = running.stub.Converse(requests([config()]))
    await collect_until(first, stop_kind="session_started")
    second = running.stub.Converse(requests([config()], hold=5))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect_until(second, stop_kind="session_started", within=2)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 1 concurrent sessions" in info.value.details()
    first.cancel()


async def test_bearer_token_is_required_when_configured(start_server: StartServer) -> None:
    running = await start_server(auth_token="s3cret")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await running.stub.Generate(pb.GenerateRequest(text="hi"))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await running.stub.Generate(pb.GenerateRequest(text="hi"), metadata=(("authorization", "Bearer wrong"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    call = running.stub.Converse(requests([config()], hold=2))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect_until(call, stop_kind="session_started")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    good = await running.stub.Generate(pb.GenerateRequest(text="hi"), metadata=(("authorization", "Bearer s3cret"),))
    assert good.text == "Turn 1. You said: hi."
    health = health_pb2_grpc.HealthStub(running.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING


async def test_drain_lets_the_response_in_flight_finish(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=3)
    call = running.stub.Converse(requests([config(), text("#frames=60 finishing")]))
    await collect_until(call, stop_kind="audio_chunk")
    health = health_pb2_grpc.HealthStub(running.channel)
    stop = asyncio.create_task(running.server.stop(5))
    events = []
    draining_health = None
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in call:
            events.append(event)
            if event.WhichOneof("event") == "go_away":
                # the response in flight still runs: the server answers, NOT_SERVING
                draining_health = (await health.Check(health_pb2.HealthCheckRequest())).status
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert draining_health == health_pb2.HealthCheckResponse.NOT_SERVING
    order = kinds(events)
    assert "go_away" in order and order.index("go_away") < order.index("response_ended")
    ended = next(e.response_ended for e in events if e.WhichOneof("event") == "response_ended")
    assert ended.status == pb.RESPONSE_STATUS_COMPLETED and ended.audio_frames == 60
    await stop


async def test_playback_audio_is_the_backend_decoder_output(running: Running) -> None:
    """Streaming through adaptive strides and re-framing loses and repeats nothing."""
    import threading

    import numpy as np

    from service.audio import float_to_pcm16
    from service.backends.base import AudioFrame, Sampling, is_end_of_audio
    from service.backends.scripted import ScriptedBackend

    call = running.stub.Converse(requests([config(), text("compare me")]))
    events = await collect_until(call)
    call.cancel()
    reference = ScriptedBackend()
    conv = reference.new_conversation("x")
    conv.add_user_text("compare me")
    frames = [s.codes for s in conv.generate(Sampling(), threading.Event()) if isinstance(s, AudioFrame) and not is_end_of_audio(s.codes)]
    one_shot = float_to_pcm16(reference.new_decoder().decode(frames))
    assert response_audio(events) == one_shot
    assert np.frombuffer(one_shot, "<i2").std() > 1000  # audible, not silence

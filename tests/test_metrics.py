"""Prometheus metrics: the series and their labels, the engine collector on a
real engine, the HTTP endpoint, and a real server scraped over HTTP after a
spoken and a typed turn."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.backends.scripted import ScriptedBackend
from service.config import Settings
from service.engine.api import GenerationRequest, UserTurn
from service.engine.compose import serial_engine
from service.errors import StartupError
from service.metrics import (
    MetricsHTTPServer,
    ServiceMetrics,
    commit_reason_label,
    response_status_label,
    start_metrics_server,
    status_code_label,
    stop_metrics_server,
)
from service.server import VoiceChatServer
from tests.conftest import StartServer
from tests.helpers import StepCollector, audio, commit, kinds, manual_config, requests, text, tone, wait_until
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        return reply.read().decode()


async def scrape(port: int) -> Samples:
    """GET /metrics (in a thread: urllib blocks) and parse it the way Prometheus does."""
    return parse(await asyncio.to_thread(scrape_text, port))


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def local(metrics: ServiceMetrics) -> Samples:
    from prometheus_client import generate_latest

    return parse(generate_latest(metrics.registry).decode())


# -- labels ------------------------------------------------------------------------------


def test_labels_come_from_closed_sets() -> None:
    assert commit_reason_label(pb.COMMIT_REASON_CLIENT_COMMIT) == "client_commit"
    assert commit_reason_label("COMMIT_REASON_SERVER_VAD") == "server_vad"
    assert commit_reason_label("semantic") == "semantic"
    assert commit_reason_label("sess_1a2b3c") == "unspecified"
    assert commit_reason_label(999) == "unspecified"
    assert response_status_label(pb.RESPONSE_STATUS_MAX_TOKENS) == "max_tokens"
    assert response_status_label("whatever the client said") == "unspecified"
    assert status_code_label(None) == "OK"
    assert status_code_label(grpc.StatusCode.RESOURCE_EXHAUSTED) == "RESOURCE_EXHAUSTED"
    assert status_code_label("invalid_argument") == "INVALID_ARGUMENT"
    assert status_code_label("text.text is longer than 4000 characters") == "UNKNOWN"


def test_every_known_label_value_is_exported_from_the_start() -> None:
    samples = local(ServiceMetrics())
    for reason in ("server_vad", "semantic", "client_commit", "text_input", "end_of_input", "max_turn_length"):
        assert value(samples, "voicechat_turns_committed_total", reason=reason) == 0
    for status in ("completed", "cancelled", "interrupted", "failed", "max_tokens"):
        assert value(samples, "voicechat_responses_total", status=status) == 0


def test_two_servers_in_one_process_count_separately() -> None:
    first, second = ServiceMetrics(), ServiceMetrics()
    first.session_started()
    first.turn_committed(pb.COMMIT_REASON_TEXT_INPUT)
    assert value(local(first), "voicechat_sessions_live") == 1
    assert value(local(second), "voicechat_sessions_live") == 0
    assert value(local(second), "voicechat_turns_committed_total", reason="text_input") == 0


def test_a_written_response_feeds_the_histograms_in_seconds() -> None:
    metrics = ServiceMetrics()
    summary = pb.ResponseMetrics(
        speech_end_to_commit_ms=520,
        commit_to_first_audio_ms=123,
        prefill_ms=40,
        generation_rtf=4.5,
        engine_wait_ms=7,
        text_coalesced=2,
        audio_merged=3,
    )
    ended = pb.ConverseResponse(response_ended=pb.ResponseEnded(response_id="resp_1"))
    item = metrics.when_written(ended, lambda: summary)
    metrics.response_ended(pb.RESPONSE_STATUS_COMPLETED)
    assert value(local(metrics), "voicechat_prefill_seconds_count") == 0, "observed only when written"
    assert item() is ended
    metrics.response_ended(pb.RESPONSE_STATUS_CANCELLED)
    metrics.response_written(pb.ResponseMetrics())  # nothing measured: no observations
    metrics.response_ended("failed")
    samples = local(metrics)
    assert value(samples, "voicechat_responses_total", status="completed") == 1
    assert value(samples, "voicechat_responses_total", status="cancelled") == 1
    assert value(samples, "voicechat_responses_total", status="failed") == 1
    for name, seconds in (
        ("voicechat_speech_end_to_commit_seconds", 0.52),
        ("voicechat_commit_to_first_audio_seconds", 0.123),
        ("voicechat_prefill_seconds", 0.04),
        ("voicechat_generation_rtf", 4.5),
        ("voicechat_engine_wait_seconds", 0.007),
    ):
        assert value(samples, f"{name}_count") == 1, name  # zero fields are not observations
        assert value(samples, f"{name}_sum") == pytest.approx(seconds), name
    assert value(samples, "voicechat_commit_to_first_audio_seconds_bucket", le="0.1") == 0
    assert value(samples, "voicechat_commit_to_first_audio_seconds_bucket", le="0.125") == 1
    assert value(samples, "voicechat_text_deltas_coalesced_total") == 2
    assert value(samples, "voicechat_audio_chunks_merged_total") == 3


def test_event_latency_is_observed_from_the_written_event() -> None:
    metrics = ServiceMetrics()
    chunk = pb.ConverseResponse(ts_ms=1_000_003, audio_chunk=pb.AudioChunk(ready_ts_ms=1_000_000.5))
    delta = pb.ConverseResponse(ts_ms=2_000_000, text_delta=pb.TextDelta(ready_ts_ms=1_999_999))
    untraced = pb.ConverseResponse(ts_ms=5, text_delta=pb.TextDelta(text="no ready time"))
    for event in (chunk, delta, untraced, pb.ConverseResponse(ts_ms=9, response_started=pb.ResponseStarted())):
        metrics.event_written(event)
    samples = local(metrics)
    assert value(samples, "voicechat_server_latency_seconds_count") == 2
    assert value(samples, "voicechat_server_latency_seconds_sum") == pytest.approx(0.0035)


def test_sessions_errors_health() -> None:
    metrics = ServiceMetrics()
    for _ in range(3):
        metrics.session_started()
    metrics.session_ended(None)
    metrics.session_ended(grpc.StatusCode.CANCELLED)
    metrics.error("INVALID_ARGUMENT")
    metrics.error("INVALID_ARGUMENT")
    metrics.input_transcription()
    metrics.set_health(True)
    samples = local(metrics)
    assert value(samples, "voicechat_sessions_live") == 1
    assert value(samples, "voicechat_sessions_started_total") == 3
    assert value(samples, "voicechat_sessions_ended_total", code="OK") == 1
    assert value(samples, "voicechat_sessions_ended_total", code="CANCELLED") == 1
    assert value(samples, "voicechat_errors_total", code="INVALID_ARGUMENT") == 2
    assert value(samples, "voicechat_input_transcriptions_total") == 1
    assert value(samples, "voicechat_health_serving") == 1
    metrics.set_health(False)
    assert value(local(metrics), "voicechat_health_serving") == 0


# -- the engine collector ------------------------------------------------------------------


def test_engine_figures_are_read_when_scraped() -> None:
    backend = ScriptedBackend()
    backend.load()
    engine = serial_engine(backend)
    engine.start()
    metrics = ServiceMetrics()
    assert not any(name.startswith("voicechat_engine_steps") for name, _ in local(metrics))
    metrics.watch_engine(engine)
    try:
        samples = local(metrics)
        assert value(samples, "voicechat_engine_steps_total") == 0
        assert value(samples, "voicechat_engine_waiting_turns") == 0
        sink = StepCollector()
        ref = engine.open("")
        engine.submit(GenerationRequest(ref, UserTurn(text="hello #frames=3"), backend.default_sampling()), sink)
        assert sink.wait().error is None
        samples = local(metrics)
        assert value(samples, "voicechat_engine_steps_total") == engine.stats.steps == len(sink.items) > 3
        assert value(samples, "voicechat_engine_rows_total") == engine.stats.rows == len(sink.items)
        assert value(samples, "voicechat_engine_running") == 0
        assert value(samples, "voicechat_engine_waiting_turns") == 0
        assert value(samples, "voicechat_engine_suspended_total") == value(
            samples, "voicechat_engine_speculative_rows_total") == 0  # fmt: skip
        assert value(samples, "voicechat_prefix_cache_fallbacks_total") == 0
        spec = StepCollector()
        request = GenerationRequest(ref, UserTurn(text="maybe"), backend.default_sampling(), speculative=True)
        handle = engine.submit(request, spec)
        deadline = time.monotonic() + 5
        while not handle.paused and time.monotonic() < deadline:  # it pauses itself at its first audio
            time.sleep(0.01)
        assert handle.paused and value(local(metrics), "voicechat_engine_speculative_rows_total") == 1
        handle.abort()
        assert spec.wait().finished_calls == 1
    finally:
        engine.close(5)


# -- the HTTP endpoint ---------------------------------------------------------------------


async def test_metrics_server_on_port_zero_serves_and_stops() -> None:
    metrics = ServiceMetrics()
    metrics.session_started()
    httpd = await start_metrics_server(0, "127.0.0.1", metrics.registry)
    port = httpd.port
    try:
        assert port > 0
        samples = await scrape(port)
        assert value(samples, "voicechat_sessions_live") == 1
        assert await asyncio.to_thread(http_status, port, "/nowhere") == 404
        assert await asyncio.to_thread(http_status, port, "/metrics", "POST") == 405
        assert await asyncio.to_thread(http_status, port, "/metrics", "HEAD") == 200
    finally:
        await stop_metrics_server(httpd)
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(scrape_text, port)


def http_status(port: int, path: str, method: str = "GET") -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_idle_and_surplus_connections_are_closed_and_scrapes_go_on() -> None:
    metrics = ServiceMetrics()
    httpd = MetricsHTTPServer(metrics.registry, max_connections=4, idle_timeout_s=0.5)
    port = await httpd.start("127.0.0.1", 0)
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        try:
            await wait_until(lambda: httpd.open_connections == 4 and httpd.refused_connections == 6)
            # the idle ones are closed after idle_timeout_s: the peer reads the end of the stream
            for sock in idle:
                sock.settimeout(10)
            assert all(await asyncio.to_thread(lambda: [sock.recv(1) == b"" for sock in idle]))
            await wait_until(lambda: httpd.open_connections == 0)
            # a request head that never ends is closed at the same timeout
            with socket.create_connection(("127.0.0.1", port)) as slow:
                slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                slow.settimeout(10)
                assert await asyncio.to_thread(slow.recv, 1) == b""
            assert value(await scrape(port), "voicechat_sessions_live") == 0
        finally:
            for sock in idle:
                sock.close()
    finally:
        await httpd.close()


# -- a real server, scraped over HTTP ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_spoken_and_a_typed_turn_move_the_series(start_server: StartServer) -> None:
    port = free_port()
    running = await start_server(metrics_port=port)
    assert running.server.metrics_port == port
    before = await scrape(port)
    assert value(before, "voicechat_health_serving") == 1
    assert value(before, "voicechat_sessions_live") == 0

    call = running.stub.Converse(
        requests(
            [
                manual_config(trace=True, input_transcription=True),
                audio(tone(1.0)),
                commit(),  # a spoken turn, committed by the client
                pb.ConverseRequest(),  # empty: an in-stream INVALID_ARGUMENT error
                text("and a typed one #frames=4"),
            ],
            hold=0,  # then half-close: both turns are answered, then the stream ends OK
        )
    )
    events = [event async for event in call]
    assert await call.code() == grpc.StatusCode.OK
    ended = [e.response_ended for e in events if e.HasField("response_ended")]
    assert [e.status for e in ended] == [pb.RESPONSE_STATUS_COMPLETED] * 2
    media = sum(e.WhichOneof("event") in ("text_delta", "audio_chunk") for e in events)

    after = await scrape(port)
    assert value(after, "voicechat_sessions_started_total") == 1
    assert value(after, "voicechat_sessions_live") == 0
    assert value(after, "voicechat_sessions_ended_total", code="OK") == 1
    assert value(after, "voicechat_turns_committed_total", reason="client_commit") == 1
    assert value(after, "voicechat_turns_committed_total", reason="text_input") == 1
    assert value(after, "voicechat_turns_committed_total", reason="server_vad") == 0
    assert value(after, "voicechat_responses_total", status="completed") == 2
    assert value(after, "voicechat_responses_total", status="failed") == 0
    assert value(after, "voicechat_errors_total", code="INVALID_ARGUMENT") == 1
    assert value(after, "voicechat_input_transcriptions_total") == 1 == kinds(events).count("input_transcription")
    for name in ("commit_to_first_audio_seconds", "prefill_seconds", "generation_rtf"):
        assert value(after, f"voicechat_{name}_count") == 2, name
    # every text delta and audio chunk of this traced stream was timed once, as it was written
    assert value(after, "voicechat_server_latency_seconds_count") == media > 0
    assert value(after, "voicechat_engine_steps_total") > 0
    assert value(after, "voicechat_engine_waiting_turns") == 0
    assert value(after, "voicechat_engine_running") == 0
    assert value(after, "voicechat_health_serving") == 1


async def test_refused_calls_and_generate_calls_are_counted(start_server: StartServer) -> None:
    port = free_port()
    running = await start_server(metrics_port=port, max_sessions=1)
    reply = await running.stub.Generate(pb.GenerateRequest(text="hi #frames=2"))
    assert reply.status == pb.RESPONSE_STATUS_COMPLETED
    with pytest.raises(grpc.aio.AioRpcError):
        await running.stub.Generate(pb.GenerateRequest())  # no input: INVALID_ARGUMENT
    holder = running.stub.Converse(requests([manual_config()]))
    assert (await anext(aiter(holder))).HasField("session_started")  # the only slot is taken
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.Generate(pb.GenerateRequest(text="hi"))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in running.stub.Converse(requests([manual_config()])):
            pass
    holder.cancel()
    samples = await scrape(port)
    assert value(samples, "voicechat_generate_calls_total", code="OK") == 1
    assert value(samples, "voicechat_generate_calls_total", code="INVALID_ARGUMENT") == 1
    assert value(samples, "voicechat_calls_refused_total", method="Generate", code="RESOURCE_EXHAUSTED") == 1
    assert value(samples, "voicechat_calls_refused_total", method="Converse", code="RESOURCE_EXHAUSTED") == 1


async def test_metrics_port_off_serves_nothing_and_stop_closes_the_endpoint(start_server: StartServer) -> None:
    off = await start_server()
    assert off.server.metrics_port == 0
    port = free_port()
    on = await start_server(metrics_port=port)
    await scrape(port)
    await on.server.stop(0)
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(scrape_text, port)


async def test_a_taken_metrics_port_is_a_startup_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = VoiceChatServer(Settings(backend="scripted", port=0, metrics_port=port))
        try:
            with pytest.raises(StartupError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                await server.start()
        finally:
            await server.stop(0)  # what `python -m service` does before exiting with status 2


# -- a flood of idle connections to the metrics port -----------------------------------------

FD_LIMIT = 256  # the server process's open-file limit in the flood test
FLOOD_SOCKETS = 600  # idle connections opened to its metrics port: more than it may hold


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_a_flood_of_idle_metrics_connections_leaves_grpc_clients_served() -> None:
    """`python -m service` with a 256-descriptor limit: 600 idle TCP connections to its
    metrics port neither use up its descriptors nor stop new gRPC clients; once the
    flood ends, the endpoint answers again."""
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICECHAT_")}
    command = [
        sys.executable, "-m", "service", "--backend", "scripted", "--port", "0", "--no-warmup",
        "--metrics-port", str(metrics_port), "--drain-seconds", "0",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        preexec_fn=_limit_fds,
    )  # fmt: skip
    flood: list[socket.socket] = []
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "voicechat serving on" in line, line
        target = line.split()[-1]
        scrape_text(metrics_port)
        started = time.monotonic()
        flood = [socket.create_connection(("127.0.0.1", metrics_port), 10) for _ in range(FLOOD_SOCKETS)]
        opened_s = time.monotonic() - started
        fds = psutil.Process(process.pid).num_fds()
        with grpc.insecure_channel(target) as channel:
            started = time.monotonic()
            reply = pb_grpc.VoiceChatServiceStub(channel).Generate(
                pb.GenerateRequest(text="hello #frames=2"), timeout=30
            )
            generate_ms = (time.monotonic() - started) * 1000
        assert reply.status == pb.RESPONSE_STATUS_COMPLETED
        # right after the burst the server may still be closing the connections over its cap; it never
        # runs out, and it is well clear of its limit once it has caught up (the flood still open)
        deadline = time.monotonic() + 5
        while (settled := psutil.Process(process.pid).num_fds()) >= FD_LIMIT - 64 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fds < FD_LIMIT - 16, f"{fds} descriptors open right after the flood"
        assert settled < FD_LIMIT - 64, f"{settled} descriptors open during the flood"
        for sock in flood:
            sock.close()
        flood.clear()
        samples = parse(scrape_text(metrics_port))
        assert value(samples, "voicechat_generate_calls_total", code="OK") == 1
        print(
            f"\n{FLOOD_SOCKETS} idle metrics connections opened in {opened_s:.2f} s; server descriptors "
            f"{fds} (limit {FD_LIMIT}); a new gRPC client's Generate took {generate_ms:.0f} ms"
        )
    finally:
        for sock in flood:
            sock.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 0

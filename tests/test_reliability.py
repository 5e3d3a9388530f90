"""Limits and failure modes: idle timeout, session length, message size,
backend failure, a backend that cannot load, TLS, SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.backends.base import Sampling, Step
from service.backends.scripted import ScriptedBackend
from service.config import Settings
from service.errors import StartupError
from service.server import VoiceChatServer
from tests.conftest import StartServer
from tests.helpers import audio, collect_until, config, kinds, manual_config, requests, text
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


async def _drain(call) -> tuple[list[pb.ConverseResponse], grpc.aio.AioRpcError | None]:
    events = []
    try:
        async for event in call:
            events.append(event)
    except grpc.aio.AioRpcError as exc:
        return events, exc
    return events, None


async def test_idle_timeout_ends_a_silent_stream(start_server: StartServer) -> None:
    running = await start_server(idle_timeout_seconds=1)
    events, error = await asyncio.wait_for(_drain(running.stub.Converse(requests([config()], hold=10))), 5)
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "idle timeout" in error.details()
    assert kinds(events) == ["session_started"]


async def test_session_length_limit_sends_go_away_then_out_of_range(start_server: StartServer) -> None:
    running = await start_server(max_session_seconds=2)
    started = time.monotonic()
    events, error = await asyncio.wait_for(_drain(running.stub.Converse(requests([config()], hold=10))), 6)
    assert error is not None and error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert 1.9 < time.monotonic() - started < 4
    go_away = next(e.go_away for e in events if e.WhichOneof("event") == "go_away")
    assert go_away.reason == "max_session_duration" and 0 < go_away.time_left_ms <= 2000


async def test_oversized_message_is_resource_exhausted(start_server: StartServer) -> None:
    running = await start_server(max_message_bytes=64 * 1024)
    call = running.stub.Converse(requests([manual_config(), audio(b"\0" * 200_000)], hold=3))
    _, error = await asyncio.wait_for(_drain(call), 5)
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_backend_failure_fails_the_response_not_the_server(start_server: StartServer) -> None:
    running = await start_server()
    call = running.stub.Converse(requests([config(), text("boom #fail"), 0.3, text("and again")]))
    events = await collect_until(call, count=2)
    call.cancel()
    ended = [e.response_ended for e in events if e.WhichOneof("event") == "response_ended"]
    assert ended[0].status == pb.RESPONSE_STATUS_FAILED and "scripted backend failure" in ended[0].reason
    assert ended[1].status == pb.RESPONSE_STATUS_COMPLETED
    other = await running.stub.Generate(pb.GenerateRequest(text="fine"))
    assert other.text == "Turn 1. You said: fine."
    health = health_pb2_grpc.HealthStub(running.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING


class _CountingBackend(ScriptedBackend):
    """Scripted backend that records when its model steps run."""

    def __init__(self, **kwargs: float) -> None:
        super().__init__(**kwargs)
        self.step_times: list[float] = []

    def new_conversation(self, system_prompt, mode=None):  # type: ignore[override]
        conversation = super().new_conversation(system_prompt) if mode is None else super().new_conversation(system_prompt, mode)
        backend = self
        original = conversation._generate

        def counted(sampling: Sampling, stop: threading.Event) -> Iterator[Step]:
            for step in original(sampling, stop):
                backend.step_times.append(time.monotonic())
                yield step

        conversation._generate = counted  # type: ignore[method-assign]
        return conversation


async def test_disconnect_stops_the_model_within_a_step(start_server: StartServer) -> None:
    backend = _CountingBackend(step_ms=10)
    running = await start_server(backend=backend)
    call = running.stub.Converse(requests([config(), text("#frames=500 long")]))
    await collect_until(call, stop_kind="audio_chunk")
    cancelled = time.monotonic()
    call.cancel()
    await asyncio.sleep(0.5)
    after = [t for t in backend.step_times if t > cancelled]
    # at most the step in flight (plus one being timed) runs after the client left
    assert len(after) <= 2, len(after)
    assert running.server.servicer.admission.active == 0


class _BrokenBackend(ScriptedBackend):
    def load(self) -> None:
        from service.backends.base import BackendLoadError

        raise BackendLoadError("checkpoint missing: run `make download`")


async def test_backend_that_cannot_load_keeps_health_not_serving() -> None:
    server = VoiceChatServer(Settings(backend="scripted", host="127.0.0.1", port=0), backend=_BrokenBackend())
    with pytest.raises(Exception, match="make download"):
        await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.VoiceChatServiceStub(channel).Generate(pb.GenerateRequest(text="hi"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await server.stop(0)


def test_process_exits_with_a_clear_message_when_the_model_is_missing(tmp_path: Path) -> None:
    empty = tmp_path / "no-checkpoint"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "service", "--backend", "lfm2", "--model", str(empty), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "make download" in result.stderr


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


async def test_tls_serving(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = VoiceChatServer(
        Settings(backend="scripted", host="127.0.0.1", port=0, tls_cert=str(cert), tls_key=str(key))
    )
    port = await server.start()
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        reply = await pb_grpc.VoiceChatServiceStub(channel).Generate(pb.GenerateRequest(text="secure"))
        assert reply.text == "Turn 1. You said: secure."
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.VoiceChatServiceStub(plain).Generate(pb.GenerateRequest(text="plain"), timeout=3)
    await server.stop(0)


def _encrypted(key: Path, out: Path) -> Path:
    subprocess.run(
        ["openssl", "rsa", "-in", str(key), "-aes256", "-passout", "pass:xyz", "-out", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


async def _startup_error(**overrides: object) -> str:
    values: dict[str, object] = {"backend": "scripted", "host": "127.0.0.1", "port": 0, **overrides}
    server = VoiceChatServer(Settings(**values))  # type: ignore[arg-type]
    with pytest.raises(StartupError) as info:
        await server.start()
    await server.stop(0)
    return str(info.value)


async def test_tls_files_that_cannot_serve_are_startup_errors(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_key = _self_signed(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    encrypted = _encrypted(key, tmp_path / "encrypted.pem")
    missing = tmp_path / "missing.pem"
    cases = [
        ({"tls_cert": str(cert)}, "TLS needs both --tls-cert and --tls-key"),
        ({"tls_cert": str(missing), "tls_key": str(key)},
         f"cannot read the TLS certificate {missing}: No such file or directory"),
        ({"tls_cert": str(cert), "tls_key": str(tmp_path)}, f"cannot read the TLS key {tmp_path}: Is a directory"),
        ({"tls_cert": str(garbage), "tls_key": str(key)}, f"the TLS certificate {garbage} holds no PEM certificate"),
        ({"tls_cert": str(key), "tls_key": str(key)}, f"the TLS certificate {key} holds no PEM certificate"),
        ({"tls_cert": str(cert), "tls_key": str(garbage)}, f"the TLS key {garbage} is not a PEM private key"),
        ({"tls_cert": str(cert), "tls_key": str(other_key)},
         f"the TLS key {other_key} does not belong to the certificate {cert}"),
        ({"tls_cert": str(cert), "tls_key": str(encrypted)}, f"the TLS key {encrypted} is encrypted"),
    ]  # fmt: skip
    for overrides, message in cases:
        assert message in await _startup_error(**overrides)


async def test_addresses_that_cannot_be_listened_on_are_startup_errors() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = await _startup_error(port=port)
    assert in_use == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "does not resolve" in await _startup_error(host="no such host")
    # TEST-NET-1 (RFC 5737) is never an address of this machine
    assert await _startup_error(host="192.0.2.1") == "cannot listen on 192.0.2.1:0: Cannot assign requested address"
    assert await _startup_error(port=70_000) == "port 70000 is not between 0 and 65535"


def test_process_exits_2_with_one_line_when_it_cannot_listen(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, message in (
            (["--port", str(port)], f"cannot start: cannot listen on 127.0.0.1:{port}: Address already in use"),
            (["--port", "0", "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")],
             f"cannot start: cannot read the TLS certificate {tmp_path / 'c.pem'}: No such file or directory"),
        ):  # fmt: skip
            result = subprocess.run(
                [sys.executable, "-m", "service", "--backend", "scripted", *args],
                cwd=REPO, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == 2, result.stderr
            assert message in result.stderr
            assert "Traceback" not in result.stderr


async def test_bearer_scheme_in_any_case_and_exactly_one_header(start_server: StartServer) -> None:
    running = await start_server(auth_token="s3cret")
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        reply = await running.stub.Generate(
            pb.GenerateRequest(text="hi"), metadata=(("authorization", f"{scheme} s3cret"),)
        )
        assert reply.text == "Turn 1. You said: hi."
    refused = [
        (("authorization", "Bearer S3CRET"),),  # the token itself is exact
        (("authorization", "Basic s3cret"),),
        (("authorization", "s3cret"),),
        (("authorization", "Bearer"),),
        (("authorization", "Bearer s3cret"), ("authorization", "Bearer s3cret")),
        (("authorization", "Bearer wrong"), ("authorization", "Bearer s3cret")),
    ]
    for metadata in refused:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Generate(pb.GenerateRequest(text="hi"), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        if len(metadata) == 2:
            assert "more than one `authorization` header" in info.value.details()


def test_sigterm_drains_in_flight_responses_and_exits_zero() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--backend", "scripted", "--scripted-step-ms", "4", "--port", "0",
         "--drain-seconds", "10"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving on" in line, line
        port = int(line.rsplit(":", 1)[1])
        asyncio.run(_converse_through_sigterm(proc, port))
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _converse_through_sigterm(proc: subprocess.Popen[str], port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.VoiceChatServiceStub(channel)
        call = stub.Converse(requests([config(), text("#frames=100 drain me")]))
        await collect_until(call, stop_kind="audio_chunk")
        proc.send_signal(signal.SIGTERM)
        events, error = await _drain(call)
        ended = next(e.response_ended for e in events if e.WhichOneof("event") == "response_ended")
        assert ended.status == pb.RESPONSE_STATUS_COMPLETED and ended.audio_frames == 100
        assert "go_away" in kinds(events)
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(pb.GenerateRequest(text="late"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_stream_that_never_sends_config_is_released(start_server: StartServer) -> None:
    running = await start_server(idle_timeout_seconds=1)
    events, error = await asyncio.wait_for(_drain(running.stub.Converse(requests([], hold=10))), 5)
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no config within" in error.details()
    assert running.server.servicer.admission.active == 0


# -- the engine's watchdog ---------------------------------------------------------------------


async def test_a_dead_engine_fails_every_response_and_health_goes_not_serving(start_server: StartServer) -> None:
    running = await start_server(scripted_step_ms=2)
    health = health_pb2_grpc.HealthStub(running.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    bystander = running.stub.Converse(requests([manual_config(), text("#frames=2000 a long reply")]))
    await collect_until(bystander, stop_kind="audio_chunk")
    call = running.stub.Converse(requests([manual_config(), text("#fatal")]))
    for stream in (call, bystander):  # both responses end, failed, with the engine's error
        events = await collect_until(stream, within=10)
        ended = [e.response_ended for e in events if e.WhichOneof("event") == "response_ended"][-1]
        assert ended.status == pb.RESPONSE_STATUS_FAILED and "FatalEngineError" in ended.reason
        stream.cancel()
    await asyncio.wait_for(running.server.engine_failed.wait(), 5)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await running.stub.Generate(pb.GenerateRequest(text="after"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_process_exits_non_zero_when_its_engine_dies() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--backend", "scripted", "--scripted-step-ms", "2", "--port", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving on" in line, line
        port = int(line.rsplit(":", 1)[1])

        async def kill_the_engine() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.VoiceChatServiceStub(channel).Converse(requests([manual_config(), text("#fatal")]))
                await _drain(call)

        asyncio.run(kill_the_engine())
        assert proc.wait(timeout=20) == 3
        assert proc.stderr is not None
        log = proc.stderr.read()
        assert log.count("the engine stopped: FatalEngineError") == 1  # the cause, once, with its traceback
        assert "exiting with status 3" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

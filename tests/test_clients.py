"""The importable client (clients.aio) and the file client (python -m clients.file),
against a real in-process server with the scripted backend."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients.aio import Event, VoiceChatClient, VoiceChatError, make_config
from clients.connection import ConnectionOptions, TargetError, resolve, target_from_url
from tests.helpers import metric_blocks
from tests.speech import speech
from voicechat.v1 import voicechat_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
RESPONSE_KINDS = {"response_started", "text_delta", "audio_chunk", "response_ended"}
TOKEN = "s3cret-token"

needs_speech = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="espeak-ng and sox make the test speech"
)


async def collect(conv) -> list[Event]:
    return [event async for event in conv.events()]


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as wav:
        assert wav.getnchannels() == 1 and wav.getsampwidth() == 2
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2"), wav.getframerate()


def write_wav(path: Path, pcm16: bytes, rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm16)


async def run_cli(*args: str, env: dict[str, str] | None = None, limit_s: float = 120) -> tuple[int, str, str]:
    """`python -m <args>` in a subprocess, awaited so the in-process server keeps serving."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args,
        cwd=REPO, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), limit_s)
    return process.returncode or 0, out.decode(), err.decode()


# -- the importable client ---------------------------------------------------------------


async def test_events_arrive_typed_and_in_order(running) -> None:
    async with VoiceChatClient.connect(running.target) as client:
        async with client.conversation(make_config(manual=True)) as conv:
            assert conv.session is not None and conv.session_id.startswith("sess_")
            await conv.send_text("Hello there #frames=5")
            await conv.close_input()
            events = await asyncio.wait_for(collect(conv), 30)
    kinds = [e.kind for e in events]
    assert kinds[:3] == ["session_started", "turn_committed", "response_started"]
    assert kinds[-1] == "response_ended"
    assert set(kinds[3:-1]) == {"text_delta", "audio_chunk"}
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert conv.gaps == 0
    types = {
        "session_started": pb.SessionStarted,
        "turn_committed": pb.TurnCommitted,
        "response_started": pb.ResponseStarted,
        "text_delta": pb.TextDelta,
        "audio_chunk": pb.AudioChunk,
        "response_ended": pb.ResponseEnded,
    }
    for event in events:
        assert isinstance(event.data, types[event.kind])
        assert event.ts_ms > 1_600_000_000_000 and event.receive_ts > 0
        assert -1_000 < event.latency_ms < 10_000  # same machine: small and sane
        if event.kind in RESPONSE_KINDS:
            assert event.response_id == "resp_1"
    assert [e.receive_mono for e in events] == sorted(e.receive_mono for e in events)
    ended = events[-1].data
    assert ended.status == pb.RESPONSE_STATUS_COMPLETED
    assert (
        ended.text == "Turn 1. You said: Hello there." == "".join(e.data.text for e in events if e.kind == "text_delta")
    )
    audio = b"".join(e.data.pcm16 for e in events if e.kind == "audio_chunk")
    assert len(audio) // 2 == ended.audio_ms * 24 == 5 * 80 * 24


async def test_tracing_adds_metrics_after_the_response(running) -> None:
    async with VoiceChatClient.connect(running.target) as client:
        async with client.conversation(make_config(manual=True), trace=True) as conv:
            await conv.send_text("Trace me #frames=4")
            await conv.close_input()
            events = await asyncio.wait_for(collect(conv), 30)
    metrics = [e for e in events if e.kind == "metrics"]
    assert {m.data.WhichOneof("kind") for m in metrics} == {"response", "decode_batch"}
    ended_at = next(i for i, e in enumerate(events) if e.kind == "response_ended")
    response_metrics = [i for i, e in enumerate(events) if e.kind == "metrics" and e.data.HasField("response")]
    assert response_metrics and response_metrics[0] > ended_at
    assert all(e.data.source_ts_ms > 0 for e in events if e.kind in ("text_delta", "audio_chunk"))


async def test_audio_turn_cancel_truncate_update(start_server) -> None:
    running = await start_server(scripted_step_ms=10)
    async with VoiceChatClient.connect(running.target) as client:
        async with client.conversation(make_config(manual=True)) as conv:
            events = conv.events()
            assert (await anext(events)).kind == "session_started"

            async def until(kind: str) -> Event:
                async for event in events:
                    if event.kind == kind:
                        return event
                raise AssertionError(f"no {kind}")

            # audio in three forms: bytes, int16 and float samples
            await conv.send_audio(np.zeros(1600, dtype=np.int16).tobytes())
            await conv.send_audio(np.zeros(1600, dtype=np.int16))
            await conv.send_audio(np.zeros(1600, dtype=np.float32))
            await conv.commit()
            ended = await asyncio.wait_for(until("response_ended"), 30)
            assert ended.data.text == "Turn 1. I heard 0.3 seconds of audio."

            # a long answer, cancelled once it started
            await conv.send_text("Talk for a long time #frames=200")
            started = await asyncio.wait_for(until("audio_chunk"), 30)
            await conv.cancel(started.response_id)
            ended = await asyncio.wait_for(until("response_ended"), 30)
            assert ended.data.status == pb.RESPONSE_STATUS_CANCELLED
            await conv.truncate(ended.response_id, 80)  # one frame: less than was generated

            await conv.update(sampling={"max_new_tokens": 500}, trace=False)
            await conv.commit()  # nothing pending: a recoverable in-stream error
            error = await asyncio.wait_for(until("error"), 30)
            assert error.data.code == "FAILED_PRECONDITION"

            await conv.send_text("And now?")
            ended = await asyncio.wait_for(until("response_ended"), 30)
            assert ended.data.text == "(You heard 80 ms of my last answer.) Turn 3. You said: And now?."
            await conv.close_input()
            rest = [e.kind async for e in events]
            assert rest == []
        with pytest.raises(VoiceChatError) as failure:
            await conv.send_text("too late")
        assert failure.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_generate_and_health(running) -> None:
    async with VoiceChatClient.connect(running.target) as client:
        assert await client.health() == "SERVING"
        assert await client.health("voicechat.v1.VoiceChatService") == "SERVING"
        chat = await client.generate(text="Hi there")
        assert chat.text == "Turn 1. You said: Hi there." and chat.status == "COMPLETED"
        samples, rate = read_wav(chat.wav)
        assert rate == chat.sample_rate_hz == 24_000
        assert len(samples) == chat.audio_ms * 24 > 0
        spoken = await client.generate(text="Read this aloud", mode="synthesize")
        assert spoken.text == "Read this aloud" and spoken.wav
        heard = await client.generate(audio=chat.wav, mode="transcribe")
        assert heard.wav == b"" and heard.text
        with pytest.raises(VoiceChatError) as failure:
            await client.generate(text="no audio", mode="transcribe")
        assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs audio" in failure.value.details


async def test_bearer_token_from_argument_or_environment(start_server, monkeypatch) -> None:
    running = await start_server(auth_token=TOKEN)
    monkeypatch.delenv("VOICECHAT_TOKEN", raising=False)
    async with VoiceChatClient.connect(running.target) as client:
        assert await client.health() == "SERVING"  # health stays open
        with pytest.raises(VoiceChatError) as failure:
            async with client.conversation():
                pass
        assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(VoiceChatError):
            await client.generate(text="hi")
    async with VoiceChatClient.connect(running.target, token=TOKEN) as client:
        assert (await client.generate(text="hi")).text
    monkeypatch.setenv("VOICECHAT_TOKEN", TOKEN)
    async with VoiceChatClient.connect(running.target) as client:
        async with client.conversation(make_config(manual=True)) as conv:
            assert conv.session_id


async def test_unreachable_server_is_a_clear_error() -> None:
    async with VoiceChatClient.connect("127.0.0.1:1") as client:
        with pytest.raises(VoiceChatError) as failure:
            await client.health(deadline_s=10)
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE


async def test_connection_options() -> None:
    assert ConnectionOptions("example.modal.run:443").use_tls
    assert not ConnectionOptions("127.0.0.1:50051").use_tls
    assert ConnectionOptions("127.0.0.1:50051", tls=True).use_tls
    assert not ConnectionOptions("host:443", tls=False).use_tls
    assert target_from_url("https://ws--voicechat-voicechat.modal.run") == "ws--voicechat-voicechat.modal.run:443"
    assert target_from_url("http://localhost:8000/x") == "localhost:8000"
    options = ConnectionOptions(token="t0k", modal_key="wk-1", modal_secret="ws-2")
    assert options.metadata() == (("authorization", "Bearer t0k"), ("modal-key", "wk-1"), ("modal-secret", "ws-2"))
    assert "t0k" not in repr(options) and "ws-2" not in repr(options)
    # without a Modal token the lookup fails at once, with a message that says why
    os.environ.pop("MODAL_TOKEN_ID", None)
    with pytest.raises(TargetError, match="cannot find Modal Server voicechat/VoiceChat"):
        await asyncio.wait_for(resolve(ConnectionOptions(modal_app="voicechat")), 30)


# -- the file client -----------------------------------------------------------------------


async def test_file_client_demo_command(running, tmp_path: Path) -> None:
    """The exact command `make demo` runs."""
    reply = tmp_path / "demo-reply.wav"
    code, out, err = await run_cli(
        "clients.file", "--target", running.target, "--text", "Hello from the demo",
        "--out", str(reply), "--show-metrics",
    )  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[0] == "Turn 1. You said: Hello from the demo."
    samples, rate = read_wav(reply.read_bytes())
    assert rate == 24_000 and len(samples) > 24_000 // 2
    client = metric_blocks(out)["metrics (client)"]
    assert 0 <= client["turn_to_first_text_ms"] <= client["turn_to_end_ms"]
    assert 0 <= client["turn_to_first_audio_ms"] <= client["turn_to_end_ms"]
    assert client["audio_received_ms"] == pytest.approx(len(samples) / 24)
    assert client["events"] > 5
    assert 0 <= client["event_latency_p50_ms"] <= client["event_latency_max_ms"] < 10_000
    assert f"to {reply}" in err


@needs_speech
async def test_file_client_round_trips_a_wav(running, tmp_path: Path) -> None:
    # espeak's native 22.05 kHz is not an input rate: the client resamples to 16 kHz
    utterance = speech("Please tell me a short story about a fox.", 22_050, before_ms=200, after_ms=300)
    question = tmp_path / "question.wav"
    write_wav(question, utterance.pcm16, 22_050)
    reply, transcript, metrics = tmp_path / "reply.wav", tmp_path / "reply.txt", tmp_path / "metrics.json"
    code, out, err = await run_cli(
        "clients.file", "--target", running.target, "--wav", str(question), "--out", str(reply),
        "--transcript", str(transcript), "--trace", "--show-metrics", "--metrics-json", str(metrics),
    )  # fmt: skip
    assert code == 0, err
    text = transcript.read_text().strip()
    match = re.fullmatch(r"Turn 1\. I heard (\d+\.\d) seconds of audio\.", text)
    assert match, text
    assert float(match.group(1)) == pytest.approx(utterance.duration_ms / 1000, abs=0.06)
    samples, _ = read_wav(reply.read_bytes())
    report = json.loads(metrics.read_text())
    assert report["status"] == "COMPLETED" and report["text"] == text
    assert report["client"]["audio_received_ms"] == pytest.approx(len(samples) / 24)
    assert report["server"]["commit_to_first_audio_ms"] > 0
    assert report["decode_batches"] and report["event_latency_ms"]["audio_chunk"]["count"] > 0
    blocks = metric_blocks(out)
    assert blocks["metrics (server, resp_1)"]["prefill_ms"] >= 0
    assert blocks["metrics (client)"]["turn_to_first_audio_ms"] >= 0


@needs_speech
async def test_file_client_streams_in_real_time(running, tmp_path: Path) -> None:
    utterance = speech("One two three.", 48_000)  # 48 kHz is sent as it is
    question = tmp_path / "question.wav"
    write_wav(question, utterance.pcm16, 48_000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    code, out, err = await run_cli(
        "clients.file", "--target", running.target, "--wav", str(question), "--realtime", "--quiet"
    )
    assert code == 0, err
    assert loop.time() - started >= utterance.duration_ms / 1000
    assert out == ""


async def test_file_client_generate_modes(running, tmp_path: Path) -> None:
    spoken = tmp_path / "spoken.wav"
    code, out, err = await run_cli(
        "clients.file", "--target", running.target, "--generate", "--mode", "synthesize",
        "--text", "Read me", "--out", str(spoken), "--show-metrics",
    )  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[0] == "Read me"
    samples, rate = read_wav(spoken.read_bytes())
    assert rate == 24_000 and len(samples) > 0
    assert metric_blocks(out)["metrics (client)"]["audio_ms"] == pytest.approx(len(samples) / 24)

    transcript = tmp_path / "transcript.txt"
    code, out, err = await run_cli(
        "clients.file", "--target", running.target, "--generate", "--mode", "transcribe",
        "--wav", str(spoken), "--transcript", str(transcript),
    )  # fmt: skip
    assert code == 0, err
    assert transcript.read_text().strip() == out.strip() != ""

    code, out, err = await run_cli("clients.file", "--target", running.target, "--generate", "--text", "Hi")
    assert code == 0, err
    assert out.strip() == "Turn 1. You said: Hi."


async def test_file_client_exits_non_zero_on_grpc_errors(start_server, tmp_path: Path) -> None:
    running = await start_server(auth_token=TOKEN)
    code, _, err = await run_cli(
        "clients.file", "--target", running.target, "--text", "hi", env={"VOICECHAT_TOKEN": ""}
    )
    assert code == 1
    assert err.startswith("error: UNAUTHENTICATED:") and "Traceback" not in err
    code, out, err = await run_cli(
        "clients.file", "--target", running.target, "--text", "hi", env={"VOICECHAT_TOKEN": TOKEN}
    )
    assert code == 0, err
    code, _, err = await run_cli(
        "clients.file", "--target", running.target, "--token", TOKEN, "--generate", "--mode", "transcribe",
        "--text", "no audio",
    )  # fmt: skip
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT:")
    code, _, err = await run_cli("clients.file", "--target", "127.0.0.1:1", "--text", "hi", "--timeout", "30")
    assert code == 1 and err.startswith("error: UNAVAILABLE:")
    code, _, err = await run_cli("clients.file", "--target", running.target)
    assert code == 2 and "give --text, --wav or both" in err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
async def test_file_client_over_tls_with_a_private_ca(start_server, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await asyncio.to_thread(
        subprocess.run,
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    running = await start_server(tls_cert=str(cert), tls_key=str(key), auth_token=TOKEN)
    target = f"localhost:{running.server.port}"
    code, out, err = await run_cli(
        "clients.file", "--target", target, "--tls", "--ca-file", str(cert), "--token", TOKEN, "--text", "Secure?"
    )
    assert code == 0, err
    assert out.startswith("Turn 1. You said: Secure?.")
    # without the CA the certificate is not trusted
    code, _, err = await run_cli("clients.file", "--target", target, "--tls", "--token", TOKEN, "--text", "x",
                                 "--timeout", "20")  # fmt: skip
    assert code == 1 and "UNAVAILABLE" in err

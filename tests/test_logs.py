"""Log formats: the JSON formatter field by field, and `python -m service --log-format json`
writing nothing but JSON objects (and never the auth token)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

from service.config import Settings
from service.logs import JsonFormatter, configure_logging, make_formatter
from tests.conftest import StartServer
from tests.helpers import config, requests, wait_until
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Root logging into a buffer as JSON, restored afterwards."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    yield stream
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_record_is_one_json_object_with_its_context(captured: io.StringIO) -> None:
    log = logging.getLogger("service.servicer")
    log.info(
        "%s started: %d sessions", "sess_1", 3,
        extra={"session_id": "sess_1", "response_id": "resp_2", "peer": "ipv4:10.0.0.7:5"},
    )  # fmt: skip
    (entry,) = lines(captured)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "service.servicer"
    assert entry["message"] == "sess_1 started: 3 sessions"
    assert (entry["session_id"], entry["response_id"], entry["peer"]) == ("sess_1", "resp_2", "ipv4:10.0.0.7:5")
    assert isinstance(entry["ts"], str) and entry["ts"].endswith("Z") and "T" in entry["ts"]


def test_context_fields_appear_only_when_given_and_other_extras_never(captured: io.StringIO) -> None:
    logging.getLogger("service").warning("plain", extra={"authorization": "Bearer s3cret", "session_id": ""})
    (entry,) = lines(captured)
    assert set(entry) == {"ts", "level", "logger", "message"}
    assert "s3cret" not in captured.getvalue()


def test_an_exception_is_one_string_field_on_one_line(captured: io.StringIO) -> None:
    try:
        raise ValueError("bad frame\nwith a newline")
    except ValueError:
        logging.getLogger("service.pipeline").exception("response %s failed", "resp_1", extra={"response_id": "resp_1"})
    output = captured.getvalue()
    assert output.count("\n") == 1, "one line per record, whatever the traceback holds"
    (entry,) = lines(captured)
    assert entry["level"] == "ERROR"
    assert entry["response_id"] == "resp_1"
    assert isinstance(entry["exc"], str)
    assert entry["exc"].startswith("Traceback") and "ValueError: bad frame\nwith a newline" in entry["exc"]


def test_values_json_cannot_encode_are_written_as_text() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "peer", None, None)
    record.peer = ("10.0.0.7", 5)  # a tuple is fine
    record.session_id = Path("sess_1")  # not JSON: becomes its str()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["peer"] == ["10.0.0.7", 5]
    assert entry["session_id"] == "sess_1"


def test_settings_repr_keeps_the_token_out_of_json_logs(captured: io.StringIO) -> None:
    logging.getLogger("service").info("%r", Settings(auth_token="s3cret-token"))
    (entry,) = lines(captured)
    assert "auth_token='***'" in str(entry["message"])
    assert "s3cret-token" not in captured.getvalue()


def test_text_format_and_level_filtering() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        configure_logging("warning", "text", stream)
        logging.getLogger("service.x").info("hidden")
        logging.getLogger("service.x").warning("shown %d", 1)
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(" WARNING service.x: shown 1")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="choose text or json"):
        make_formatter("xml")


def test_server_writes_only_json_lines_and_never_the_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICECHAT_")}
    command = [
        sys.executable, "-m", "service", "--backend", "scripted", "--port", "0", "--no-warmup",
        "--log-format", "json", "--auth-token", "s3cret-token", "--drain-seconds", "0",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert "voicechat serving on" in process.stdout.readline()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    entries = [json.loads(line) for line in err.splitlines()]  # every line is a JSON object
    messages = [str(e["message"]) for e in entries]
    assert any(m.startswith("Settings(") and "auth_token='***'" in m for m in messages)
    assert any("SERVING" in m for m in messages)
    assert {e["logger"] for e in entries} >= {"service", "service.server"}
    assert "s3cret-token" not in err


def _broken_mp3() -> bytes:
    """One second of a tone as MP3, with one frame header zeroed: libmpg123 decodes
    it (resyncing past the broken frame) and prints "Note: Illegal Audio-MPEG-Header"
    to descriptor 2."""
    t = np.arange(48_000 * 2) / 48_000
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 48_000, format="MP3")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xfb", len(data) // 2)
    data[frame : frame + 4] = bytes(4)
    return bytes(data)


def test_native_stderr_chatter_becomes_json_lines() -> None:
    """A broken MP3 through Generate on `python -m service --log-format json`: libmpg123's
    notes arrive as JSON records of the logger "stderr", and every stderr line is JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICECHAT_")}
    command = [
        sys.executable, "-m", "service", "--backend", "scripted", "--port", "0", "--no-warmup",
        "--log-format", "json", "--drain-seconds", "0",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "voicechat serving on" in line, line
        with grpc.insecure_channel(line.split()[-1]) as channel:
            stub = pb_grpc.VoiceChatServiceStub(channel)
            reply = stub.Generate(pb.GenerateRequest(audio=_broken_mp3()), timeout=60)
        assert reply.status == pb.RESPONSE_STATUS_COMPLETED
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    entries = [json.loads(line) for line in err.splitlines()]  # every line is a JSON object
    native = [e for e in entries if e["logger"] == "stderr"]
    assert any("Illegal Audio-MPEG-Header" in str(e["message"]) for e in native), err
    assert all(e["level"] == "WARNING" for e in native)


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_a_client_value_cannot_forge_a_log_line(fmt: str, start_server: StartServer) -> None:
    """A client label with a newline and a fake record: it stays inside its own record, escaped."""
    forged = '\n2026-12-01 10:00:00,000 ERROR {"level": "ERROR"}'
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    configure_logging("info", fmt, stream)
    try:
        running = await start_server()
        call = running.stub.Converse(requests([config(client_label=forged[:64])], hold=0))
        async for _ in call:
            pass
        await wait_until(lambda: "ended after" in stream.getvalue())
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
    label = forged[:64]
    lines_out = stream.getvalue().splitlines()
    assert not any(line.startswith("2026-12-01 10:00:00") for line in lines_out)
    if fmt == "json":
        messages = [str(json.loads(line)["message"]) for line in lines_out]  # every line is one object
    else:
        messages = lines_out
    assert any(f"label={label!r}" in message for message in messages), messages

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

import pytest

from service.config import Settings
from service.logs import JsonFormatter, configure_logging, make_formatter

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

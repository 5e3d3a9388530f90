"""Logging set-up: human-readable lines, or one JSON object per line.

`--log-format text` (the default) writes `time LEVEL logger: message`.
`--log-format json` writes one object per line for log collectors:

    {"ts": "2026-12-01T10:00:00.123Z", "level": "INFO", "logger": "service.servicer",
     "message": "sess_1a2b started", "session_id": "sess_1a2b", "peer": "ipv4:10.0.0.7:51234"}

Lifecycle lines pass their context as `extra={"session_id": ..., "response_id": ...,
"peer": ...}`; only the names in `CONTEXT_FIELDS` are copied into the object, so
whatever else a call puts in `extra` never reaches the log by accident. An
exception is one string field, `exc` (the formatted traceback).

Secrets are never logged: nothing here adds request metadata, and `Settings`
masks the auth token in its repr.

A JSON log is all JSON: native libraries write to file descriptor 2 directly
(libmpg123 prints "Note: Illegal Audio-MPEG-Header ..." for a broken MP3
frame; onnxruntime and CUDA have their own warnings), past `logging`. With
`--log-format json` on the process's real stderr, `capture_native_stderr`
points descriptor 2 at a pipe; a thread reads it and logs each line as a
WARNING record of the logger "stderr", written to the original stderr. What
Python itself prints to `sys.stderr` (a thread's uncaught exception, a
warning) takes the same path.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Final, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("session_id", "response_id", "turn_id", "peer")
NATIVE_LOGGER: Final = "stderr"  # the logger of lines written to descriptor 2 past `logging`
_MAX_NATIVE_LINE: Final = 16_384  # a longer run without a newline is logged in pieces


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601 with ms), level, logger,
    message, the context fields that were given, and exc/stack when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value not in (None, ""):
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _iso_utc(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def make_formatter(fmt: str) -> logging.Formatter:
    """The formatter for `--log-format` `fmt` ("text" or "json")."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format {fmt!r}: choose text or json")


def configure_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every logger's records at `level` and above to `stream` (stderr)
    in format `fmt`, replacing handlers set up before. JSON on the real stderr
    also captures what native code writes to descriptor 2 (`capture_native_stderr`)."""
    if stream is None and fmt == "json":
        stream = capture_native_stderr()
    elif stream is None:
        release_native_stderr()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class _NativeStderr:
    """Descriptor 2 redirected into a pipe whose lines become log records.

    `stream` writes to the original stderr (a duplicate of descriptor 2 taken
    first): the log handler writes there, never into the pipe it reads."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self._saved = os.dup(2)
        self.stream: TextIO = os.fdopen(
            os.dup(self._saved), "w", buffering=1, encoding="utf-8", errors="backslashreplace"
        )
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._read_end = read_end
        self._thread = threading.Thread(target=self._pump, name="native-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        log = logging.getLogger(NATIVE_LOGGER)
        pending = b""
        while chunk := os.read(self._read_end, 65_536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            while len(pending) > _MAX_NATIVE_LINE:
                lines.append(pending[:_MAX_NATIVE_LINE])
                pending = pending[_MAX_NATIVE_LINE:]
            for line in lines:
                self._emit(log, line)
        self._emit(log, pending)
        os.close(self._read_end)

    @staticmethod
    def _emit(log: logging.Logger, line: bytes) -> None:
        text = line.decode("utf-8", "backslashreplace").rstrip()
        if text:
            log.warning("%s", text)

    def release(self, timeout_s: float = 1.0) -> None:
        """Give descriptor 2 back to the original stderr; lines already in the
        pipe are still logged (for up to `timeout_s`)."""
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes the pipe's write end: the pump reads to its end
        os.close(self._saved)
        self._thread.join(timeout_s)


_native: _NativeStderr | None = None
_native_lock = threading.Lock()


def capture_native_stderr() -> TextIO:
    """Capture descriptor 2 (once per process; see the module docstring) and
    return a stream onto the original stderr for the log handler."""
    global _native
    with _native_lock:
        if _native is None:
            _native = _NativeStderr()
            atexit.register(release_native_stderr)
        return _native.stream


def release_native_stderr() -> None:
    """Undo `capture_native_stderr`, logging what is still in the pipe."""
    global _native
    with _native_lock:
        native, _native = _native, None
    if native is not None:
        native.release()

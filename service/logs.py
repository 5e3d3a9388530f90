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
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("session_id", "response_id", "turn_id", "peer")


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
    in format `fmt`, replacing handlers set up before."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)

"""The service's one clock for event timestamps: wall-clock milliseconds."""

from __future__ import annotations

import time


def now_ms() -> float:
    """Milliseconds since the epoch (the unit of every `ts_ms` on the wire)."""
    return time.time() * 1000.0

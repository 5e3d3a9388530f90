"""Benchmark results as committed files: what `--json` writes, and what docs/benchmarks.md is built from.

Every benchmark's `--json FILE` writes its report with these keys added at the top level, so that
`python -m scripts.bench_tables` can render it without knowing the benchmark:

- `bench`: the module that produced it (`bench.latency`);
- `command`: the command line that produced it, as it would be typed;
- `date`: the UTC date of the run (YYYY-MM-DD);
- `machine`: CPU model, CPU count and Python version (a GPU benchmark adds its device);
- `tables`: the figures to publish, each `{"title", "columns", "rows"}` with rows of strings, built by the
  same code that prints the benchmark's console table;
- optionally `notes` (a list of sentences about that run) and `source` (where figures came from when they
  were transcribed rather than written by the benchmark itself).

The rest of the report (every raw figure) stays as the benchmark wrote it. Results meant for the docs are
committed under `bench/results/`; `make docs` regenerates docs/benchmarks.md from them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> dict[str, Any]:
    """One publishable table; every cell a string, every row as long as `columns`."""
    return {"title": title, "columns": list(columns), "rows": [[str(c) for c in row] for row in rows]}


def write(path: Path, report: dict[str, Any], module: str, argv: Sequence[str] | None,
          tables: Sequence[dict[str, Any]], device: str = "") -> None:
    """Write `report` to `path` with the keys above added."""
    args = list(sys.argv[1:] if argv is None else argv)
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    stamp = {
        "bench": module,
        "command": shlex.join(["python", "-m", module, *args]),
        "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "machine": machine + (f"; {device}" if device else ""),
        "tables": list(tables),
    }
    # a report key that clashes with one of ours is kept under another name, not lost
    stamped = stamp | {(f"report_{k}" if k in stamp else k): v for k, v in report.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamped, indent=2) + "\n")
    print(f"wrote {path}")

"""The results section of docs/benchmarks.md, from the committed results in bench/results/ (any depth).

    python -m scripts.bench_tables           # print it
    python -m scripts.bench_tables --write   # rewrite its block in docs/benchmarks.md (make docs)

Each result file is what a benchmark's `--json` writes (`bench.results`): its command, date, machine and
tables. Results appear grouped by benchmark in the order below, files of one benchmark by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from scripts import docs_blocks

RESULTS = docs_blocks.ROOT / "bench" / "results"
DOC = docs_blocks.ROOT / "docs" / "benchmarks.md"
SCRIPT = "scripts.bench_tables"
ORDER = ("bench.latency", "bench.turn_latency", "bench.turns", "bench.engine", "bench.lfm2_steps", "bench.gpu")
REQUIRED = ("bench", "command", "date", "machine", "tables")


def load(folder: Path = RESULTS) -> list[tuple[Path, dict[str, Any]]]:
    """Every result in `folder`, in publishing order; ValueError names a file that is not one."""
    found = []
    for path in sorted(folder.rglob("*.json")):
        result = json.loads(path.read_text())
        missing = [key for key in REQUIRED if key not in result]
        if missing:
            raise ValueError(f"{path.name}: not a benchmark result (no {', '.join(missing)}; see bench/results.py)")
        found.append((path, result))

    def rank(item: tuple[Path, dict[str, Any]]) -> tuple[int, str]:
        bench = item[1]["bench"]
        return (ORDER.index(bench) if bench in ORDER else len(ORDER), item[0].stem, str(item[0]))

    return sorted(found, key=rank)


def _cell(value: str) -> str:
    text = value.replace("|", "\\|").replace("\n", " ")
    indent = len(text) - len(text.lstrip(" "))  # a sub-row of the row above
    return "&nbsp;" * indent + text.lstrip(" ") or " "


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row {row[0]!r} has {len(row)} cells for {len(columns)} columns")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


def render(results: list[tuple[Path, dict[str, Any]]]) -> str:
    out: list[str] = []
    for path, result in results:
        tables = result["tables"]
        heading = result.get("title") or (tables[0]["title"] if tables else result["bench"])
        relative = path.relative_to(docs_blocks.ROOT).as_posix()
        out += [f"### {heading}", ""]
        out.append(f"[`{relative}`](../{relative}), {result['date']}, {result['machine']}:")
        out += ["", "```bash", result["command"], "```", ""]
        if result.get("source"):
            out += [f"Source: {result['source']}", ""]
        for table in tables:
            if len(tables) > 1 or table["title"] != heading:
                out += [f"**{table['title']}**", ""]
            out += [*markdown_table(table["columns"], table["rows"]), ""]
        out += [f"- {note}" for note in result.get("notes", [])]
        if result.get("notes"):
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    text = render(load())
    if sys.argv[1:] == ["--write"]:
        changed = docs_blocks.write(DOC, SCRIPT, text)
        print(f"{DOC.relative_to(docs_blocks.ROOT)}: {'updated' if changed else 'up to date'}")
    else:
        print(text, end="")

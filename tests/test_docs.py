"""The docs stay true to the code they document.

- the generated tables (configuration, benchmark results) match their sources (`make docs` rewrites them);
- every relative link points at a file that exists, and every `#anchor` at a heading of that file;
- every module path (`service/session.py`, `python -m bench.turns`, `service.backends.engine`) exists;
- every `make` target named exists in the Makefile;
- every command-line flag named belongs to the program it is given to (`python -m service --max-batch`), and a
  flag named in prose belongs to one of the project's programs or to a tool the docs use (grpcurl, modal, ...).

The flags of a program are read from its source (`add_argument` calls, `Settings` fields), not by running it.
"""

from __future__ import annotations

import re
from dataclasses import fields
from functools import cache
from pathlib import Path

import pytest

from scripts import bench_tables, config_table, docs_blocks
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
TOP_DIRS = ("service", "clients", "bench", "scripts", "deploy", "tests", "realtime", "proto", "voicechat", "docs")
DOCS = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")]
    + [p for p in ROOT.glob("*/README.md") if p.parent.name in TOP_DIRS]
)
IDS = [str(p.relative_to(ROOT)) for p in DOCS]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(TOP_DIRS) + r")/[\w./*-]*)")
DOTTED = re.compile(r"^((?:service|clients|bench|scripts|deploy|realtime)(?:\.\w+)+)$")
PYTHON_M = re.compile(r"python -m ([\w.]+)")
MAKE = re.compile(r"(?:^|[\s`(;&|])make ([a-z][\w-]*)")
FLAG = re.compile(r"(?<![^\s`\"'(\[=])(--[a-z][\w-]*)")  # a flag starts a word: not <host>--name
# placeholders in example paths, not files
PLACEHOLDERS = ("NAME", "DIR", "*", "<")
NOT_PATHS = {"voicechat/VoiceChat"}  # the Modal app/server name

# Programs the docs run, and the files their flags come from (clients share clients/connection.py).
CONNECTION = "clients/connection.py"
PROGRAMS: dict[str, tuple[str, ...]] = {
    "clients.file": ("clients/file.py", CONNECTION),
    "clients.mic": ("clients/mic.py", CONNECTION),
    "realtime": ("realtime/__main__.py", CONNECTION),
    "bench.latency": ("bench/latency.py",),
    "bench.turns": ("bench/turns.py",),
    "bench.turn_latency": ("bench/turn_latency.py",),
    "bench.engine": ("bench/engine.py",),
    "bench.lfm2_steps": ("bench/lfm2_steps.py",),
    "bench.gpu": ("bench/gpu.py",),
    "scripts.config_table": ("scripts/config_table.py",),
    "scripts.bench_tables": ("scripts/bench_tables.py",),
}
MAKE_PROGRAMS = {"run": "service", "serve-scripted": "service", "demo": "service", "talk": "clients.mic",
                 "download": "scripts/download_model.py", "bench": "bench.latency", "lock": "lock", "realtime": "realtime",
                 "check-upgrades": "lock", "test": "pytest"}  # fmt: skip
# Flags of the other tools the docs show: grpcurl, buf curl, modal, openssl, docker, pip, npm, uv, pytest,
# the Node.js client's own parser (read from its source below), and scripts/lock.sh's uv options.
EXTERNAL_FLAGS = {
    "--protocol", "--list-services", "--list-methods", "--schema",  # buf curl
    "--action", "--force", "--target-concurrency", "--min-containers", "--name",  # modal
    "--device",  # docker run
    "--no-deps", "--require-hashes", "--upgrade", "--no-audit", "--no-fund", "--silent",  # pip, uv, npm
    "--help",
}  # fmt: skip


def _prose_and_code(text: str) -> tuple[str, list[str]]:
    """The text without fenced blocks, and the code: fenced blocks' logical lines and inline spans."""
    code: list[str] = []
    for block in FENCE.finditer(text):
        joined = block.group(0).replace("\\\n", " ")
        code += joined.splitlines()[1:-1]
    prose = FENCE.sub("", text)
    code += INLINE.findall(prose)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


@cache
def flags_of(program: str) -> frozenset[str]:
    if program == "service":
        found = {"--" + f.name.replace("_", "-") for f in fields(Settings)}
    elif program == "lock":
        found = {"--upgrade"}  # scripts/lock.sh passes its arguments to `uv pip compile`
    elif program == "pytest":
        found = set()
    else:
        found = set()
        sources = PROGRAMS.get(program, (program,))
        for source in sources:
            text = (ROOT / source).read_text()
            for call in re.findall(r"add_argument\(([^)]*)", text):
                found.update(re.findall(r"[\"'](--[\w-]+)[\"']", call))
            if source.endswith("config_table.py") or source.endswith("bench_tables.py"):
                found.add("--write")
    return frozenset(found | {"--no-" + f[2:] for f in found} | {"--help"})


@cache
def all_flags() -> frozenset[str]:
    node = set(re.findall(r"(--[a-z][\w-]*)", (ROOT / "clients/node/converse.js").read_text()))
    programs = ["service", *PROGRAMS, "scripts/download_model.py", "scripts/make_tiny_model.py"]
    return frozenset(EXTERNAL_FLAGS | node | set().union(*(flags_of(p) for p in programs)))


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


# -- generated tables ---------------------------------------------------------------------------------------------


def test_configuration_table_matches_settings() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    assert docs_blocks.block(text, config_table.SCRIPT) == config_table.table() + "\n", "stale: run `make docs`"


def test_benchmark_results_match_bench_results() -> None:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    expected = bench_tables.render(bench_tables.load())
    assert docs_blocks.block(text, bench_tables.SCRIPT) == expected, "stale: run `make docs`"


def test_every_result_says_how_and_when_it_was_made() -> None:
    results = bench_tables.load()
    assert results, "bench/results/ holds no result"
    for path, result in results:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", result["date"]), path.name
        assert result["command"].startswith("python -m bench.") or result["command"].startswith("not recorded"), (
            path.name
        )
        assert result["tables"] and all(t["rows"] for t in result["tables"]), path.name


def test_the_generators_find_their_blocks() -> None:
    text = "a\n" + docs_blocks.begin("x") + "\nold\n" + docs_blocks.END + "\nb\n"
    assert docs_blocks.replace(text, "x", "new") == text.replace("old", "new")
    with pytest.raises(ValueError):
        docs_blocks.block("no markers", "x")


def test_metrics_table_lists_every_series() -> None:
    """docs/operations.md's metrics table names exactly the series `service/metrics.py` exports."""
    source = (ROOT / "service" / "metrics.py").read_text()
    counters = set(re.findall(r"(?:Counter|CounterMetricFamily)\(\s*f\"\{PREFIX\}_(\w+)\"", source))
    others = set(re.findall(r"(?:Gauge|GaugeMetricFamily)\(\s*f\"\{PREFIX\}_(\w+)\"", source))
    others |= set(re.findall(r"histogram\(\s*\"(\w+)\"", source))
    exported = {f"voicechat_{name}_total" for name in counters} | {f"voicechat_{name}" for name in others}
    doc = (ROOT / "docs" / "operations.md").read_text()
    table = doc[doc.index("## Metrics") : doc.index("## Logs")]
    documented = set(re.findall(r"^\| `(voicechat_\w+)` \|", table, re.M))
    assert exported, "no series found in service/metrics.py: update this test's patterns"
    assert documented == exported, f"undocumented: {sorted(exported - documented)}; gone: {sorted(documented - exported)}"


# -- links, paths, targets, flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_relative_links_exist(doc: Path) -> None:
    prose, _ = _prose_and_code(doc.read_text())
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][\w+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_module_paths_exist(doc: Path) -> None:
    text = doc.read_text()
    _, code = _prose_and_code(text)
    missing = []
    for path in set(PATH.findall(text)):
        path = path.rstrip(".,:;")
        if any(p in path for p in PLACEHOLDERS) or path in NOT_PATHS:
            continue
        if re.search(r"--json\s+" + re.escape(path), text) or path.startswith("bench/results/"):
            continue  # a file a benchmark writes (the published ones are linked, and links are checked)
        if not (ROOT / path).exists():
            missing.append(path)
    run = {m for line in code for m in PYTHON_M.findall(line) if m.split(".")[0] in TOP_DIRS}
    missing += [m for m in run if not _is_module(m.split("."))]
    for name in {m for span in code for m in DOTTED.findall(span.strip())}:
        parts = name.split(".")
        # a module or package, or an attribute of one (service.backends.engine.Engine)
        if not (_is_module(parts) or _is_module(parts[:-1])):
            missing.append(name)
    assert not missing, f"named in {doc.name} but not in the repository: {sorted(missing)}"


def _is_module(parts: list[str]) -> bool:
    base = ROOT.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or (base / "__main__.py").is_file()


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_make_targets_exist(doc: Path) -> None:
    _, code = _prose_and_code(doc.read_text())
    named = {t for line in code for t in MAKE.findall(" " + line)}
    assert named <= make_targets(), f"not in the Makefile: {sorted(named - make_targets())}"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_flags_exist(doc: Path) -> None:
    text = doc.read_text()
    _, code = _prose_and_code(text)
    wrong = []
    for line in code:
        program = None
        if m := PYTHON_M.search(line):
            program = m.group(1)
            if program in ("service", "realtime") or program in PROGRAMS:
                rest = line[m.end() :]
            else:
                program = None
        elif m := re.search(r"\bmake ([\w-]+)", line):
            program = MAKE_PROGRAMS.get(m.group(1))
            rest = line[m.end() :]
        elif re.search(r"voicechat-server\b", line):
            program, rest = "service", line
        if program is None:
            continue
        rest = re.split(r"[|;&#]", rest)[0]  # this command only: not a pipe, the next command or a comment
        for flag in FLAG.findall(rest):
            if flag not in flags_of(program):
                wrong.append(f"{flag} is not a flag of {program}: {line.strip()}")
    for flag in set(FLAG.findall(text)):
        if flag not in all_flags():
            wrong.append(f"{flag} is not a flag of any program the docs use")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_docs_are_all_checked() -> None:
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"architecture.md", "protocol.md", "operations.md", "deploy-modal.md", "model.md", "benchmarks.md"} <= names
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250, "the README stays short: move detail to docs/"

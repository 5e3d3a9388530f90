"""The `buf curl` recipes of docs/clients.md, run as written against the
in-process server: reflection only, no proto files.

grpcurl is not in any registry these machines reach; `buf curl` speaks the same
gRPC-with-reflection and is installed by `npm install` (node_modules/.bin/buf).
Each recipe is the fenced block after a `<!-- recipe: NAME -->` marker; the
test points `localhost:50051` at the test server and runs it with bash."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "clients.md"
BUF_BIN = REPO / "node_modules" / ".bin"
RECIPE = re.compile(r"<!-- recipe: ([\w-]+) -->\s*```sh\n(.*?)```", re.DOTALL)

pytestmark = pytest.mark.skipif(
    not (BUF_BIN / "buf").exists(), reason="buf is not installed: run `npm install` (it brings @bufbuild/buf)"
)


def recipes() -> dict[str, str]:
    return dict(RECIPE.findall(DOC.read_text()))


async def run_recipe(name: str, target: str) -> str:
    script = recipes()[name].replace("localhost:50051", target)
    env = {**os.environ, "PATH": f"{BUF_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    process = await asyncio.create_subprocess_exec(
        "bash", "-euo", "pipefail", "-c", script,
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, f"recipe {name} failed ({process.returncode}):\n{script}\n{err.decode()}"
    return out.decode()


def json_documents(text: str) -> list[dict]:
    """The JSON objects buf curl prints one after another."""
    decoder = json.JSONDecoder()
    documents, position = [], 0
    while (position := _skip_space(text, position)) < len(text):
        document, position = decoder.raw_decode(text, position)
        documents.append(document)
    return documents


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def test_docs_have_every_recipe() -> None:
    assert set(recipes()) == {"list-services", "list-methods", "health", "generate", "converse"}


async def test_list_services(running) -> None:
    services = (await run_recipe("list-services", running.target)).split()
    assert "voicechat.v1.VoiceChatService" in services
    assert "grpc.health.v1.Health" in services


async def test_list_methods(running) -> None:
    methods = (await run_recipe("list-methods", running.target)).split()
    assert "voicechat.v1.VoiceChatService/Converse" in methods
    assert "voicechat.v1.VoiceChatService/Generate" in methods


async def test_health_check(running) -> None:
    assert json_documents(await run_recipe("health", running.target)) == [{"status": "SERVING"}]


async def test_generate(running) -> None:
    (reply,) = json_documents(await run_recipe("generate", running.target))
    assert reply["text"] == "Turn 1. You said: Hello!."
    assert reply["contentType"] == "audio/wav" and reply["audioMs"] > 0


async def test_converse_text_turn(running) -> None:
    events = json_documents(await run_recipe("converse", running.target))
    kinds = [next(k for k in e if k not in ("tsMs", "seq")) for e in events]
    assert kinds[:3] == ["sessionStarted", "turnCommitted", "responseStarted"]
    assert "textDelta" in kinds and "audioChunk" in kinds
    ended = next(e["responseEnded"] for e in events if "responseEnded" in e)
    assert ended["status"] == "RESPONSE_STATUS_COMPLETED"
    assert ended["text"] == "Turn 1. You said: Hello!." and ended["audioMs"] == 240
    assert kinds[-1] == "metrics", "x-trace: 1 asked for the metrics"
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))

"""The Node.js client (clients/node/converse.js) against the in-process server.

Needs `node` and the repository's node_modules (@grpc/grpc-js,
@grpc/proto-loader: `npm install` at the repository root)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import wave
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "clients" / "node" / "converse.js"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (Node.js 18+ runs the Node client)"),
    pytest.mark.skipif(
        not (REPO / "node_modules" / "@grpc" / "grpc-js").is_dir()
        or not (REPO / "node_modules" / "@grpc" / "proto-loader").is_dir(),
        reason="node_modules lacks @grpc/grpc-js or @grpc/proto-loader: run `npm install`",
    ),
]


async def node(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE, str(SCRIPT), *args,
        cwd=REPO, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_text_turn_plain_output(running, tmp_path: Path) -> None:
    reply = tmp_path / "reply.wav"
    code, out, err = await node("--target", running.target, "--text", "Hello from Node #frames=3", "--out", str(reply))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "Turn 1. You said: Hello from Node."
    assert lines[1] == "status: COMPLETED, audio: 11520 bytes (240 ms), events: " + lines[1].rsplit(" ", 1)[1]
    with wave.open(str(reply)) as wav:
        assert wav.getframerate() == 24_000 and wav.getnframes() == 240 * 24


async def test_text_turn_json_lines(running) -> None:
    code, out, err = await node("--target", running.target, "--text", "JSON please #frames=2", "--json", "--trace")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    types = [r["type"] for r in records]
    assert types[0] == "session_started" and types[-1] == "summary"
    assert "metrics" in types
    deltas = [r for r in records if r["type"] == "text_delta"]
    summary = records[-1]
    assert "".join(d["text"] for d in deltas) == summary["text"] == "Turn 1. You said: JSON please."
    assert all(-1000 < d["latency_ms"] < 10_000 for d in deltas)
    assert summary["status"] == "COMPLETED"
    assert summary["audio_bytes"] == 2 * 80 * 24 * 2 and summary["audio_ms"] == 160
    assert summary["session_id"].startswith("sess_") and summary["response_id"] == "resp_1"


async def test_bearer_token_and_errors(start_server) -> None:
    running = await start_server(auth_token="node-token")
    code, out, err = await node("--target", running.target, "--text", "hi", env={"VOICECHAT_TOKEN": ""})
    assert code == 1
    assert err.startswith("error: UNAUTHENTICATED:")
    code, out, err = await node("--target", running.target, "--text", "hi", env={"VOICECHAT_TOKEN": "node-token"})
    assert code == 0, err
    code, out, err = await node("--target", "127.0.0.1:1", "--text", "hi")
    assert code == 1 and err.startswith("error: UNAVAILABLE:")
    code, out, err = await node("--target", running.target)
    assert code == 2 and "--text is required" in err

"""`python -m realtime` as a process in front of a running server: it prints its URL, serves a typed turn,
and exits 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import websockets

from tests.conftest import Running

ROOT = Path(__file__).resolve().parents[1]


async def test_standalone_bridge_process(running: Running) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VOICECHAT_TOKEN": ""}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "realtime", "--target", running.target, "--port", "0",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        match = re.search(r"realtime bridge: (http://127\.0\.0\.1:(\d+)/)", line)
        assert match, line
        url = f"ws://127.0.0.1:{match.group(2)}/v1/realtime?model=lfm2"
        async with websockets.connect(url) as ws:
            while json.loads(await ws.recv())["type"] != "session.created":
                pass
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            await ws.send(json.dumps({"type": "response.create"}))
            async with asyncio.timeout(30):
                while (event := json.loads(await ws.recv()))["type"] != "response.done":
                    pass
            assert event["response"]["output"][0]["content"][0]["transcript"] == "Turn 1. You said: hello."
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

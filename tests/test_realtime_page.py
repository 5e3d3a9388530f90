"""The browser page in a real headless Chromium: it connects, a spoken turn (a WAV file played as the
fake microphone) is answered, and the page shows both transcripts and the audio it received.

The server runs the bridge in-process (`realtime_port`), as `--realtime-port` does. Chromium's fake
capture device loops the file, so the user keeps talking; the test waits for the first answer. When
an assertion fails, a screenshot and the page's state are kept in the pytest temp directory.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import wave
from pathlib import Path

import pytest

from tests.conftest import StartServer
from tests.speech import silence, speech

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromium-driver (scripts/system_deps.sh)"
)
RATE = 48_000  # the fake capture device resamples to the page's 24 kHz AudioContext


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_wav(path: Path, pause_ms: float = 4000) -> None:
    """A spoken turn; Chromium loops the file, so `pause_ms` is also the gap before the user speaks again."""
    turn = silence(600, RATE) + speech("Hello, can you hear me?", RATE) + silence(pause_ms, RATE)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(turn.pcm16)


def chromium(wav: Path, profile: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={profile}",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER or ""), options=options)


async def open_page(driver, url: str):  # type: ignore[no-untyped-def]
    await asyncio.to_thread(driver.get, url + "?autostart=1")

    async def state() -> dict[str, object]:
        raw = await asyncio.to_thread(driver.execute_script, "return JSON.stringify(window.voicechat)")
        return dict(json.loads(raw))

    return state


async def keep_evidence(driver, tmp_path: Path, state: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    shot = tmp_path / "realtime-page.png"
    await asyncio.to_thread(driver.save_screenshot, str(shot))
    (tmp_path / "realtime-page.json").write_text(json.dumps(state, indent=1))
    print(f"screenshot kept: {shot}")


async def test_page_answers_a_spoken_turn(start_server: StartServer, tmp_path: Path) -> None:
    # speculation off: a released speculative response can stall after its first text when audio arrives
    # faster than real time (a server issue, seen over plain gRPC too); this test is about the page
    running = await start_server(realtime_port=free_port(), scripted_step_ms=2, speculative=False)
    bridge = running.server.realtime
    assert bridge is not None
    wav = tmp_path / "turn.wav"
    write_wav(wav)
    driver = await asyncio.to_thread(chromium, wav, tmp_path / "profile")
    state: dict[str, object] = {}
    try:
        page_state = await open_page(driver, bridge.url)
        for _ in range(600):  # up to 60 s on a loaded machine; usually a few seconds
            state = await page_state()
            if state["responses"] and state["userTranscripts"] and state["audioMs"]:
                break
            await asyncio.sleep(0.1)
        assert state["connected"], state
        assert state["responses"], state
        assert state["errors"] == [], state
        (heard, *_) = state["userTranscripts"]  # type: ignore[misc]
        assert "I heard" in heard  # the scripted model's transcript of a spoken turn
        (answer, *_) = state["assistantTexts"]  # type: ignore[misc]
        assert answer.startswith("Turn 1. I heard")
        assert float(state["audioMs"]) > 500  # type: ignore[arg-type]
        assert state["firstAudioMs"]
        shown = await asyncio.to_thread(driver.find_element, "id", "transcript")
        assert "you:" in shown.text and "model: Turn 1. I heard" in shown.text
        audio_ms = await asyncio.to_thread(driver.find_element, "id", "audio-ms")
        assert int(audio_ms.text) > 500
    except AssertionError:
        await keep_evidence(driver, tmp_path, state)
        raise
    finally:
        await asyncio.to_thread(driver.quit)


async def test_page_barge_in_flushes_playback_and_truncates(start_server: StartServer, tmp_path: Path) -> None:
    # the user speaks again 1 s after each question (the file loops): over the ~2.6 s spoken answer
    running = await start_server(realtime_port=free_port(), scripted_step_ms=2, speculative=False)
    bridge = running.server.realtime
    assert bridge is not None
    wav = tmp_path / "turn.wav"
    write_wav(wav, pause_ms=1000)
    driver = await asyncio.to_thread(chromium, wav, tmp_path / "profile")
    state: dict[str, object] = {}
    try:
        page_state = await open_page(driver, bridge.url)
        for _ in range(600):
            state = await page_state()
            if state["truncatedMs"]:
                break
            await asyncio.sleep(0.1)
        assert state["bargeIns"], state
        (played, *_) = state["truncatedMs"]  # type: ignore[misc]
        # the server kept what was played: less than the whole answer (0 when the jitter buffer had not started)
        assert 0 <= played < float(state["audioMs"]), state  # type: ignore[arg-type]
        assert state["errors"] == [], state
    except AssertionError:
        await keep_evidence(driver, tmp_path, state)
        raise
    finally:
        await asyncio.to_thread(driver.quit)

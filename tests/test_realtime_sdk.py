"""The realtime bridge spoken to by the official `openai` SDK (`client.realtime.connect`), against a
real server with the scripted backend: session set-up, a typed turn, a spoken turn under server VAD
with input transcription, push-to-talk, cancel, truncate, text-only output, and bad client events that
leave the session usable. The bridge runs standalone here, dialing the server like any client."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from openai import AsyncOpenAI

from clients.connection import ConnectionOptions
from realtime.app import BridgeSettings, RealtimeBridge
from tests.conftest import Running, StartServer
from tests.speech import speech

WITHIN_S = 30.0  # longest wait for one event on a loaded machine


@pytest.fixture
async def bridge_for() -> AsyncIterator[Callable[..., Awaitable[RealtimeBridge]]]:
    bridges: list[RealtimeBridge] = []

    async def start(running: Running, token: str = "") -> RealtimeBridge:
        connection = ConnectionOptions(target=running.target, token=token)
        bridge = RealtimeBridge(BridgeSettings(connection=connection, port=0))
        await bridge.start()
        bridges.append(bridge)
        return bridge

    yield start
    for bridge in bridges:
        await bridge.stop()


def ws_base(bridge: RealtimeBridge) -> str:
    return f"ws://127.0.0.1:{bridge.port}/v1"


@asynccontextmanager
async def connect(bridge: RealtimeBridge, api_key: str = "unused") -> AsyncIterator[Any]:
    client = AsyncOpenAI(api_key=api_key, websocket_base_url=ws_base(bridge), max_retries=0)
    async with client.realtime.connect(model="lfm2") as conn:
        yield conn


async def until(conn: Any, kind: str, within: float = WITHIN_S) -> list[Any]:
    """Events up to and including the first of `kind`."""
    import asyncio

    events: list[Any] = []

    async def read() -> None:
        while True:
            event = await conn.recv()
            events.append(event)
            if event.type == kind:
                return

    await asyncio.wait_for(read(), within)
    return events


def types(events: list[Any]) -> list[str]:
    return [e.type for e in events]


def committed_seconds(events: list[Any]) -> float:
    """Seconds between the detected start and end of speech."""
    started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
    stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
    return (stopped.audio_end_ms - started.audio_start_ms) / 1000


def user_message(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


@pytest.fixture
async def bridge(start_server: StartServer, bridge_for: Callable[..., Awaitable[RealtimeBridge]]) -> RealtimeBridge:
    return await bridge_for(await start_server())


async def test_session_created_then_update_maps_onto_the_contract(bridge: RealtimeBridge) -> None:
    async with connect(bridge) as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        session = created.session
        assert session.audio.input.format.type == "audio/pcm" and session.audio.input.format.rate == 24_000
        assert session.audio.input.turn_detection.type == "server_vad"
        assert session.audio.input.turn_detection.silence_duration_ms == 500
        await conn.session.update(
            session={
                "type": "realtime",
                "instructions": "Answer in one sentence.",
                "max_output_tokens": 300,
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24_000},
                        "transcription": {"model": "whisper-1"},
                        "turn_detection": {
                            "type": "server_vad",
                            "threshold": 0.6,
                            "silence_duration_ms": 700,
                            "prefix_padding_ms": 200,
                            "create_response": True,
                            "interrupt_response": False,
                        },  # fmt: skip
                    },
                    "output": {"format": {"type": "audio/pcm", "rate": 24_000}, "voice": "alloy"},
                },
            }
        )
        updated = (await until(conn, "session.updated"))[-1].session
        assert updated.instructions == "Answer in one sentence."
        assert updated.max_output_tokens == 300
        assert updated.audio.input.transcription is not None
        turn = updated.audio.input.turn_detection
        assert (turn.threshold, turn.silence_duration_ms, turn.prefix_padding_ms) == (0.6, 700, 200)
        assert turn.interrupt_response is False
        # a live change (no reopen) of turn detection: semantic VAD with an eagerness
        await conn.session.update(session={"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}})  # fmt: skip
        updated = (await until(conn, "session.updated"))[-1].session
        assert updated.audio.input.turn_detection.type == "semantic_vad"
        assert updated.audio.input.turn_detection.eagerness == "high"
        assert updated.instructions == "Answer in one sentence."


async def test_typed_turn_streams_the_openai_event_sequence(bridge: RealtimeBridge) -> None:
    async with connect(bridge) as conn:
        await until(conn, "session.created")
        await conn.conversation.item.create(item=user_message("Hello"))
        await conn.response.create()
        events = await until(conn, "response.done")
        names = types(events)
        assert names[:2] == ["conversation.item.added", "conversation.item.done"]
        assert events[0].item.content[0].text == "Hello"
        start = names.index("response.created")
        assert names[start : start + 4] == [
            "response.created", "response.output_item.added", "conversation.item.added",
            "response.content_part.added",
        ]  # fmt: skip
        assert names[-6:] == [
            "response.output_audio.done", "response.output_audio_transcript.done", "response.content_part.done",
            "response.output_item.done", "conversation.item.done", "response.done",
        ]  # fmt: skip
        text = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        assert text == "Turn 1. You said: Hello."
        audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
        assert len(audio) > 0 and len(audio) % 2 == 0
        done = events[-1].response
        assert done.status == "completed"
        assert done.output[0].content[0].transcript == text
        assert done.usage.output_token_details.audio_tokens > 0
        assert done.usage.output_token_details.text_tokens > 0
        ids = {e.response_id for e in events if e.type.startswith("response.output_audio")}
        assert ids == {done.id}
        assert len({e.event_id for e in events}) == len(events)


async def test_spoken_turn_under_server_vad_with_input_transcription(
    start_server: StartServer, bridge_for: Callable[..., Awaitable[RealtimeBridge]]
) -> None:
    # speculation off: with audio sent faster than real time, a released speculative response can stall
    # after its first text (seen over plain gRPC too, without the bridge); this test is about the bridge
    bridge = await bridge_for(await start_server(speculative=False))
    utterance = speech("What is the weather like today", 24_000, before_ms=300, after_ms=1200)
    async with connect(bridge) as conn:
        await until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "audio": {"input": {
            "transcription": {"model": "lfm2"}, "turn_detection": {"type": "server_vad"}}}})  # fmt: skip
        await until(conn, "session.updated")
        pcm = utterance.pcm16
        step = 24_000 * 2 // 10  # 100 ms
        for start in range(0, len(pcm), step):
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[start : start + step]).decode())
        events = await until(conn, "response.done")
        names = types(events)
        for name in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed"):  # fmt: skip
            assert name in names
        assert names.index("input_audio_buffer.speech_stopped") < names.index("input_audio_buffer.committed")
        started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
        committed = next(e for e in events if e.type == "input_audio_buffer.committed")
        assert started.item_id == committed.item_id
        assert abs(started.audio_start_ms - utterance.speech_start_ms) < 400
        answer = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        assert answer.startswith("Turn 1. I heard")
        transcription = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
        if not transcription:
            transcription = [(await until(conn, "conversation.item.input_audio_transcription.completed"))[-1]]
        assert transcription[0].item_id == committed.item_id
        assert transcription[0].transcript  # the model's own transcript of the turn
        # the usage is the committed turn's audio: at least the speech, at most all that was sent
        assert committed_seconds(events) <= transcription[0].usage.seconds <= utterance.duration_ms / 1000


async def test_push_to_talk_buffers_clears_and_commits(bridge: RealtimeBridge) -> None:
    tone = speech("Push to talk", 24_000, after_ms=200).pcm16
    async with connect(bridge) as conn:
        await until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        assert (await until(conn, "session.updated"))[-1].session.audio.input.turn_detection is None
        await conn.input_audio_buffer.commit()
        error = (await until(conn, "error"))[-1].error
        assert error.code == "input_audio_buffer_commit_empty"
        await conn.input_audio_buffer.append(audio=base64.b64encode(tone).decode())
        await conn.input_audio_buffer.clear()
        await until(conn, "input_audio_buffer.cleared")
        await conn.input_audio_buffer.commit()
        assert (await until(conn, "error"))[-1].error.code == "input_audio_buffer_commit_empty"
        await conn.input_audio_buffer.append(audio=base64.b64encode(tone).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create(response={"metadata": {"turn": "ptt"}})  # claims the commit's response
        events = await until(conn, "response.done")
        assert "input_audio_buffer.committed" in types(events)
        assert events[-1].response.metadata == {"turn": "ptt"}
        seconds = len(tone) / 2 / 24_000
        answer = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        assert answer == f"Turn 1. I heard {seconds:.1f} seconds of audio."
        # one response only: a typed turn next is Turn 2
        await conn.conversation.item.create(item=user_message("again"))
        await conn.response.create()
        events = await until(conn, "response.done")
        assert types(events).count("response.created") == 1
        assert events[-1].response.output[0].content[0].transcript == "Turn 2. You said: again."


async def test_cancel_ends_the_response_cancelled(start_server: StartServer, bridge_for: Any) -> None:
    bridge = await bridge_for(await start_server(scripted_step_ms=5))
    async with connect(bridge) as conn:
        await until(conn, "session.created")
        await conn.response.cancel()
        assert (await until(conn, "error"))[-1].error.code == "response_cancel_not_active"
        await conn.conversation.item.create(item=user_message("a long answer #frames=600"))
        await conn.response.create()
        await until(conn, "response.output_audio.delta")
        await conn.response.create()  # one response at a time
        events = await until(conn, "error")
        assert events[-1].error.code == "conversation_already_has_active_response"
        await conn.response.cancel()
        done = (await until(conn, "response.done"))[-1].response
        assert done.status == "cancelled"
        assert done.status_details.reason == "client_cancelled"
        assert done.usage.output_token_details.audio_tokens < 600


async def test_truncate_keeps_what_was_heard(bridge: RealtimeBridge) -> None:
    async with connect(bridge) as conn:
        await until(conn, "session.created")
        await conn.conversation.item.create(item=user_message("tell me more #frames=40"))
        await conn.response.create()
        done = (await until(conn, "response.done"))[-1].response
        item_id = done.output[0].id
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=800)
        truncated = (await until(conn, "conversation.item.truncated"))[-1]
        assert (truncated.item_id, truncated.audio_end_ms) == (item_id, 800)
        await conn.conversation.item.truncate(item_id="item_nope", content_index=0, audio_end_ms=10)
        error = (await until(conn, "error"))[-1].error
        assert (error.code, error.param) == ("item_not_found", "item_id")
        # the model remembers what was heard: the scripted model says so in its next answer
        await conn.conversation.item.create(item=user_message("and?"))
        await conn.response.create()
        text = (await until(conn, "response.done"))[-1].response.output[0].content[0].transcript
        assert text.startswith("(You heard 800 ms of my last answer.)")


async def test_text_only_output(bridge: RealtimeBridge) -> None:
    async with connect(bridge) as conn:
        await until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await until(conn, "session.updated")
        await conn.conversation.item.create(item=user_message("Hi"))
        await conn.response.create()
        events = await until(conn, "response.done")
        assert "response.output_audio.delta" not in types(events)
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Turn 1. You said: Hi."
        assert events[-1].response.output_modalities == ["text"]


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        ({"type": "session.update", "session": {"type": "realtime", "tools": [{"type": "function", "name": "f"}]}},
         "unsupported", "session.tools"),
        ({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "format": {"type": "audio/pcmu"}}}}}, "unsupported", "session.audio.input.format"),
        ({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "create_response": False}}}}},
         "unsupported", "session.audio.input.turn_detection.create_response"),
        ({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "threshold": 2.0}}}}},
         "invalid_value", "session.audio.input.turn_detection.threshold"),
        ({"type": "session.update", "session": {"type": "realtime", "modalities": ["text"]}},
         "unsupported", "session.modalities"),
        ({"type": "session.update", "session": {"type": "realtime", "max_output_tokens": 10**6}},
         "invalid_value", "session.max_output_tokens"),
        ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "invalid_value", "audio"),
        ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}, "invalid_value", "audio"),
        ({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c",
                                                       "output": "{}"}}, "unsupported", "item.type"),
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_image", "image_url": "data:"}]}}, "unsupported", "item.content[0].type"),
        ({"type": "conversation.item.delete", "item_id": "x"}, "unsupported_event", "type"),
        ({"type": "output_audio_buffer.clear"}, "unsupported_event", "type"),
        ({"type": "response.create", "response": {"tools": [{"type": "function", "name": "f"}]}},
         "unsupported", "response.tools"),
        ({"type": "response.create", "response": {"output_modalities": ["text"]}},
         "unsupported", "response.output_modalities"),
        ({"no": "type"}, "unsupported_event", "type"),
    ],
)  # fmt: skip
async def test_bad_events_get_an_error_and_the_session_goes_on(
    bridge: RealtimeBridge, event: dict[str, Any], code: str, param: str
) -> None:
    async with connect(bridge) as conn:
        await until(conn, "session.created")
        await conn.send_raw(json.dumps({"event_id": "evt_bad", **event}))
        error = (await until(conn, "error"))[-1].error
        assert (error.code, error.param) == (code, param), error
        assert error.event_id == "evt_bad"
        await conn.conversation.item.create(item=user_message("still here"))
        await conn.response.create()
        done = (await until(conn, "response.done"))[-1].response
        assert done.output[0].content[0].transcript == "Turn 1. You said: still here."


async def test_malformed_frames_get_errors(bridge: RealtimeBridge) -> None:
    async with connect(bridge) as conn:
        await until(conn, "session.created")
        for raw in ("{not json", "[1, 2]", "[" * 100_000, b"\x00\x01binary"):
            await conn.send_raw(raw)
            error = (await until(conn, "error"))[-1].error
            assert error.code in ("invalid_json", "invalid_event"), error
        # typed items before the first turn move with the stream when new instructions reopen it (Pipecat
        # sends its context's items before its instructions)
        await conn.conversation.item.create(item=user_message("first"))
        await conn.session.update(session={"type": "realtime", "instructions": "Be brief."})
        assert (await until(conn, "session.updated"))[-1].session.instructions == "Be brief."
        await conn.response.create()
        done = (await until(conn, "response.done"))[-1].response
        assert done.output[0].content[0].transcript == "Turn 1. You said: first."
        # once a turn is committed the conversation lives on the stream: new instructions are refused
        await conn.session.update(session={"type": "realtime", "instructions": "late"})
        error = (await until(conn, "error"))[-1].error
        assert (error.code, error.param) == ("unsupported", "session.instructions")
        await conn.conversation.item.retrieve(item_id=done.output[0].id)
        retrieved = (await until(conn, "conversation.item.retrieved"))[-1].item
        assert retrieved.content[0].transcript == "Turn 1. You said: first."


async def test_what_livekit_and_pipecat_send_is_accepted(bridge: RealtimeBridge) -> None:
    fmt = {"type": "audio/pcm", "rate": 24_000}
    livekit_session = {
        "type": "realtime", "model": "lfm2", "output_modalities": ["audio"], "instructions": "You are helpful.",
        "audio": {
            "input": {"format": fmt, "noise_reduction": {"type": "near_field"},
                      "transcription": {"model": "gpt-4o-mini-transcribe"},
                      "turn_detection": {"type": "semantic_vad", "create_response": True, "eagerness": "auto",
                                         "interrupt_response": True}},
            "output": {"format": fmt, "speed": 1.0, "voice": "marin"},
        },
        "max_output_tokens": "inf", "tool_choice": "auto", "tracing": None,
    }  # fmt: skip
    async with connect(bridge) as conn:
        await until(conn, "session.created")
        await conn.send_raw(json.dumps({"type": "session.update", "session": livekit_session}))
        events = await until(conn, "session.updated")
        assert "error" not in types(events)
        session = events[-1].session
        assert session.audio.input.turn_detection.type == "semantic_vad"
        assert session.instructions == "You are helpful."
        # LiveKit's generate_reply: per-response instructions (sent as the turn's text) and its event id
        response = {"instructions": "Greet the user", "metadata": {"client_event_id": "r1"}, "tool_choice": "auto"}
        await conn.send_raw(json.dumps({"type": "response.create", "response": response}))
        events = await until(conn, "response.done")
        created = next(e for e in events if e.type == "response.created")
        assert created.response.metadata == {"client_event_id": "r1"}
        assert events[-1].response.output[0].content[0].transcript == "Turn 1. You said: Greet the user."
        # Pipecat: turn_detection false, its context as items, response.create with output_modalities
        off = {"type": "realtime", "audio": {"input": {"turn_detection": False}}}
        await conn.send_raw(json.dumps({"type": "session.update", "session": off}))
        assert (await until(conn, "session.updated"))[-1].session.audio.input.turn_detection is None
        await conn.conversation.item.create(item={"id": "ctx_1", **user_message("From the context")})
        added = (await until(conn, "conversation.item.added"))[-1]
        assert added.item.id == "ctx_1"
        await conn.send_raw(json.dumps({"type": "response.create", "response": {"output_modalities": ["audio"]}}))
        events = await until(conn, "response.done")
        assert "error" not in types(events)
        assert events[-1].response.output[0].content[0].transcript == "Turn 2. You said: From the context."


async def test_a_late_response_create_claims_the_commits_response(bridge: RealtimeBridge) -> None:
    pcm = speech("Push to talk", 24_000).pcm16
    async with connect(bridge) as conn:
        await until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        await until(conn, "session.updated")
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm).decode())
        await conn.input_audio_buffer.commit()
        await until(conn, "response.done")  # the server answered the commit before the client asked
        await conn.response.create()  # claims that response: no second one, no error
        await conn.conversation.item.create(item=user_message("next"))
        await conn.response.create()
        events = await until(conn, "response.done")
        assert "error" not in types(events)
        assert types(events).count("response.created") == 1
        assert events[-1].response.output[0].content[0].transcript == "Turn 2. You said: next."


async def test_instructions_the_server_refuses_keep_the_old_session(
    start_server: StartServer, bridge_for: Callable[..., Awaitable[RealtimeBridge]]
) -> None:
    bridge = await bridge_for(await start_server(max_text_chars=100))
    async with connect(bridge) as conn:
        await until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "instructions": "Be brief."})
        await until(conn, "session.updated")
        await conn.session.update(session={"type": "realtime", "instructions": "x" * 101})
        error = (await until(conn, "error"))[-1].error
        assert (error.code, error.param) == ("invalid_value", "session.instructions")
        assert "100 characters" in error.message
        await conn.conversation.item.create(item=user_message("still fine"))
        await conn.response.create()
        done = (await until(conn, "response.done"))[-1].response
        assert done.output[0].content[0].transcript == "Turn 1. You said: still fine."

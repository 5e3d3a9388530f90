"""One OpenAI Realtime WebSocket session, relayed onto one Converse stream.

Two tasks per session, each owned by `RealtimeSession.run`: `read-client`
turns client events into Converse requests, `relay` turns Converse events into
server events. Neither has a queue of its own: each awaits the next hop, so a
slow WebSocket reader pushes back through gRPC flow control onto the server,
whose outbox coalesces text, merges audio and finally fails a response it
cannot deliver (bounded memory whatever the client does). The one buffer is
the push-to-talk audio buffer, capped at the server's longest turn.

A `session.update` that changes what only a stream's first message can carry
(instructions, input transcription) reopens the stream until the first turn is
committed or audio reaches the server (typed items move along), and is refused
after that.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import grpc
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from uvicorn.protocols.utils import ClientDisconnected

from clients.aio import Conversation, Event, VoiceChatClient, VoiceChatError
from realtime import protocol as rt
from realtime.protocol import ClientError, SessionState
from voicechat.v1 import voicechat_pb2 as pb

log = logging.getLogger(__name__)

SESSION_SECONDS = 3600  # reported as expires_at when the server sets no limit
MAX_ITEMS = 64  # conversation items the bridge remembers for conversation.item.retrieve (older ones: not found)
MAX_PENDING_TEXTS = 64  # typed items one turn may gather before response.create; more are refused

# WebSocket close codes for the ways a Converse stream ends (RFC 6455 section 7.4.1)
CLOSE_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 1000,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 1013,  # try again later: the server is full
    grpc.StatusCode.UNAVAILABLE: 1012,  # service restart: loading or draining
    grpc.StatusCode.UNAUTHENTICATED: 1008,  # policy violation
    grpc.StatusCode.PERMISSION_DENIED: 1008,
    grpc.StatusCode.INVALID_ARGUMENT: 1008,
    grpc.StatusCode.FAILED_PRECONDITION: 1008,
    grpc.StatusCode.DEADLINE_EXCEEDED: 1001,  # going away: idle timeout
    grpc.StatusCode.OUT_OF_RANGE: 1001,  # going away: session time limit
}
_CONFIG_ONLY = ("instructions", "transcription")  # SessionConfig fields an UpdateConfig cannot change
_OPENAI_PARAM = {  # the contract's field names in errors -> the client's
    "config.system_prompt": "session.instructions",
    "config.sampling.max_new_tokens": "session.max_output_tokens",
    "update_config.sampling.max_new_tokens": "session.max_output_tokens",
    "text.text": "item.content",
    "audio.pcm16": "audio",
}


def openai_param(grpc_field: str) -> str:
    if grpc_field in _OPENAI_PARAM:
        return _OPENAI_PARAM[grpc_field]
    for prefix in ("config.turn_detection.", "update_config.turn_detection."):
        if grpc_field.startswith(prefix):
            return "session.audio.input.turn_detection." + grpc_field.removeprefix(prefix)
    return grpc_field


@dataclass
class _Response:
    """A response as the bridge tracks it: its assistant item, its metadata, the truncate asked for."""

    id: str
    item_id: str
    metadata: Any = None
    # audio_end_ms of the latest truncate not answered yet (the server may answer several with one)
    truncate_ms: int | None = None


class RealtimeSession:
    """Relays one WebSocket to one Converse stream (reopened at most while empty)."""

    def __init__(self, ws: WebSocket, client: VoiceChatClient, initial: Any = None) -> None:
        self.ws = ws
        self.client = client
        self.state = SessionState()
        self._initial = initial  # a client secret's session object, applied before the stream opens
        self._send_lock = asyncio.Lock()
        self._event_ids = itertools.count(1)
        self._item_ids = itertools.count(1)
        self._stack: AsyncExitStack | None = None
        self.conv: Conversation | None = None
        self._conv_ready = asyncio.Event()
        self._started: pb.SessionStarted | None = None
        self._used = False  # audio went to the current stream, or a turn was committed: no more reopening
        self._pending_texts: list[str] = []  # typed text of the turn in progress, re-sent when reopening
        self._responses: dict[str, _Response] = {}  # by response id, the latest few
        self._by_item: dict[str, str] = {}  # assistant item id -> response id
        self._active: str | None = None  # the response being generated
        self._awaiting_claim = False  # a client commit started a response that a response.create may claim
        self._speech_item: str | None = None  # user item of the speech in progress (server VAD)
        self._text_items: list[str] = []  # typed user items waiting for their turn
        self._last_item: str | None = None
        self._next_metadata: Any = None
        self._manual_audio: list[bytes] = []  # push-to-talk audio held until commit (input_audio_buffer)
        self._manual_bytes = 0
        self._expires_at = 0
        # spoken turn id -> (user item id, seconds of audio), until its input transcript arrives
        self._turn_items: dict[str, tuple[str, float]] = {}
        self._failure: VoiceChatError | None = None  # why a reopen left the session without a stream
        self._items: dict[str, dict[str, Any]] = {}  # the latest MAX_ITEMS items, for conversation.item.retrieve
        self._default_tokens = 0  # the server's max_new_tokens default, for "inf"

    # -- plumbing ---------------------------------------------------------------

    async def send(self, event: dict[str, Any]) -> None:
        event = {"event_id": f"event_{next(self._event_ids)}", **event}
        data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        async with self._send_lock:  # the two tasks both send; a WebSocket takes one send at a time
            await self.ws.send_text(data)

    async def error(self, exc: ClientError, event_id: str = "") -> None:
        await self.send(rt.error_event(exc.message, kind=exc.kind, code=exc.code, param=exc.param, event_id=event_id))

    def _new_item_id(self) -> str:
        return f"item_{next(self._item_ids):06d}"

    def _remember(self, item: dict[str, Any]) -> None:
        self._items.pop(item["id"], None)
        self._items[item["id"]] = item
        while len(self._items) > MAX_ITEMS:
            del self._items[next(iter(self._items))]

    @property
    def _manual(self) -> bool:
        return self.state.turn is None

    @property
    def _limits(self) -> pb.SessionLimits:
        return self._started.limits if self._started else pb.SessionLimits()

    async def _open(self) -> None:
        """Open a Converse stream for `self.state`; VoiceChatError when the server refuses it."""
        stack = AsyncExitStack()
        try:
            conv = await stack.enter_async_context(self.client.conversation(self.state.config()))
        except BaseException:
            await stack.aclose()
            raise
        self._stack, self.conv, self._used = stack, conv, False
        for text in self._pending_texts:  # typed items of a turn not yet committed move to the new stream
            await conv.send_text(text, defer=True)
        assert conv.session is not None
        self._started = conv.session
        if self.state.max_output_tokens is None:
            self._default_tokens = conv.session.config.sampling.max_new_tokens
        limit = conv.session.limits.max_session_seconds or SESSION_SECONDS
        self._expires_at = rt.now_s() + limit
        self._conv_ready.set()

    async def _close_stream(self) -> None:
        self._conv_ready.clear()
        stack, self._stack, self.conv = self._stack, None, None
        if stack is not None:
            await stack.aclose()  # cancels the call

    def _session_event(self, kind: str) -> dict[str, Any]:
        assert self._started is not None
        return {"type": kind, "session": rt.session_object(self.state, self._started, self._expires_at)}

    # -- lifecycle ----------------------------------------------------------------

    async def run(self) -> None:
        """Serve the session until the client leaves or the stream ends."""
        if self._initial is not None:
            self.state = rt.apply_session(self.state, self._initial)  # checked when the secret was made
        try:
            await self._open()
        except VoiceChatError as exc:
            await self._end(exc.code, exc.details)
            return
        assert self._started is not None
        log.info("realtime session %s opened", self._started.session_id)
        await self.send(self._session_event("session.created"))
        sid = self._started.session_id
        reader = asyncio.create_task(self._read_client(), name=f"read-client {sid}")
        relay = asyncio.create_task(self._relay(), name=f"relay {sid}")
        try:
            done, _ = await asyncio.wait({reader, relay}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if isinstance(error := task.exception(), WebSocketDisconnect | ClientDisconnected):
                    continue  # the client left: nothing to report to it
                if error is not None:
                    # a bug in the bridge: one log line with the traceback, the client gets 1011
                    log.error("realtime session %s failed", sid, exc_info=error)
                    await self._end(grpc.StatusCode.INTERNAL, "internal error in the realtime bridge")
                elif task is relay and (ended := relay.result()) is not None:
                    await self._end(*ended)
        finally:
            for task in (reader, relay):
                task.cancel()
            # the tasks' own errors were reported where they happened; here they only have to be gone
            await asyncio.gather(reader, relay, return_exceptions=True)
            await self._close_stream()
            log.info("realtime session %s closed", self._started.session_id)

    async def _end(self, code: grpc.StatusCode, details: str) -> None:
        """Report how the stream ended and close the WebSocket with the matching code."""
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, ClientDisconnected, RuntimeError, OSError):
                if code != grpc.StatusCode.OK:
                    kind = "invalid_request_error" if CLOSE_CODES.get(code) == 1008 else "server_error"
                    await self.send(rt.error_event(details or code.name, kind=kind, code=code.name.lower()))
                reason = (details or code.name).encode()[:120].decode("utf-8", "ignore")
                await self.ws.close(CLOSE_CODES.get(code, 1011), reason)

    # -- client -> server -----------------------------------------------------------

    async def _read_client(self) -> None:
        handlers: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.truncate": self._truncate,
            "conversation.item.retrieve": self._retrieve,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
        }
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self.error(ClientError("binary frames are not supported: send JSON events as text",
                                             code="invalid_json"))  # fmt: skip
                continue
            try:
                event = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                await self.error(ClientError(f"the message is not valid JSON: {exc}", code="invalid_json"))
                continue
            if not isinstance(event, dict):
                await self.error(ClientError("an event must be a JSON object", code="invalid_event"))
                continue
            raw_id = event.get("event_id")
            event_id = raw_id if isinstance(raw_id, str) else ""
            kind = event.get("type")
            handler = handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                await self.error(ClientError(f"unsupported event type {kind!r}", "type", "unsupported_event"),
                                 event_id)  # fmt: skip
                continue
            try:
                await handler(event)
            except ClientError as exc:
                await self.error(exc, event_id or "")
            except VoiceChatError as exc:
                # a write to a stream that has just ended: the relay reports the end
                log.debug("client event %s not delivered: %s", kind, exc)

    async def _conversation(self) -> Conversation:
        """The current stream, once open; VoiceChatError when a reopen could not open one."""
        await self._conv_ready.wait()
        if self.conv is None:
            assert self._failure is not None
            raise self._failure
        return self.conv

    async def _session_update(self, event: dict[str, Any]) -> None:
        new = rt.apply_session(self.state, event.get("session"))
        most = self._limits.max_new_tokens
        if new.max_output_tokens is not None and most and new.max_output_tokens > most:
            raise ClientError(f"session.max_output_tokens must be at most {most} (the server's limit), "
                              f"got {new.max_output_tokens}", "session.max_output_tokens")  # fmt: skip
        reopen = any(getattr(new, name) != getattr(self.state, name) for name in _CONFIG_ONLY)
        if reopen and self._used:
            changed = next(name for name in _CONFIG_ONLY if getattr(new, name) != getattr(self.state, name))
            param = "session.instructions" if changed == "instructions" else "session.audio.input.transcription"
            raise ClientError(f"{param} can change only before the conversation's first input "
                              "(open a new session for new instructions)", param, "unsupported")  # fmt: skip
        old = self.state
        if reopen:
            await self._reopen(new)
        elif new != old:
            conv = await self._conversation()
            update = pb.UpdateConfig(turn_detection=rt.turn_detection(new.turn))
            if new.max_output_tokens != old.max_output_tokens:
                update.sampling.max_new_tokens = new.max_output_tokens or self._default_tokens
            self.state = new
            if old.turn is None and new.turn is not None:
                await self._flush_manual(conv)  # held push-to-talk audio now belongs to the VAD's turn
            await conv.update(sampling=update.sampling, turn_detection=update.turn_detection)
            # the server validates asynchronously: an invalid value arrives as an `error` event
            self._started = _with_config(self._started, new, self._default_tokens)
        await self.send(self._session_event("session.updated"))

    async def _reopen(self, new: SessionState) -> None:
        """Replace the stream by one opened with `new`; the old settings stay when the server refuses them.

        When no stream can be opened at all the session ends with the server's status (the relay reports it)."""
        old = self.state
        await self._close_stream()
        self.state = new
        try:
            await self._open_again()
            return
        except VoiceChatError as exc:
            refused = exc
        if refused.code == grpc.StatusCode.INVALID_ARGUMENT:
            self.state = old
            try:
                await self._open_again()
            except VoiceChatError as exc:
                self._give_up(exc)
            raise ClientError(refused.details, _param_from_details(refused.details), "invalid_value")
        self._give_up(refused)
        raise ClientError(f"the server refused the new session: {refused.details}", "session",
                          refused.code.name.lower(), "server_error")  # fmt: skip

    async def _open_again(self) -> None:
        # the slot this session just gave back may not be free yet when the server is full: a short backoff
        for delay in (0.05, 0.2, 0.5, None):
            try:
                await self._open()
                return
            except VoiceChatError as exc:
                if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED or delay is None:
                    raise
            await asyncio.sleep(delay)

    def _give_up(self, exc: VoiceChatError) -> None:
        self._failure = exc
        self._conv_ready.set()  # wakes the relay, which ends the session with this status

    async def _append(self, event: dict[str, Any]) -> None:
        pcm = rt.decode_audio(event.get("audio"))
        if not pcm:
            return
        if self._manual:
            cap = self._limits.max_turn_ms * rt.RATE_HZ // 1000 * 2 or 1 << 24
            if self._manual_bytes + len(pcm) > cap:
                raise ClientError(f"input_audio_buffer is full ({cap // 48} ms, the server's longest turn): "
                                  "commit or clear it", "audio", "input_audio_buffer_full")  # fmt: skip
            self._manual_audio.append(pcm)
            self._manual_bytes += len(pcm)
            return
        await self._send_audio(await self._conversation(), pcm)

    async def _send_audio(self, conv: Conversation, pcm: bytes) -> None:
        self._used = True
        step = max(2, (self._limits.max_message_bytes or 1 << 20) // 2 // 2 * 2)  # well below the message limit
        for start in range(0, len(pcm), step):
            await conv.send_audio(pcm[start : start + step])

    async def _flush_manual(self, conv: Conversation) -> None:
        held, self._manual_audio, self._manual_bytes = self._manual_audio, [], 0
        for pcm in held:
            await self._send_audio(conv, pcm)

    async def _commit(self, event: dict[str, Any]) -> None:
        conv = await self._conversation()
        if self._manual and not self._manual_bytes:
            raise ClientError("the input audio buffer is empty", "", "input_audio_buffer_commit_empty")
        await self._flush_manual(conv)
        await self._commit_turn(conv)
        # without turn detection an OpenAI client follows its commit with response.create; that one is
        # answered by the response the server already started (with server VAD, OpenAI answers a commit too)
        self._awaiting_claim = self._manual

    async def _commit_turn(self, conv: Conversation) -> None:
        self._used = True
        self._pending_texts = []
        await conv.commit()

    async def _clear(self, event: dict[str, Any]) -> None:
        if not self._manual:
            raise ClientError("input_audio_buffer.clear works only without turn detection: with server VAD "
                              "the server holds the audio", "type", "unsupported")  # fmt: skip
        self._manual_audio, self._manual_bytes = [], 0
        await self.send({"type": "input_audio_buffer.cleared"})

    async def _item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        text = rt.user_text(item)
        assert isinstance(item, dict)  # user_text checked it
        if len(text) > (self._limits.max_text_chars or 4000):
            raise ClientError(f"the text is longer than {self._limits.max_text_chars} characters", "item.content")
        if len(self._pending_texts) >= MAX_PENDING_TEXTS:
            raise ClientError(f"at most {MAX_PENDING_TEXTS} items wait for a response: send response.create",
                              "item", "too_many_items")  # fmt: skip
        previous = event.get("previous_item_id")
        if previous not in (None, self._last_item):
            raise ClientError("previous_item_id: items can only be added at the end", "previous_item_id",
                              "unsupported")  # fmt: skip
        conv = await self._conversation()
        given = item.get("id")
        item_id = given if isinstance(given, str) and given else self._new_item_id()
        await conv.send_text(text, defer=True)
        self._pending_texts.append(text)
        self._text_items.append(item_id)
        prev, self._last_item = self._last_item, item_id
        body = rt.user_item(item_id, text=text)
        self._remember(body)
        await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": body})
        await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": body})

    async def _response_create(self, event: dict[str, Any]) -> None:
        params = event.get("response") or {}
        if not isinstance(params, dict):
            raise ClientError("response must be an object", "response")
        instructions = rt.response_params(params, self.state)
        if self._awaiting_claim:
            # the server answers a commit at once; the response.create that follows it is that answer's
            self._awaiting_claim = False
            if instructions:
                raise ClientError("response.instructions: the response to the committed audio has already "
                                  "started", "response.instructions", "unsupported")  # fmt: skip
            if self._active is not None:
                self._responses[self._active].metadata = params.get("metadata")
            else:
                self._next_metadata = params.get("metadata")
            return
        if self._active is not None:
            raise ClientError(f"response {self._active} is in progress", "",
                              "conversation_already_has_active_response")  # fmt: skip
        conv = await self._conversation()
        await self._flush_manual(conv)
        if instructions:
            # the contract has no per-response instructions: they join the turn as its (last) text
            await conv.send_text(instructions, defer=True)
        self._next_metadata = params.get("metadata")
        await self._commit_turn(conv)

    async def _retrieve(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        item = self._items.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise ClientError(f"no item {item_id!r} among this session's latest {MAX_ITEMS}",
                              "item_id", "item_not_found")  # fmt: skip
        await self.send({"type": "conversation.item.retrieved", "item": item})

    async def _response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        if self._active is None or wanted not in (None, "", self._active):
            raise ClientError("there is no active response to cancel", "response_id", "response_cancel_not_active")
        conv = await self._conversation()
        await conv.cancel(self._active)

    async def _truncate(self, event: dict[str, Any]) -> None:
        item_id, played = event.get("item_id"), event.get("audio_end_ms")
        response_id = self._by_item.get(item_id) if isinstance(item_id, str) else None
        if response_id is None:
            raise ClientError(f"no assistant item {item_id!r} in this session", "item_id", "item_not_found")
        if event.get("content_index", 0) != 0:
            raise ClientError("content_index must be 0", "content_index")
        if not isinstance(played, int) or isinstance(played, bool) or played < 0:
            raise ClientError("audio_end_ms must be a non-negative integer", "audio_end_ms")
        conv = await self._conversation()
        self._responses[response_id].truncate_ms = played
        await conv.truncate(response_id, played)

    # -- server -> client -----------------------------------------------------------

    async def _relay(self) -> tuple[grpc.StatusCode, str] | None:
        """Relay events until a stream ends on its own; returns its status (None: the client left first)."""
        while True:
            try:
                conv = await self._conversation()
            except VoiceChatError as exc:
                return exc.code, exc.details
            try:
                async for event in conv.events():
                    if event.kind != "session_started":
                        await self._translate(event)
            except VoiceChatError as exc:
                if conv is self.conv:
                    return exc.code, exc.details
                continue  # reopened: read the new stream
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError from a read on a call cancelled locally: a reopen did that
                task = asyncio.current_task()
                if conv is self.conv or (task is not None and task.cancelling()):
                    raise
                continue
            if conv is self.conv:
                return grpc.StatusCode.OK, "the session ended"

    async def _translate(self, event: Event) -> None:
        data = event.data
        kind = event.kind
        resp = self._responses.get(getattr(data, "response_id", ""))
        if kind == "audio_chunk":
            if resp is not None and not self.state.text_only:
                await self.send({"type": "response.output_audio.delta", "response_id": resp.id,
                                 "item_id": resp.item_id, "output_index": 0, "content_index": 0,
                                 "delta": base64.b64encode(data.pcm16).decode("ascii")})  # fmt: skip
        elif kind == "text_delta" and resp is not None:
            name = "response.output_text.delta" if self.state.text_only else "response.output_audio_transcript.delta"
            await self.send({"type": name, "response_id": resp.id, "item_id": resp.item_id, "output_index": 0,
                             "content_index": 0, "delta": data.text})  # fmt: skip
        elif kind == "speech_started":
            self._speech_item = self._speech_item or self._new_item_id()
            await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": data.audio_start_ms,
                             "item_id": self._speech_item})  # fmt: skip
        elif kind == "speech_stopped":
            self._speech_item = self._speech_item or self._new_item_id()
            await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": data.audio_end_ms,
                             "item_id": self._speech_item})  # fmt: skip
        elif kind == "turn_committed":
            await self._turn_committed(data)
        elif kind == "response_started":
            await self._response_started(data)
        elif kind == "response_ended":
            await self._response_ended(data)
        elif kind == "input_transcription":
            item_id, seconds = self._turn_items.pop(data.turn_id, ("", 0.0))
            if item_id in self._items:
                self._items[item_id]["content"][0]["transcript"] = data.text
            if item_id:
                await self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                                 "content_index": 0, "transcript": data.text,
                                 "usage": {"type": "duration", "seconds": seconds}})  # fmt: skip
        elif kind == "response_truncated":
            if resp is not None:
                played = data.audio_kept_ms if resp.truncate_ms is None else resp.truncate_ms
                resp.truncate_ms = None
                if resp.item_id in self._items:  # what the model now remembers of the reply
                    part = self._items[resp.item_id]["content"][0]
                    part["transcript" if "transcript" in part else "text"] = data.heard_text
                await self.send({"type": "conversation.item.truncated", "item_id": resp.item_id,
                                 "content_index": 0, "audio_end_ms": played})  # fmt: skip
        elif kind == "error":
            code = data.code.lower()
            kind_ = "invalid_request_error" if code in ("invalid_argument", "failed_precondition") else "server_error"
            await self.send(rt.error_event(data.message, kind=kind_, code=code, param=openai_param(data.field)))
        elif kind == "go_away":
            await self.send(rt.error_event(f"the server will end this session in {data.time_left_ms} ms "
                                           f"({data.reason})", kind="server_error", code="session_ending"))  # fmt: skip
        # playback_interrupted: speech_started came first and response.done says turn_detected; metrics: not relayed

    async def _turn_committed(self, data: pb.TurnCommitted) -> None:
        texts, self._text_items = self._text_items, []
        if data.audio_duration_ms == 0 and texts:
            return  # a typed turn: its items were announced when created, and it gets no transcript
        item_id = self._speech_item or self._new_item_id()
        self._speech_item = None
        self._turn_items[data.turn_id] = (item_id, data.audio_duration_ms / 1000)
        while len(self._turn_items) > 16:  # transcripts arrive soon after the commit; keep the latest few
            self._turn_items.pop(next(iter(self._turn_items)))
        prev, self._last_item = self._last_item, item_id
        item = rt.user_item(item_id, transcript=None)
        self._remember(item)
        await self.send({"type": "input_audio_buffer.committed", "previous_item_id": prev, "item_id": item_id})
        await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": item})

    def _response_json(self, resp: _Response, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = self._started.config.sampling.max_new_tokens if self._started else 0
        return rt.response_object(resp.id, status, output=output, text_only=self.state.text_only, max_tokens=tokens,
                                  metadata=resp.metadata)  # fmt: skip

    async def _response_started(self, data: pb.ResponseStarted) -> None:
        resp = _Response(data.response_id, "item_" + data.response_id, metadata=self._next_metadata)
        self._next_metadata = None
        self._responses[resp.id] = resp
        while len(self._responses) > 8:  # truncate and cancel name recent responses only
            old = next(iter(self._responses))
            self._by_item.pop(self._responses.pop(old).item_id, None)
        self._by_item[resp.item_id] = resp.id
        self._active = resp.id
        prev, self._last_item = self._last_item, resp.item_id
        item = rt.assistant_item(resp.item_id, "", "in_progress", self.state.text_only)
        part = item["content"][0]
        await self.send({"type": "response.created", "response": self._response_json(resp, "in_progress", [])})
        await self.send({"type": "response.output_item.added", "response_id": resp.id, "output_index": 0,
                         "item": item})  # fmt: skip
        await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
        await self.send({"type": "response.content_part.added", "response_id": resp.id, "item_id": resp.item_id,
                         "output_index": 0, "content_index": 0, "part": part})  # fmt: skip

    async def _response_ended(self, data: pb.ResponseEnded) -> None:
        resp = self._responses.get(data.response_id)
        if resp is None:
            return
        if self._active == resp.id:
            self._active = None
        where = {"response_id": resp.id, "item_id": resp.item_id, "output_index": 0, "content_index": 0}
        text = data.text
        status = "completed" if data.status == pb.RESPONSE_STATUS_COMPLETED else "incomplete"
        item = rt.assistant_item(resp.item_id, text, status, self.state.text_only)
        self._remember(item)
        if self.state.text_only:
            await self.send({"type": "response.output_text.done", **where, "text": text})
        else:
            await self.send({"type": "response.output_audio.done", **where})
            await self.send({"type": "response.output_audio_transcript.done", **where, "transcript": text})
        await self.send({"type": "response.content_part.done", **where, "part": item["content"][0]})
        await self.send({"type": "response.output_item.done", "response_id": resp.id, "output_index": 0,
                         "item": item})  # fmt: skip
        await self.send({"type": "conversation.item.done", "previous_item_id": None, "item": item})
        await self.send(rt.response_done(data, self._response_json(resp, "completed", []), item))


def _with_config(
    started: pb.SessionStarted | None, state: SessionState, default_tokens: int
) -> pb.SessionStarted | None:
    """SessionStarted with the turn detection and max tokens an UpdateConfig just asked for."""
    if started is None:
        return None
    copy = pb.SessionStarted()
    copy.CopyFrom(started)
    wanted = rt.turn_detection(state.turn)
    copy.config.turn_detection.mode = wanted.mode
    for name in ("threshold", "prefix_padding_ms", "silence_duration_ms", "interrupt_response", "eagerness"):
        if wanted.HasField(name):
            setattr(copy.config.turn_detection, name, getattr(wanted, name))
    copy.config.sampling.max_new_tokens = state.max_output_tokens or default_tokens
    return copy


def _param_from_details(details: str) -> str:
    first = details.split(" ", 1)[0]
    return openai_param(first) if first.startswith("config.") else "session"

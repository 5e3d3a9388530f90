"""The bridge's HTTP side: `/v1/realtime` (WebSocket), client secrets, the browser page.

    bridge = RealtimeBridge(BridgeSettings(target="127.0.0.1:50051", port=8000))
    port = await bridge.start()          # http://127.0.0.1:8000/ and ws://127.0.0.1:8000/v1/realtime
    ...
    await bridge.stop()

The bridge is a client of the Converse contract: it holds one gRPC channel to
`target` and opens one Converse stream per WebSocket. With a token it requires
`Authorization: Bearer <token>` (or a client secret from
`POST /v1/realtime/client_secrets`, which browsers send as the WebSocket
subprotocol `openai-insecure-api-key.<secret>`, as OpenAI's do) and dials the
server with the same token. Tokens and secrets are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import socket
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from clients.aio import VoiceChatClient, VoiceChatError
from clients.connection import ConnectionOptions
from realtime import protocol as rt
from realtime.session import RealtimeSession

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
KEY_PROTOCOL = "openai-insecure-api-key."
MAX_SECRETS = 10_000  # live client secrets; beyond it POST /v1/realtime/client_secrets answers 429
SECRET_SECONDS = 600  # default lifetime of a client secret (OpenAI's default too)


@dataclass(frozen=True)
class BridgeSettings:
    """Where the bridge listens and which server it dials. `repr` hides the token."""

    connection: ConnectionOptions = field(default_factory=ConnectionOptions)
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free one
    # largest WebSocket message: an append of 1 MiB of PCM in base64 plus its envelope; larger ones close
    # the connection with 1009 (message too big)
    max_message_bytes: int = (1 << 20) * 4 // 3 + 4096
    drain_seconds: float = 5.0

    def __repr__(self) -> str:
        return (f"BridgeSettings(connection={self.connection!r}, host={self.host!r}, port={self.port}, "
                f"max_message_bytes={self.max_message_bytes})")  # fmt: skip


class _NoHandshakeDebug(logging.Filter):
    """Drops the websockets library's debug lines: they print every handshake header, Authorization and the
    subprotocol carrying a client secret included."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.DEBUG and "websockets" in record.pathname)


class _Secrets:
    """Short-lived client secrets: value -> (expiry, session object). Bounded by MAX_SECRETS."""

    def __init__(self) -> None:
        self._live: dict[str, tuple[float, Any]] = {}

    def _purge(self) -> None:
        now = time.time()
        for value in [v for v, (expires, _) in self._live.items() if expires <= now]:
            del self._live[value]

    def create(self, seconds: int, session: Any) -> tuple[str, int] | None:
        self._purge()
        if len(self._live) >= MAX_SECRETS:
            return None
        value = "ek_" + secrets.token_urlsafe(24)
        expires = int(time.time()) + seconds
        self._live[value] = (expires, session)
        return value, expires

    def check(self, value: str) -> tuple[bool, Any]:
        entry = self._live.get(value)
        if entry is None or entry[0] <= time.time():
            return False, None
        return True, entry[1]


class RealtimeBridge:
    """The ASGI app, its uvicorn server and its gRPC client."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.port = 0
        self._secrets = _Secrets()
        self._token = settings.connection.token.encode()
        self._client: VoiceChatClient | None = None
        self._connecting = asyncio.Lock()
        self._stack = AsyncExitStack()
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self.sessions: set[RealtimeSession] = set()
        self.session_class = RealtimeSession  # bench.realtime times the relay with a subclass
        self._idle = asyncio.Event()  # set while no session runs
        self._idle.set()
        self.app = Starlette(routes=[
            Route("/", self._page),
            Route("/healthz", self._health),
            Route("/v1/realtime/client_secrets", self._create_secret, methods=["POST"]),
            WebSocketRoute("/v1/realtime", self._realtime),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ])  # fmt: skip

    @property
    def url(self) -> str:
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.port}/"

    # -- auth -----------------------------------------------------------------------

    def _is_token(self, value: str) -> bool:
        return hmac.compare_digest(value.encode(), self._token)

    def _bearer(self, headers: Any) -> str | None:
        values = headers.getlist("authorization")
        if len(values) != 1:
            return None
        scheme, _, value = values[0].strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def _authorize(self, ws: WebSocket) -> tuple[bool, Any]:
        """(allowed, the client secret's session or None)."""
        bearer = self._bearer(ws.headers)
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        keys = [p.removeprefix(KEY_PROTOCOL) for p in offered if p.startswith(KEY_PROTOCOL)]
        for candidate in [c for c in (bearer, *keys) if c]:
            ok, session = self._secrets.check(candidate)
            if ok:
                return True, session
            if bearer is not None and candidate == bearer and self._token and self._is_token(candidate):
                return True, None
        return not self._token, None

    # -- routes ---------------------------------------------------------------------

    async def _page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    async def _health(self, request: Request) -> Response:
        client = await self._connected()
        try:
            status = await client.health(deadline_s=2.0)
        except VoiceChatError as exc:
            return JSONResponse({"status": exc.code.name}, status_code=503)
        return JSONResponse({"status": status}, status_code=200 if status == "SERVING" else 503)

    async def _create_secret(self, request: Request) -> Response:
        if self._token:
            bearer = self._bearer(request.headers)
            if bearer is None or not self._is_token(bearer):
                return _http_error(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                   "invalid_api_key")  # fmt: skip
        body = await request.body()
        if len(body) > 64 * 1024:
            return _http_error(413, "the request body is larger than 64 KiB", "too_large")
        try:
            params = json.loads(body) if body.strip() else {}
        except json.JSONDecodeError as exc:
            return _http_error(400, f"the body is not valid JSON: {exc}", "invalid_json")
        if not isinstance(params, dict):
            return _http_error(400, "the body must be a JSON object", "invalid_json")
        seconds: Any = SECRET_SECONDS
        expires_after = params.get("expires_after")
        if expires_after is not None:
            seconds = expires_after.get("seconds") if isinstance(expires_after, dict) else None
            if not isinstance(seconds, int) or isinstance(seconds, bool) or not 10 <= seconds <= 7200:
                return _http_error(400, "expires_after.seconds must be an integer from 10 to 7200",
                                   "invalid_value", "expires_after.seconds")  # fmt: skip
        session = params.get("session")
        if session is not None:
            try:
                rt.apply_session(rt.SessionState(), session)
            except rt.ClientError as exc:
                return _http_error(400, exc.message, exc.code, exc.param)
        created = self._secrets.create(seconds, session)
        if created is None:
            return _http_error(429, "too many live client secrets; retry later", "rate_limit_exceeded")
        value, expires = created
        return JSONResponse({"value": value, "expires_at": expires, "session": session or {"type": "realtime"}})

    async def _realtime(self, ws: WebSocket) -> None:
        allowed, initial = self._authorize(ws)
        if not allowed:
            # before accepting: the client sees HTTP 403, as a refused upgrade
            log.info("realtime connection refused: missing or wrong credentials")
            await ws.close(1008)
            return
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
        # browsers close a connection whose server picks none of the subprotocols they offered
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        session = self.session_class(ws, await self._connected(), initial)
        self.sessions.add(session)
        self._idle.clear()
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            if not self.sessions:
                self._idle.set()

    # -- lifecycle --------------------------------------------------------------------

    async def _connected(self) -> VoiceChatClient:
        """The gRPC client, connected on first use (a host that runs `app` itself, such as Modal, never
        calls `start`)."""
        async with self._connecting:
            if self._client is None:
                connect = VoiceChatClient.connect(options=self.settings.connection)
                self._client = await self._stack.enter_async_context(connect)
        return self._client

    async def start(self) -> int:
        """Connect the gRPC client and listen; returns the bound port."""
        await self._connected()
        uvicorn_log = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _NoHandshakeDebug) for f in uvicorn_log.filters):
            uvicorn_log.addFilter(_NoHandshakeDebug())
        config = uvicorn.Config(
            self.app,
            ws="websockets-sansio",  # awaits the transport's drain: a slow reader pushes back on the relay
            lifespan="off",
            log_config=None,
            access_log=False,
            ws_max_size=self.settings.max_message_bytes,
            ws_per_message_deflate=False,  # audio is incompressible; deflate costs CPU and latency
            timeout_graceful_shutdown=int(self.settings.drain_seconds) or 1,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        sock = socket.create_server((self.settings.host, self.settings.port), reuse_port=False)
        sock.setblocking(False)
        # uvicorn's serve() would install its own signal handlers; the owner of the loop keeps those
        await server.startup(sockets=[sock])
        self._server, self._socket = server, sock
        self.port = sock.getsockname()[1]
        log.info("realtime bridge on %s (Converse at %s)", self.url, self.settings.connection.target)
        return self.port

    async def stop(self) -> None:
        """Stop listening, end the sessions (their streams are cancelled), close the channel."""
        server, self._server = self._server, None
        if server is not None:
            server.should_exit = True
            # uvicorn closes every WebSocket (1012, service restart); a session ends when its client is gone
            server.force_exit = True
            await server.shutdown(sockets=[self._socket] if self._socket else None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.settings.drain_seconds)
        await self._stack.aclose()
        self._client = None


def _http_error(status: int, message: str, code: str, param: str = "") -> JSONResponse:
    body = rt.error_event(message, code=code, param=param)["error"]
    return JSONResponse({"error": body}, status_code=status)


async def serve_forever(settings: BridgeSettings, stop: asyncio.Event) -> None:
    bridge = RealtimeBridge(settings)
    await bridge.start()
    print(f"realtime bridge: {bridge.url}  (WebSocket {bridge.url.replace('http', 'ws')}v1/realtime)",  # noqa: T201
          flush=True)  # fmt: skip
    try:
        await stop.wait()
    finally:
        await bridge.stop()


async def start_realtime(settings: Settings, grpc_port: int) -> RealtimeBridge:
    """The bridge inside the server process (`--realtime-port`), dialing the server's own port."""
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0", "::") else settings.host
    target = f"[{host}]:{grpc_port}" if ":" in host else f"{host}:{grpc_port}"
    connection = ConnectionOptions(
        target=target, tls=bool(settings.tls_cert), ca_file=settings.tls_cert, token=settings.auth_token
    )
    bridge = RealtimeBridge(
        BridgeSettings(connection=connection, host=settings.host, port=settings.realtime_port,
                       max_message_bytes=settings.max_message_bytes * 4 // 3 + 4096,
                       drain_seconds=min(settings.drain_seconds, 5.0))
    )  # fmt: skip
    await bridge.start()
    return bridge

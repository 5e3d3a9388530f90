"""The grpc.aio server: servicer, health, reflection, auth, keepalive, drain.

`VoiceChatServer` is the one factory used by `python -m service`, the tests
and the Modal deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from realtime.app import RealtimeBridge, start_realtime
from service.backends import Backend
from service.config import Settings
from service.engine.compose import create_backend, create_engine
from service.engine.scheduler import Scheduler
from service.errors import StartupError, Undecodable
from service.metrics import MetricsHTTPServer, ServiceMetrics, start_metrics_server, stop_metrics_server
from service.servicer import Admission, VoiceChatServicer
from service.session import Runtime
from service.turn_pool import TurnPool
from voicechat.v1 import voicechat_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VoiceChatService"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_LAME_DUCK_S = 0.5
_MODEL_STOP_S = 5.0  # longest wait for the engine's threads at shutdown
_LOAD_STOP_S = 120.0  # longest wait for a model load interrupted by shutdown
_OPEN_PREFIXES = (f"/{HEALTH_SERVICE}/", f"/{REFLECTION_V1}/", f"/{reflection.SERVICE_NAME}/")


def _register_reflection_v1() -> None:
    """Make `grpc.reflection.v1` describable: it is the v1alpha file renamed.

    grpcio-reflection implements only v1alpha; v1 has the same messages, so the
    v1alpha servicer answers both (newer grpcurl and buf curl ask for v1)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    for message in proto.message_type:
        for fld in message.field:
            if fld.type_name:
                fld.type_name = fld.type_name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace("v1alpha", "v1")
        method.output_type = method.output_type.replace("v1alpha", "v1")
    pool.Add(proto)


def _add_reflection(server: grpc.aio.Server) -> None:
    _register_reflection_v1()
    names = (SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = ReflectionServicer(names)
    for service in (reflection.SERVICE_NAME, REFLECTION_V1):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )


def _lenient(message: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """A request deserializer that never raises.

    grpc answers a deserializer's exception with UNKNOWN and a logged
    traceback; the handler answers an `Undecodable` with INVALID_ARGUMENT."""
    name = message.DESCRIPTOR.name

    def parse(data: bytes) -> Message | Undecodable:
        try:
            return message.FromString(data)
        except DecodeError:
            return Undecodable(name, len(data))

    return parse


def _add_voicechat(servicer: VoiceChatServicer, server: grpc.aio.Server) -> None:
    """Register every VoiceChatService method as the generated code does, with
    lenient request deserializers."""
    service = pb.DESCRIPTOR.services_by_name["VoiceChatService"]
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: kinds[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=_lenient(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Requires one `authorization: Bearer <token>` header.

    The scheme is matched in any case (RFC 9110: `Bearer`, `bearer`, ...); the
    token exactly, in constant time. Two `authorization` headers are refused,
    whatever they hold: which one a proxy or a client library uses is not
    defined."""

    def __init__(self, token: str, exempt_open: bool) -> None:
        self._expected = token.encode()
        self._exempt_open = exempt_open

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or (self._exempt_open and details.method.startswith(_OPEN_PREFIXES)):
            return handler
        values = [value for key, value in details.invocation_metadata or () if key == "authorization"]
        if len(values) > 1:
            return _refusing(handler, "more than one `authorization` header: send exactly one")
        scheme, _, token = str(values[0] if values else "").strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._expected):
            return handler
        return _refusing(handler, "missing or wrong bearer token (metadata `authorization: Bearer <token>`)")


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments: message sizes and a keepalive policy for long streams.

    The server pings idle connections every `keepalive_seconds` (so proxies and
    NATs keep them open and dead peers are noticed) and accepts client pings
    as often as every 10 s, even without calls, so clients may keep their own
    keepalive without being disconnected for "too many pings"."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.keepalive_time_ms", settings.keepalive_seconds * 1000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    raise _EncryptedKey  # grpc cannot use an encrypted key, and nobody is there to type a password


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from exc


def _tls_credentials(settings: Settings) -> grpc.ServerCredentials:
    """The PEM pair, checked with OpenSSL first: grpc reports a bad file only
    as "Failed to bind to address"."""
    cert_path, key_path = settings.tls_cert, settings.tls_key
    if not (cert_path and key_path):
        raise StartupError("TLS needs both --tls-cert and --tls-key")
    cert, key = _read(cert_path, "certificate"), _read(key_path, "key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=cert.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise StartupError(f"the TLS certificate {cert_path} holds no PEM certificate") from exc
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except _EncryptedKey as exc:
        raise StartupError(f"the TLS key {key_path} is encrypted: give an unencrypted PEM key") from exc
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise StartupError(f"the TLS key {key_path} does not belong to the certificate {cert_path}") from exc
        raise StartupError(f"the TLS key {key_path} is not a PEM private key") from exc
    except OSError as exc:  # the files changed since they were read
        raise StartupError(f"cannot read the TLS files: {exc.strerror or exc}") from exc
    return grpc.ssl_server_credentials([(key, cert)])


def _why_not_bound(host: str, port: int) -> str:
    """Why grpc could not listen (it says only "Failed to bind"): ask the OS."""
    if not host:
        return "the host is empty"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        return f"the host {host!r} does not resolve ({getattr(exc, 'strerror', None) or exc})"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(address)
            except OSError as exc:
                return exc.strerror or str(exc)
    return "grpc refused the address"


async def _listen(server: grpc.aio.Server, settings: Settings) -> int:
    """Bind the server's port (TLS when configured); StartupError when it cannot."""
    host, port = settings.host, settings.port
    if not 0 <= port <= 65535:
        raise StartupError(f"port {port} is not between 0 and 65535")
    credentials = None
    if settings.tls_cert or settings.tls_key:
        credentials = await asyncio.to_thread(_tls_credentials, settings)
    address = f"{host}:{port}"
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError as exc:
        reason = await asyncio.to_thread(_why_not_bound, host, port)
        raise StartupError(f"cannot listen on {address}: {reason}") from exc


class VoiceChatServer:
    """Builds, starts, drains and stops one server."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self.port = 0
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._servicer: VoiceChatServicer | None = None
        self._runtime: Runtime | None = None
        self.metrics = ServiceMetrics()  # always counted; served over HTTP when settings.metrics_port is set
        self.metrics_port = 0
        self._metrics_http: MetricsHTTPServer | None = None
        self._loading: asyncio.Future[Scheduler] | None = None
        self.realtime: RealtimeBridge | None = None  # the WebSocket bridge, when settings.realtime_port is set
        # set when the engine stopped for good (its thread died): health is NOT_SERVING and
        # `python -m service` exits non-zero so that the platform starts a new process
        self.engine_failed = asyncio.Event()
        self.engine_failure: BaseException | None = None
        self._health_task: asyncio.Future[None] | None = None

    @property
    def servicer(self) -> VoiceChatServicer:
        assert self._servicer is not None, "start() first"
        return self._servicer

    async def _set_health(self, status: int) -> None:
        self.metrics.set_health(status == health_pb2.HealthCheckResponse.SERVING)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Listen, then load and warm the model; health is SERVING only after.

        Calls that arrive while the model loads get UNAVAILABLE. Raises the
        backend's error (health stays NOT_SERVING) when the model cannot load.
        Returns the bound port."""
        settings = self.settings
        backend = self.backend or create_backend(settings)
        self.backend = backend
        runtime = Runtime(
            settings,
            backend,
            decode_pool=ThreadPoolExecutor(max(4, settings.max_sessions // 2), thread_name_prefix="decode"),
            turn_pool=TurnPool(2),
            metrics=self.metrics,
        )
        self._runtime = runtime
        admission = Admission(settings.max_sessions)
        self._servicer = VoiceChatServicer(runtime, admission)
        interceptors = [BearerAuth(settings.auth_token, settings.auth_exempt_health)] if settings.auth_token else []
        server = grpc.aio.server(interceptors=interceptors, options=grpc_options(settings))
        _add_voicechat(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        _add_reflection(server)
        self.port = await _listen(server, settings)
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if settings.metrics_port:
            registry = self.metrics.registry
            self._metrics_http = await start_metrics_server(settings.metrics_port, settings.host, registry)
            self.metrics_port = self._metrics_http.port
        await server.start()
        log.info("listening on %s:%d (backend %s)", settings.host, self.port, backend.name)
        if settings.realtime_port:
            self.realtime = await start_realtime(settings, self.port)
        started = time.monotonic()
        # loading runs in a thread that a cancel cannot stop: stop() waits for it
        # before it frees the model, so the weights are never freed under a load
        self._loading = asyncio.ensure_future(asyncio.to_thread(self._load, backend, settings))
        engine = await asyncio.shield(self._loading)
        loop = asyncio.get_running_loop()
        engine.on_failure(lambda error: self._post_engine_failure(loop, error))
        engine.start()
        runtime.loaded_engine = engine
        self.metrics.watch_engine(engine)
        admission.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("model %s ready in %.1f s (%s engine): SERVING", backend.model_id, time.monotonic() - started,
                 engine.name)  # fmt: skip
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight responses end
        within `grace` seconds (default `drain_seconds`), then stop."""
        grace = self.settings.drain_seconds if grace is None else grace
        if self._server is None:
            return
        servicer = self._servicer
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if servicer is not None:
            # streams and Generate calls in flight get the grace period
            servicer.drain(grace)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(servicer.all_closed.wait(), grace)
        if self.realtime is not None:  # its streams have ended above: close its WebSockets and channel
            await self.realtime.stop()
            self.realtime = None
        # lame duck: keep answering UNAVAILABLE for a moment, so clients that
        # call right after their stream ended are told to go elsewhere rather
        # than being cut off (CANCELLED) by the transport shutting down
        await asyncio.sleep(min(_LAME_DUCK_S, grace))
        await self._server.stop(min(_LAME_DUCK_S, grace))
        self._server = None
        await self._close_model(grace)
        if self._metrics_http is not None:
            await stop_metrics_server(self._metrics_http)
            self._metrics_http = None
        log.info("server stopped")

    def _post_engine_failure(self, loop: asyncio.AbstractEventLoop, error: BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending anyway
            loop.call_soon_threadsafe(self._on_engine_failure, error)

    def _on_engine_failure(self, error: BaseException) -> None:
        """The watchdog: the engine's thread died (every request has ended with its error)."""
        if self.engine_failed.is_set():
            return
        self.engine_failure = error
        self.engine_failed.set()
        if self._servicer is not None:
            self._servicer.admission.draining = True  # new calls: UNAVAILABLE, "reconnect to another instance"
        self._health_task = asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))

    @staticmethod
    def _load(backend: Backend, settings: Settings) -> Scheduler:
        """Load the weights and build the engine (warmed up, not started): in a thread."""
        backend.load()
        if settings.warmup:
            backend.warmup()
        engine = create_engine(backend, settings)
        if settings.warmup:
            engine.runner.warm_up()
        return engine

    async def _close_model(self, grace: float) -> None:
        """Stop the engine's and the pools' threads, then free the model: the
        weights are released only once nothing can be using them."""
        runtime, self._runtime = self._runtime, None
        stopped = True
        if self._loading is not None and not self._loading.done():
            log.info("waiting for the model load to finish before freeing it")
            done, _ = await asyncio.wait({self._loading}, timeout=_LOAD_STOP_S)
            stopped = bool(done)
        if runtime is not None:
            if runtime.loaded_engine is not None:
                stopped = await asyncio.to_thread(runtime.loaded_engine.close, max(grace, _MODEL_STOP_S))
            for pool in (runtime.decode_pool, runtime.turn_pool):
                pool.shutdown(wait=False, cancel_futures=True)
        if self.backend is not None and stopped:
            await asyncio.to_thread(self.backend.close)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

"""Prometheus metrics: what an operator watches, served over HTTP at /metrics.

Every server owns one `ServiceMetrics` with a registry of its own, not
prometheus_client's global one: tests (and benchmarks) run several servers in
one process, and each must count only its own sessions. The server always
counts (an increment is a lock and an add); it serves the registry only when
`--metrics-port` is set, from `MetricsHTTPServer`: a small HTTP/1.1 server on
the event loop that holds no thread per connection, caps its connections and
closes idle ones, so a flood of connections to the metrics port can neither
use up the process's file descriptors nor its CPU (the gRPC port keeps
accepting clients). Rendering a scrape runs in a worker thread, one at a time.

Label values come from closed sets (gRPC status names, commit reasons,
response statuses): nothing per session, response or peer ever becomes a
label, so the number of series stays bounded whatever the traffic.

Engine figures (model steps, rows, turns waiting for the model) are read from
the engine's `EngineStats` at scrape time by a collector; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from service.backends.base import Backend
from service.engine.api import EngineStats
from service.errors import StartupError
from voicechat.v1 import voicechat_pb2 as pb

log = logging.getLogger(__name__)

PREFIX = "voicechat"
_STATUS_NAMES = frozenset(code.name for code in grpc.StatusCode)

# Bucket bounds, in seconds unless said otherwise. The latency targets sit
# inside the finest part of each range (first audio ~120 ms, server-added
# latency < 5 ms per event, VAD silence 500 ms).
SPEECH_END_TO_COMMIT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.5, 2.0, 3.0)
FIRST_AUDIO_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
PREFILL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RTF_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0)  # audio seconds per wall second
EVENT_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
ENGINE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def status_code_label(code: grpc.StatusCode | str | None) -> str:
    """A gRPC status name ("OK" for None); anything else becomes "UNKNOWN"."""
    if code is None:
        return "OK"
    name = code.name if isinstance(code, grpc.StatusCode) else str(code).upper()
    return name if name in _STATUS_NAMES else "UNKNOWN"


# Label values of the enums, without their prefixes: "server_vad", "completed", ...
# "semantic" is the semantic turn detector's commit (its reason may not be in
# the enum of every build); anything else counts as "unspecified".
COMMIT_REASONS = frozenset({n.removeprefix("COMMIT_REASON_").lower() for n in pb.CommitReason.keys()} | {"semantic"})
RESPONSE_STATUSES = frozenset(n.removeprefix("RESPONSE_STATUS_").lower() for n in pb.ResponseStatus.keys())


def commit_reason_label(reason: int | str) -> str:
    """`pb.COMMIT_REASON_SERVER_VAD` or "server_vad" -> "server_vad"."""
    return _enum_label(pb.CommitReason, "COMMIT_REASON_", reason, COMMIT_REASONS)


def response_status_label(status: int | str) -> str:
    """`pb.RESPONSE_STATUS_COMPLETED` or "completed" -> "completed"."""
    return _enum_label(pb.ResponseStatus, "RESPONSE_STATUS_", status, RESPONSE_STATUSES)


def _enum_label(enum: Any, prefix: str, value: int | str, known: frozenset[str]) -> str:
    if isinstance(value, str):
        label = value.lower().removeprefix(prefix.lower())
    else:
        try:
            label = str(enum.Name(value)).removeprefix(prefix).lower()
        except ValueError:
            label = ""
    return label if label in known else "unspecified"


class HasEngineStats(Protocol):
    stats: EngineStats
    backend: Backend


class _EngineCollector(Collector):
    """Reads the engine's counters when Prometheus scrapes (EngineStats is
    read without locking, like everywhere else: approximate by design)."""

    def __init__(self) -> None:
        self.engine: HasEngineStats | None = None

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        if engine is None:
            return
        stats = engine.stats
        steps = CounterMetricFamily(
            f"{PREFIX}_engine_steps", "Model steps taken by the engine (one batched forward counts once)."
        )
        steps.add_metric([], stats.steps)
        rows = CounterMetricFamily(
            f"{PREFIX}_engine_rows",
            "Rows (responses) advanced by model steps, summed over steps; rows per step = "
            "rate(voicechat_engine_rows_total) / rate(voicechat_engine_steps_total).",
        )
        rows.add_metric([], stats.rows)
        waiting = GaugeMetricFamily(f"{PREFIX}_engine_waiting_turns", "Turns waiting for a place in the model now.")
        waiting.add_metric([], stats.waiting)
        running = GaugeMetricFamily(f"{PREFIX}_engine_running", "Responses generating in the model now.")
        running.add_metric([], stats.running)
        fallbacks = CounterMetricFamily(
            f"{PREFIX}_prefix_cache_fallbacks",
            "Prefix-cache rollbacks that could not keep a conversation's cached prefix and ran a full prefill "
            "(expected to stay 0; see service/backends/lfm2_cache.py).",
        )
        fallbacks.add_metric([], engine.backend.cache_stats.fallbacks)
        suspended = CounterMetricFamily(
            f"{PREFIX}_engine_suspended",
            "Committed responses that gave their place in a full batch up to a waiting turn (and resumed later).",
        )
        suspended.add_metric([], stats.suspended)
        speculative = CounterMetricFamily(
            f"{PREFIX}_engine_speculative_rows", "Speculative responses that got a place in the batch."
        )
        speculative.add_metric([], stats.speculative)
        yield from (steps, rows, waiting, running, fallbacks, suspended, speculative)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names are not known to the registry up front: no clash checks needed


class ServiceMetrics:
    """Every series the server exports, in a registry of its own.

    Methods are cheap and called on the event loop; none blocks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_live = Gauge(f"{PREFIX}_sessions_live", "Converse streams open now.", registry=r)
        self.sessions_started = Counter(f"{PREFIX}_sessions_started", "Converse streams opened.", registry=r)
        self.sessions_ended = Counter(
            f"{PREFIX}_sessions_ended", "Converse streams ended, by gRPC status code.", ["code"], registry=r
        )
        self.turns_committed = Counter(
            f"{PREFIX}_turns_committed", "User turns committed, by what ended them.", ["reason"], registry=r
        )
        self.responses = Counter(f"{PREFIX}_responses", "Responses ended, by status.", ["status"], registry=r)
        self.errors = Counter(
            f"{PREFIX}_errors", "In-stream error events sent to clients, by code.", ["code"], registry=r
        )
        self.calls_refused = Counter(
            f"{PREFIX}_calls_refused",
            "Calls refused before they started (at the session limit, model loading, draining), by method and code.",
            ["method", "code"],
            registry=r,
        )
        self.generate_calls = Counter(
            f"{PREFIX}_generate_calls",
            "Generate calls that ran, by the gRPC status they ended with.",
            ["code"],
            registry=r,
        )
        self.input_transcriptions = Counter(
            f"{PREFIX}_input_transcriptions", "InputTranscription events sent (spoken turns transcribed).", registry=r
        )
        self.text_coalesced = Counter(
            f"{PREFIX}_text_deltas_coalesced",
            "Text deltas merged into a queued one because a client read slowly.",
            registry=r,
        )
        self.audio_merged = Counter(
            f"{PREFIX}_audio_chunks_merged",
            "Audio chunks merged into a queued one because a client read slowly.",
            registry=r,
        )

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, buckets=buckets, registry=r)

        self.speech_end_to_commit = histogram(
            "speech_end_to_commit_seconds",
            "End of the user's speech to the turn's commit (server VAD and semantic turns).",
            SPEECH_END_TO_COMMIT_BUCKETS,
        )
        self.commit_to_first_audio = histogram(
            "commit_to_first_audio_seconds",
            "Turn commit to the first audio chunk written to the stream.",
            FIRST_AUDIO_BUCKETS,
        )
        self.prefill = histogram(
            "prefill_seconds",
            "Turn commit to the model's first step (prefill, and any wait for the model).",
            PREFILL_BUCKETS,
        )
        self.generation_rtf = histogram(
            "generation_rtf",
            "Generation real-time factor per response: seconds of audio generated per second.",
            RTF_BUCKETS,
        )
        self.event_latency = histogram(
            "server_latency_seconds",
            "Server-added latency per text delta and audio chunk: ready to written (traced streams).",
            EVENT_LATENCY_BUCKETS,
        )
        self.engine_wait = histogram(
            "engine_wait_seconds", "How long a turn waited for a place in the model.", ENGINE_WAIT_BUCKETS
        )
        self.health = Gauge(f"{PREFIX}_health_serving", "1 while health reports SERVING, else 0.", registry=r)
        self._engine = _EngineCollector()
        r.register(self._engine)
        # every known label value exists from the start, at 0, so rates and
        # alerts work before the first event of a kind
        for reason in COMMIT_REASONS:
            self.turns_committed.labels(reason)
        for status in RESPONSE_STATUSES:
            self.responses.labels(status)

    # -- sessions and turns ----------------------------------------------------------------
    def session_started(self) -> None:
        self.sessions_started.inc()
        self.sessions_live.inc()

    def session_ended(self, code: grpc.StatusCode | str | None) -> None:
        """A stream that `session_started` counted has ended (None: OK)."""
        self.sessions_live.dec()
        self.sessions_ended.labels(status_code_label(code)).inc()

    def call_refused(self, method: str, code: grpc.StatusCode | str | None) -> None:
        """An admission refusal; `method` is "Converse" or "Generate"."""
        self.calls_refused.labels(
            method if method in ("Converse", "Generate") else "UNKNOWN", status_code_label(code)
        ).inc()

    def generate_ended(self, code: grpc.StatusCode | str | None) -> None:
        self.generate_calls.labels(status_code_label(code)).inc()

    def turn_committed(self, reason: int | str) -> None:
        self.turns_committed.labels(commit_reason_label(reason)).inc()

    def error(self, code: str) -> None:
        """An in-stream `Error` event (`ServiceError.code_name`)."""
        self.errors.labels(status_code_label(code)).inc()

    def input_transcription(self) -> None:
        self.input_transcriptions.inc()

    # -- responses ----------------------------------------------------------------------
    def response_ended(self, status: int | str) -> None:
        """A response ended with `status` (counted whether or not its end reaches the client)."""
        self.responses.labels(response_status_label(status)).inc()

    def response_written(self, summary: pb.ResponseMetrics) -> None:
        """Observe a response's figures; take `summary` once the response's
        events were written (its first-audio time is the writer's). Zero fields
        (nothing measured, e.g. no audio) are not observed."""
        if summary.speech_end_to_commit_ms > 0:
            self.speech_end_to_commit.observe(summary.speech_end_to_commit_ms / 1000)
        if summary.commit_to_first_audio_ms > 0:
            self.commit_to_first_audio.observe(summary.commit_to_first_audio_ms / 1000)
        if summary.prefill_ms > 0:
            self.prefill.observe(summary.prefill_ms / 1000)
        if summary.generation_rtf > 0:
            self.generation_rtf.observe(summary.generation_rtf)
        if summary.engine_wait_ms > 0:
            self.engine_wait.observe(summary.engine_wait_ms / 1000)
        if summary.text_coalesced:
            self.text_coalesced.inc(summary.text_coalesced)
        if summary.audio_merged:
            self.audio_merged.inc(summary.audio_merged)

    def when_written(
        self, event: pb.ConverseResponse, summary: Callable[[], pb.ResponseMetrics]
    ) -> Callable[[], pb.ConverseResponse]:
        """`event` (a response's ResponseEnded) as an Outbox item that calls
        `response_written(summary())` when the writer takes it: everything the
        response put before it has been written by then."""

        def written() -> pb.ConverseResponse:
            self.response_written(summary())
            return event

        return written

    def event_written(self, event: pb.ConverseResponse) -> None:
        """The writer sent `event`: observe its server-added latency when it
        carries `ready_ts_ms` (text deltas and audio chunks of traced streams)."""
        kind = event.WhichOneof("event")
        if kind == "audio_chunk":
            ready = event.audio_chunk.ready_ts_ms
        elif kind == "text_delta":
            ready = event.text_delta.ready_ts_ms
        else:
            return
        if ready:
            self.event_latency.observe(max(0.0, event.ts_ms - ready) / 1000)

    # -- server --------------------------------------------------------------------------
    def set_health(self, serving: bool) -> None:
        self.health.set(1 if serving else 0)

    def watch_engine(self, engine: HasEngineStats | None) -> None:
        """Export `engine.stats` at every scrape (None: stop exporting them)."""
        self._engine.engine = engine


# The metrics endpoint's limits. A scraper opens one connection per scrape and sends its request at
# once; anything else (idle sockets, slow heads) is closed.
MAX_HTTP_CONNECTIONS: Final = 16  # more at once are closed as soon as they are accepted
HTTP_IDLE_TIMEOUT_S: Final = 5.0  # to send the request head, and to read the reply
_MAX_HEAD_BYTES: Final = 8192


class MetricsHTTPServer:
    """Serves one registry at GET /metrics (and /) on the event loop.

    No thread per connection: a connection costs a socket and a small
    coroutine, at most `max_connections` of them at once (later ones are
    accepted and closed at once, so the listening queue never fills up with
    them either), and each is closed after one reply or `idle_timeout_s`
    without progress. Replies close the connection (HTTP/1.1 `Connection:
    close`), which is what Prometheus expects of a small exporter. Rendering
    runs in a worker thread, one scrape at a time, so the loop never waits on
    a large registry."""

    def __init__(
        self,
        registry: CollectorRegistry,
        max_connections: int = MAX_HTTP_CONNECTIONS,
        idle_timeout_s: float = HTTP_IDLE_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.port = 0
        self.open_connections = 0
        self.refused_connections = 0  # closed at once because `max_connections` were open
        self._server: asyncio.Server | None = None
        self._render = asyncio.Lock()
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); returns the bound port.
        StartupError when it cannot listen there (port taken, bad address)."""
        try:
            self._server = await asyncio.start_server(self._accept, host.strip("[]"), port, reuse_address=True)
        except (OSError, OverflowError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise StartupError(f"cannot serve metrics on {host}:{port}: {reason}") from exc
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and close every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.max_connections:
            self.refused_connections += 1
            writer.transport.abort()  # frees the descriptor now; no reply to a flood
            return
        self.open_connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        served = False
        try:
            await asyncio.wait_for(self._serve(reader, writer), self.idle_timeout_s)
            served = True
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # idle, too slow, gone or not HTTP: nothing to tell a peer like that
        finally:
            self.open_connections -= 1
            self._connections.discard(task)
            if not served:
                writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEAD_BYTES:
            raise ValueError("request head too long")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _version = (request_line.split(" ") + ["", "", ""])[:3]
        headers = {}
        for line in header_lines:
            name, _, field = line.partition(":")
            headers[name.strip().lower()] = field.strip()
        status, content_type, body = await self._reply(method, path.split("?", 1)[0], headers.get("accept", ""))
        writer.write(
            (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode("latin-1")
            + (b"" if method == "HEAD" else body)
        )
        writer.close()  # after the reply is sent
        await writer.wait_closed()

    async def _reply(self, method: str, path: str, accept: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain; charset=utf-8", b"only GET /metrics\n"
        if path not in ("/metrics", "/"):
            return "404 Not Found", "text/plain; charset=utf-8", b"see /metrics\n"
        encoder, content_type = choose_encoder(accept)
        async with self._render:
            body = await asyncio.to_thread(encoder, self.registry)
        return "200 OK", content_type, body


async def start_metrics_server(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> MetricsHTTPServer:
    """Serve `registry` at http://host:port/metrics on the running event loop.

    Port 0 picks a free port (the server's `port` says which).
    StartupError when it cannot listen there (port taken, bad address)."""
    server = MetricsHTTPServer(registry or CollectorRegistry())
    bound = await server.start(host, port)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return server


async def stop_metrics_server(server: MetricsHTTPServer) -> None:
    """Stop serving, close the socket and every open connection."""
    with contextlib.suppress(OSError):
        await server.close()

"""Server settings: one typed object, read once at start-up.

Every field can be set by a command-line flag (`--max-sessions 32`) or an
environment variable (`VOICECHAT_MAX_SESSIONS=32`); flags win over the
environment, the environment over the defaults below. The configuration
table in docs/operations.md is generated from this file (`make docs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

ENV_PREFIX = "VOICECHAT_"
DEFAULT_MODEL = "LiquidAI/LFM2.5-Audio-1.5B"
SECRET_FIELDS = frozenset({"auth_token"})


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    # -- serving ------------------------------------------------------------
    backend: str = _opt("lfm2", "Model backend: lfm2 (the real model) or scripted "
                        "(deterministic, no torch).", choices=("lfm2", "scripted"))
    host: str = _opt("127.0.0.1", "Address to listen on (0.0.0.0 for all interfaces).")
    port: int = _opt(50051, "TCP port (0 picks a free one).")
    log_level: str = _opt("INFO", "Logging level.")
    log_format: str = _opt("text", "Log format: text (human-readable lines) or json (one object "
                           "per line with session_id, response_id and peer).", choices=("text", "json"))
    metrics_port: int = _opt(0, "Serve Prometheus metrics over HTTP on this port at /metrics "
                             "(0 = off).")
    realtime_port: int = _opt(0, "Serve the OpenAI-Realtime-compatible WebSocket bridge "
                              "(/v1/realtime) and the browser page (/) on this port (0 = off).")
    # -- model (lfm2 backend) -----------------------------------------------
    model: str = _opt(DEFAULT_MODEL, "Hugging Face model id or local checkpoint folder.")
    revision: str = _opt("", "Model revision (commit) to load; empty = the pinned default.")
    device: str = _opt("auto", "Torch device: auto (CUDA when present), cuda or cpu.")
    dtype: str = _opt("auto", "Model dtype: auto (bf16 on GPU and on CPUs with native bf16 "
                      "matmuls, AMX or AVX-512 BF16; else fp32), bf16, fp16 or fp32.",
                      choices=("auto", "bf16", "fp16", "fp32"))
    audio_decoder: str = _opt("auto", "Audio decoder: auto (the LFM2.5 detokenizer when the checkpoint "
                              "has one, else Mimi), detokenizer or mimi.",
                              choices=("auto", "detokenizer", "mimi"))
    prefix_cache: bool = _opt(True, "Keep each conversation's model cache across turns, so a "
                              "turn prefills only what is new.")
    system_prompt: str = _opt("", "System prompt for sessions that send none (empty = the model's "
                              "chat prompt).")
    warmup: bool = _opt(True, "Run a dummy generation and decode before serving.")
    # -- engine -------------------------------------------------------------
    engine: str = _opt("auto", "How conversations share the model: batched (one engine thread "
                       "steps every generating conversation in one forward pass), serial (the same "
                       "scheduler with a batch of one: each response takes the model in turns, for "
                       "comparisons) or auto (batched).",
                       choices=("auto", "batched", "serial"))
    max_batch: int = _opt(32, "Most responses generating in one batched forward; more wait, "
                          "committed turns first, round robin across sessions.")
    max_queue_wait_s: float = _opt(120.0, "Longest wait for a place in the model; a request still "
                                   "waiting then fails (the model is busy).")
    preempt_after_s: float = _opt(2.0, "A committed turn that finds the batch full of responses takes "
                                  "the place of one that has held it this long (suspended, it resumes "
                                  "where it stopped); 0 turns this off.")
    prefill_chunk: int = _opt(256, "Batched engine: most history positions prefilled per engine "
                              "iteration, so a long turn does not stall the others' decoding.")
    # -- scripted backend -----------------------------------------------------
    scripted_step_ms: float = _opt(0.0, "Scripted backend: delay per model step (ms), "
                                   "e.g. 15 to mimic a GPU.")
    scripted_prefill_ms: float = _opt(0.0, "Scripted backend: delay before the first step (ms).")
    scripted_decode_ms: float = _opt(0.0, "Scripted backend: delay per decode batch (ms).")
    # -- streaming pipeline -------------------------------------------------
    pipeline: str = _opt("tuned", "Output policy: tuned (fast path, adaptive stride, "
                         "fixed-size chunks) or baseline (the old fixed stride of 16 "
                         "frames, for comparisons).", choices=("tuned", "baseline"))
    chunk_ms: int = _opt(40, "Default audio chunk size in ms (20-100).")
    first_chunk_frames: int = _opt(2, "Default frames that trigger the first decode (1-16).")
    max_stride_frames: int = _opt(8, "Default largest decode batch in frames (1-64).")
    max_pending_audio_ms: int = _opt(20_000, "Audio that may wait for a slow reader before "
                                     "the response fails (ms).")
    trace_all: bool = _opt(False, "Send metrics events on every stream.")
    speculative: bool = _opt(True, "Start the response when the speech stops, before the silence "
                             "commits the turn (sessions may turn it off).")
    # -- limits -------------------------------------------------------------
    max_sessions: int = _opt(64, "Concurrent Converse streams; beyond it RESOURCE_EXHAUSTED.")
    max_session_seconds: int = _opt(3600, "Longest Converse stream (0 = unlimited).")
    max_turn_ms: int = _opt(60_000, "Longest user turn; longer audio is committed at this length.")
    max_message_bytes: int = _opt(1 << 20, "Largest request message in bytes.")
    max_text_chars: int = _opt(4000, "Longest typed text input in characters.")
    idle_timeout_seconds: int = _opt(300, "A stream with no request for this long ends "
                                     "(0 = never).")
    max_new_tokens: int = _opt(2048, "Largest max_new_tokens a client may ask for.")
    default_max_new_tokens: int = _opt(1024, "max_new_tokens when the client sets none.")
    max_generate_audio_seconds: int = _opt(120, "Longest audio accepted by Generate.")
    # -- security and lifecycle -------------------------------------------------
    auth_token: str = _opt("", "Bearer token required from clients (empty = no auth).")
    auth_exempt_health: bool = _opt(True, "Let health checks and reflection skip auth.")
    tls_cert: str = _opt("", "PEM certificate file; with --tls-key serves TLS.")
    tls_key: str = _opt("", "PEM private key file.")
    drain_seconds: float = _opt(20.0, "Grace period for in-flight responses on SIGTERM.")
    keepalive_seconds: int = _opt(30, "Server HTTP/2 ping interval on idle streams.")

    def __repr__(self) -> str:  # never log secrets
        shown = {
            f.name: ("***" if f.name in SECRET_FIELDS and getattr(self, f.name) else getattr(self, f.name))
            for f in fields(self)
        }
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then `VOICECHAT_*` variables, then keyword overrides."""
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _coerce(hints[f.name], raw, f.name)
        values.update(overrides)
        return cls(**values)


def _coerce(kind: Any, raw: str, name: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a boolean")
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {exc}") from exc


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from command-line flags over environment variables."""
    base = Settings.from_env(environ)
    hints = get_type_hints(Settings)
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve LFM2-Audio voice chat over gRPC (voicechat.v1.VoiceChatService).",
    )
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        kind = hints[f.name]
        help_text = f"{f.metadata['help']} [env {env}; default {f.default!r}]"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=getattr(base, f.name), help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=getattr(base, f.name),
                                choices=f.metadata.get("choices"), help=help_text)
    return Settings(**vars(parser.parse_args(argv)))

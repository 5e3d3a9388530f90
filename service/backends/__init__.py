"""Model backends behind one interface (`service.backends.base.Backend`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.backends.base import Backend, BackendLoadError

if TYPE_CHECKING:
    from service.backends.engine import Engine
    from service.config import Settings

__all__ = ["Backend", "BackendLoadError", "create_backend", "create_engine"]


def create_backend(settings: Settings) -> Backend:
    """The backend named by `settings.backend` (not loaded yet)."""
    if settings.backend == "scripted":
        from service.backends.scripted import ScriptedBackend

        return ScriptedBackend(
            step_ms=settings.scripted_step_ms,
            prefill_ms=settings.scripted_prefill_ms,
            decode_ms=settings.scripted_decode_ms,
        )
    if settings.backend == "lfm2":
        # torch and liquid-audio are imported only when this backend is chosen
        from service.backends.lfm2 import LFM2Backend

        return LFM2Backend(
            model=settings.model,
            revision=settings.revision or None,
            device=settings.device,
            dtype=None if settings.dtype == "auto" else settings.dtype,
            decoder=settings.audio_decoder,
            prefix_cache=settings.prefix_cache,
        )
    raise BackendLoadError(f"unknown backend {settings.backend!r}: choose lfm2 or scripted")


def create_engine(backend: Backend, settings: Settings) -> Engine:
    """The engine `settings.engine` names for a loaded backend.

    `auto` batches when the backend can (LFM2) and otherwise runs each
    response on its own thread (the scripted backend)."""
    from service.backends.engine import ThreadedEngine

    if settings.engine in ("auto", "batched"):
        batched = backend.batched_engine(settings.max_batch, settings.prefill_chunk)
        if batched is not None:
            return batched
        if settings.engine == "batched":
            raise BackendLoadError(f"the {backend.name} backend has no batched engine: use --engine serial or auto")
    return ThreadedEngine(backend, workers=settings.max_sessions + 4)

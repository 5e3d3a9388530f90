"""The composition root of the model side: backend, runner and engine from `Settings`.

The one place that reads the server's settings for the model: backends,
runners and the scheduler take plain arguments, so none of them imports the
server's configuration. `--engine serial` is the same scheduler with a batch of
one (each response takes the model in turns, step by step: the baseline the
benchmarks compare with).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.backends.base import Backend, BackendLoadError
from service.engine.runner import Runner
from service.engine.scheduler import Scheduler

if TYPE_CHECKING:
    from service.config import Settings


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


def create_runner(backend: Backend, max_batch: int, prefill_chunk: int = 256) -> Runner:
    """The runner for a loaded backend."""
    from service.backends.scripted import ScriptedBackend

    if isinstance(backend, ScriptedBackend):
        from service.engine.scripted_runner import ScriptedRunner

        return ScriptedRunner(backend)
    from service.backends.lfm2 import LFM2Backend

    if isinstance(backend, LFM2Backend):
        from service.engine.lfm2_runner import LFM2Runner

        return LFM2Runner(backend, max_batch=max_batch, prefill_chunk=prefill_chunk)
    raise BackendLoadError(f"no runner for the {backend.name} backend")


def create_engine(backend: Backend, settings: Settings) -> Scheduler:
    """The engine `settings.engine` names for a loaded backend (not started)."""
    serial = settings.engine == "serial"
    max_batch = 1 if serial else settings.max_batch
    runner = create_runner(backend, max_batch, settings.prefill_chunk)
    return Scheduler(
        runner,
        max_batch=max_batch,
        max_wait_s=settings.max_queue_wait_s,
        preempt_after_s=settings.preempt_after_s or None,
        name="serial" if serial else "batched",
    )


def serial_engine(backend: Backend) -> Scheduler:
    """The baseline: the scheduler with a batch of one (benchmarks and tests compare with it)."""
    return Scheduler(create_runner(backend, 1), max_batch=1, name="serial")


def batched_engine(backend: Backend, max_batch: int, prefill_chunk: int = 256) -> Scheduler:
    return Scheduler(create_runner(backend, max_batch, prefill_chunk), max_batch=max_batch)

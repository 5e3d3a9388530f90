"""What every session of a server shares: settings, the backend, the pools, the engine and the metrics."""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field

from service.backends.base import Backend
from service.config import Settings
from service.engine.api import Engine
from service.metrics import ServiceMetrics
from service.turn_pool import TurnPool


@dataclass
class Runtime:
    """What every session of a server shares. The engine exists once the
    backend has loaded (no session is admitted before)."""

    settings: Settings
    backend: Backend
    decode_pool: Executor  # audio decoding
    turn_pool: TurnPool  # voice activity and end-of-turn detection, shared fairly
    loaded_engine: Engine | None = None
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)

    @property
    def engine(self) -> Engine:
        if self.loaded_engine is None:
            raise RuntimeError("the model engine is not running yet")
        return self.loaded_engine

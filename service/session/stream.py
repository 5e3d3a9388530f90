"""What every part of one session shares: the stream's identity, its options,
where its events go, the engine conversation, and the task group it runs in."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from service.backends.base import Conversation
from service.engine.api import ConversationRef, Engine
from service.errors import ServiceError
from service.options import SessionOptions
from service.outbox import Outbox
from service.runtime import Runtime
from service.session.wire import Wire, error_event

log = logging.getLogger(__name__)


@dataclass
class Stream:
    """One Converse stream as its parts see it. The shell creates it and owns
    its lifecycle; turn control replaces `options` on an UpdateConfig."""

    id: str
    peer: str
    runtime: Runtime
    options: SessionOptions
    outbox: Outbox  # the one ordered queue to the writer
    events: Wire  # every event goes out through it
    engine: Engine
    conversation: ConversationRef  # all model state is the engine's
    draining: bool = False  # the server is shutting down: no new turns
    group: asyncio.TaskGroup | None = None  # set while the session runs

    @property
    def log_extra(self) -> dict[str, str]:
        return {"session_id": self.id, "peer": self.peer}

    @property
    def ending(self) -> bool:
        """The stream's end is queued (or written): requests and turn events are ignored."""
        return self.outbox.end is not None

    def error(self, exc: ServiceError) -> None:
        """A request failed; the stream goes on."""
        self.runtime.metrics.error(exc.code_name)
        self.events.put(error_event(exc))

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None] | None:
        """Run a short helper task owned by the session's TaskGroup."""
        if self.group is None:
            coro.close()
            return None
        return self.group.create_task(coro, name=f"{self.id}-{name}")

    def edit(self, op: Callable[[Conversation], object], what: str) -> None:
        """A history edit nobody waits for; a failure is logged."""

        def check(future: concurrent.futures.Future[object]) -> None:
            if not future.cancelled() and (exc := future.exception()) is not None:
                log.error("%s: cannot %s", self.id, what, exc_info=exc, extra=self.log_extra)

        self.engine.edit(self.conversation, op).add_done_callback(check)

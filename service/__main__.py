"""`python -m service`: serve voicechat.v1 until SIGINT/SIGTERM, then drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

# Before numpy loads: its OpenBLAS would start a busy-waiting thread per core for
# the small matrix products of end-of-turn detection, doubling their CPU time.
# The server runs many streams at once and torch has threads of its own.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from service.backends.base import BackendLoadError  # noqa: E402
from service.config import parse_args  # noqa: E402
from service.errors import StartupError  # noqa: E402
from service.logs import configure_logging  # noqa: E402
from service.server import VoiceChatServer  # noqa: E402

log = logging.getLogger("service")


async def serve(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    configure_logging(settings.log_level, settings.log_format)
    log.info("%r", settings)
    server = VoiceChatServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        start = asyncio.create_task(server.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            port = start.result()
            print(f"voicechat serving on {settings.host}:{port}", flush=True)  # noqa: T201 - for scripts
            if server.realtime is not None:
                print(f"realtime bridge on {server.realtime.url}", flush=True)  # noqa: T201 - for scripts
            failed = asyncio.create_task(server.engine_failed.wait())
            await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
            failed.cancel()
            if server.engine_failed.is_set():
                log.critical("exiting with status 3 so that a new process takes over")  # the cause is logged
                await server.stop(0)
                return 3
        else:
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
    except (BackendLoadError, StartupError) as exc:
        # one line and status 2, no traceback: the operator fixes the set-up
        log.error("cannot start: %s", exc)
        await server.stop(0)
        return 2
    log.info("signal received: draining for up to %.0f s", settings.drain_seconds)
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(asyncio.run(serve(argv)))


if __name__ == "__main__":
    main()

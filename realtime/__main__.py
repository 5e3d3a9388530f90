"""`python -m realtime`: serve /v1/realtime and the browser page in front of a running voicechat server.

    python -m realtime --target 127.0.0.1:50051 --port 8000
    python -m realtime --modal-app voicechat --port 8000      # in front of a Modal deployment

The connection flags are the clients' (see clients/connection.py); the token
(`VOICECHAT_TOKEN`) is both what the bridge sends to the server and what it
requires from its own clients.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace

from clients.connection import TargetError, add_connection_args, options_from_args, resolve
from realtime.app import BridgeSettings, serve_forever


def parse_args(argv: Sequence[str] | None = None) -> BridgeSettings:
    parser = argparse.ArgumentParser(prog="python -m realtime", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--host",
        default=os.environ.get("VOICECHAT_REALTIME_HOST", "127.0.0.1"),
        help="address to listen on [env VOICECHAT_REALTIME_HOST; default %(default)s]",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("VOICECHAT_REALTIME_PORT", "8000")),
        help="port to listen on, 0 for a free one [env VOICECHAT_REALTIME_PORT; default %(default)s]",
    )
    add_connection_args(parser)
    args = parser.parse_args(argv)
    return BridgeSettings(connection=options_from_args(args), host=args.host, port=args.port)


async def main_async(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        settings = replace(settings, connection=await resolve(settings.connection))
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201 - a command-line tool
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve_forever(settings, stop)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main_async(argv)))


if __name__ == "__main__":
    main()

"""Where and how the clients connect: target, TLS, credentials, Modal discovery.

Every client takes the same flags (`add_connection_args`) and turns them into a
`ConnectionOptions`; `open_channel` makes the grpc.aio channel and `metadata`
the per-call headers.

* `--target host:port` (env `VOICECHAT_TARGET`, default `127.0.0.1:50051`).
* TLS: on with `--tls`, off with `--no-tls`; by default on exactly when the
  port is 443 (a Modal deployment or another HTTPS proxy). `--ca-file` trusts a
  private CA (a self-signed server certificate); `--tls-server-name` checks the
  certificate against another name than the target's host.
* `--token` (env `VOICECHAT_TOKEN`): the service's bearer token, sent as
  `authorization: Bearer <token>`.
* `--modal-key` / `--modal-secret` (env `VOICECHAT_MODAL_KEY` /
  `VOICECHAT_MODAL_SECRET`): a Modal proxy-auth token pair, sent as `modal-key`
  and `modal-secret` when the deployment requires proxy auth.
* `--modal-app NAME` (with `--modal-server`, default `VoiceChat`): find the
  target of a deployed Modal Server by name; needs the `modal` package and a
  Modal token (`modal token new`), not the service token.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MODAL_SERVER = "VoiceChat"
TLS_PORT = 443

# Keepalive: ping an idle connection every 30 s so proxies and NATs keep long
# conversations open; the server accepts pings every 10 s or slower.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Generate returns a whole WAV file in one message.
    ("grpc.max_receive_message_length", 64 << 20),
]


class TargetError(Exception):
    """The target cannot be worked out (bad flags, Modal lookup failed)."""


@dataclass(frozen=True)
class ConnectionOptions:
    """How to reach a voicechat server. Secrets are never shown by `repr`."""

    target: str = DEFAULT_TARGET
    tls: bool | None = None  # None: TLS exactly when the port is 443
    ca_file: str = ""
    tls_server_name: str = ""
    token: str = ""
    modal_key: str = ""
    modal_secret: str = ""
    modal_app: str = ""
    modal_server: str = DEFAULT_MODAL_SERVER
    modal_environment: str = ""

    def __repr__(self) -> str:
        hidden = {"token", "modal_key", "modal_secret"}
        shown = ", ".join(
            f"{name}={'***' if name in hidden and value else repr(value)}" for name, value in vars(self).items()
        )
        return f"ConnectionOptions({shown})"

    @property
    def use_tls(self) -> bool:
        if self.tls is not None:
            return self.tls
        return _port(self.target) == TLS_PORT

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Headers for every call: bearer token and Modal proxy auth."""
        headers: list[tuple[str, str]] = []
        if self.token:
            headers.append(("authorization", f"Bearer {self.token}"))
        if self.modal_key:
            headers.append(("modal-key", self.modal_key))
        if self.modal_secret:
            headers.append(("modal-secret", self.modal_secret))
        return tuple(headers)


def _port(target: str) -> int | None:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host or host.endswith(":"):
        return None  # no port, or a bare IPv6 address
    return int(port)


def target_from_url(url: str) -> str:
    """`host:port` for gRPC from a URL such as Modal's `https://...modal.run`."""
    parsed = urllib.parse.urlsplit(url)
    if not parsed.hostname:
        raise TargetError(f"not a URL: {url!r}")
    port = parsed.port or (TLS_PORT if parsed.scheme == "https" else 80)
    return f"{parsed.hostname}:{port}"


async def resolve(options: ConnectionOptions) -> ConnectionOptions:
    """Options with the target filled in: looks up `modal_app` when set."""
    if not options.modal_app:
        return options
    try:
        import modal
    except ImportError as exc:
        raise TargetError("--modal-app needs the modal package (pip install modal)") from exc
    server = modal.Server.from_name(
        options.modal_app, options.modal_server, environment_name=options.modal_environment or None
    )
    try:
        url = await server.get_url.aio()
    except Exception as exc:  # noqa: BLE001 - Modal raises many types (auth, not found, network)
        raise TargetError(f"cannot find Modal Server {options.modal_app}/{options.modal_server}: {exc}") from exc
    if not url:
        raise TargetError(f"Modal Server {options.modal_app}/{options.modal_server} has no URL: is it deployed?")
    target = target_from_url(url)
    return replace(options, target=target, tls=True if options.tls is None else options.tls)


def open_channel(options: ConnectionOptions) -> grpc.aio.Channel:
    """A grpc.aio channel to `options.target` (call `resolve` first for Modal)."""
    channel_options = list(CHANNEL_OPTIONS)
    if options.tls_server_name:
        channel_options.append(("grpc.ssl_target_name_override", options.tls_server_name))  # type: ignore[arg-type]
    if not options.use_tls:
        return grpc.aio.insecure_channel(options.target, options=channel_options)
    root = Path(options.ca_file).read_bytes() if options.ca_file else None
    credentials = grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.aio.secure_channel(options.target, credentials, options=channel_options)


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """The connection flags every client shares."""
    group = parser.add_argument_group("connection")
    env = os.environ
    group.add_argument(
        "--target",
        default=env.get("VOICECHAT_TARGET", DEFAULT_TARGET),
        help="server address host:port [env VOICECHAT_TARGET; default %(default)s]",
    )
    group.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="use TLS (default: on when the port is 443 or with --modal-app)",
    )
    group.add_argument("--ca-file", default="", help="PEM file of CA certificates to trust (self-signed servers)")
    group.add_argument("--tls-server-name", default="", help="name to verify the server certificate against")
    group.add_argument(
        "--token",
        default=env.get("VOICECHAT_TOKEN", ""),
        help="bearer token of the service [env VOICECHAT_TOKEN]",
    )
    group.add_argument(
        "--modal-key", default=env.get("VOICECHAT_MODAL_KEY", ""), help="Modal proxy-auth key [env VOICECHAT_MODAL_KEY]"
    )
    group.add_argument(
        "--modal-secret",
        default=env.get("VOICECHAT_MODAL_SECRET", ""),
        help="Modal proxy-auth secret [env VOICECHAT_MODAL_SECRET]",
    )
    group.add_argument("--modal-app", default="", help="find the target of this deployed Modal app (needs modal)")
    group.add_argument(
        "--modal-server", default=DEFAULT_MODAL_SERVER, help="Server class name in the Modal app [%(default)s]"
    )
    group.add_argument("--modal-environment", default="", help="Modal environment of the app")


def options_from_args(args: argparse.Namespace) -> ConnectionOptions:
    # the flags are named after the fields (see add_connection_args)
    return ConnectionOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ConnectionOptions)})

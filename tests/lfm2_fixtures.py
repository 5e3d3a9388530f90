"""Tiny random-weight LFM2-Audio checkpoints and backends, built once per session.

A test module uses them with `pytest_plugins = ["tests.lfm2_fixtures"]`.
Everything is offline: the checkpoints come from scripts/make_tiny_model.py
and load through the same code as the real weights. The backends run in fp32
(not the CPU default) because tests compare outputs exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.make_tiny_model import build  # noqa: E402
from service.backends.lfm2 import LFM2Backend  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LFM2.5-style checkpoint: LFM backbone plus the LFM2.5 detokenizer."""
    return build(tmp_path_factory.mktemp("lfm25-tiny"), variant="lfm2.5", size="tiny")


@pytest.fixture(scope="session")
def tiny_backend(tiny_dir: Path) -> Iterator[LFM2Backend]:
    backend = LFM2Backend(model=str(tiny_dir), revision=None, device="cpu", dtype="fp32")
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def uncached_backend(tiny_dir: Path) -> Iterator[LFM2Backend]:
    """The same weights, re-prefilling the whole conversation every turn."""
    backend = LFM2Backend(model=str(tiny_dir), device="cpu", dtype="fp32", prefix_cache=False)
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def tiny_mimi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LFM2-style checkpoint: no detokenizer, random Mimi weights (~180 MB)."""
    return build(tmp_path_factory.mktemp("lfm2-tiny"), variant="lfm2", size="tiny")


@pytest.fixture(scope="session")
def mimi_backend(tiny_mimi_dir: Path) -> Iterator[LFM2Backend]:
    backend = LFM2Backend(model=str(tiny_mimi_dir), device="cpu", dtype="fp32")
    backend.load()
    yield backend
    backend.close()

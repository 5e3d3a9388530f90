"""The Mimi decoder (LFM2-Audio checkpoints, which ship no LFM2.5 detokenizer).

Needs a ~180 MB random Mimi weight file, written once per session; deselect
this module (`--deselect tests/test_lfm2_mimi.py`) when disk or time is short.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: E402

from service.backends.base import FRAME_SAMPLES, AudioFrame, BackendLoadError, Sampling  # noqa: E402
from service.backends.lfm2 import LFM2Backend  # noqa: E402
from service.backends.lfm2_decode import MimiDecoder  # noqa: E402

pytest_plugins = ["tests.lfm2_fixtures"]
# the bundled Mimi code uses torch.jit.script_method
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


GREEDY = Sampling(text_temperature=0.0, audio_temperature=0.0, audio_top_k=0, max_new_tokens=30)


def codes(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 2048, 8) for _ in range(n)]


def stream(backend: LFM2Backend, frames: list[np.ndarray], batches: list[int]) -> np.ndarray:
    decoder = backend.new_decoder()
    pieces, at = [], 0
    for n in batches:
        pieces.append(decoder.decode(frames[at : at + n]))
        at += n
    pieces.append(decoder.flush())
    decoder.close()
    return np.concatenate(pieces)


def test_lfm2_checkpoint_uses_mimi(mimi_backend: LFM2Backend) -> None:
    assert mimi_backend.decoder_kind == "mimi"
    decoder = mimi_backend.new_decoder()
    assert isinstance(decoder, MimiDecoder)
    decoder.close()
    conversation = mimi_backend.new_conversation("")
    conversation.add_user_text("Hello")
    steps = list(conversation.generate(GREEDY, threading.Event()))
    frames = [s.codes for s in steps if isinstance(s, AudioFrame)]
    assert len(stream(mimi_backend, frames, [1, 5, len(frames) - 6])) == len(frames) * FRAME_SAMPLES


@pytest.mark.parametrize("batches", [[1] * 8, [3, 1, 16, 4]])
def test_mimi_stream_equals_one_shot(mimi_backend: LFM2Backend, batches: list[int]) -> None:
    frames = codes(sum(batches), seed=len(batches))
    with torch.inference_mode():
        one_shot = mimi_backend.processor.mimi.decode(torch.tensor(np.stack(frames, 1))[None]).reshape(-1).numpy()
    streamed = stream(mimi_backend, frames, batches)
    assert len(streamed) == len(frames) * FRAME_SAMPLES
    assert np.abs(streamed - np.clip(one_shot, -1, 1)).max() < 1e-5


def test_concurrent_mimi_streams_do_not_share_state(mimi_backend: LFM2Backend) -> None:
    inputs = [codes(6, seed=10), codes(6, seed=11)]
    expected = [stream(mimi_backend, f, [2, 2, 2]) for f in inputs]
    results: list[np.ndarray | None] = [None, None]
    barrier = threading.Barrier(2)

    def worker(i: int) -> None:
        decoder = mimi_backend.new_decoder()
        barrier.wait()
        pieces = [decoder.decode(inputs[i][k : k + 2]) for k in range(0, 6, 2)]
        decoder.close()
        results[i] = np.concatenate(pieces)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for got, want in zip(results, expected, strict=True):
        assert got is not None and np.abs(got - want).max() < 1e-5
    pool = mimi_backend._mimi_pool
    assert pool is not None and pool.size == 2  # two streams at once, weights shared
    first, second = pool.acquire(), pool.acquire()
    weight = mimi_backend.processor.mimi.decoder.model[0].conv.conv.weight
    assert first is not second and first.decoder.model[0].conv.conv.weight is weight
    assert second.decoder.model[0].conv.conv.weight is weight
    pool.release(first)
    pool.release(second)


def test_detokenizer_requested_on_a_mimi_checkpoint(tiny_mimi_dir: Path) -> None:
    with pytest.raises(BackendLoadError, match="audio_detokenizer.*make download"):
        LFM2Backend(model=str(tiny_mimi_dir), device="cpu", decoder="detokenizer").load()

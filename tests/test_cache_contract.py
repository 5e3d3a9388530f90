"""The contract between transformers' LFM2 layers and the caches we hand them.

A small random LFM2 backbone (the installed transformers' own `Lfm2Model`) runs
through exactly what the service does with it: a prefill in chunks, single-token
steps, a rollback of a response, a snapshot and restore around a speculative
response, and a batched step over rows of different lengths. Every cache call the
layers make is recorded; a method outside `LAYER_PROTOCOL`, or one our caches do
not implement, fails with its name. Every output is compared with a forward of
the whole sequence without any cache.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from transformers import Lfm2Config, Lfm2Model

from service.backends.base import CacheStats
from service.backends.lfm2_cache import (
    LAYER_PROTOCOL,
    ConversationCache,
    PrefixCache,
    SlotCache,
    StepCache,
    forward_positions,
    forward_step,
)

VERSION = transformers.__version__
LAYERS = ["conv", "full_attention", "conv", "conv", "full_attention", "conv"]
OURS = {"begin", "end", "length", "positions", "mask", "advance"}  # what forward_positions/forward_step use


class Recorder:
    """A cache wrapper that records which methods the layers call and fails,
    naming the method, on any call outside the protocol."""

    def __init__(self, inner: ConversationCache | StepCache) -> None:
        self._inner = inner
        self.calls: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name in OURS:
            return getattr(self._inner, name)
        if name not in LAYER_PROTOCOL or not callable(getattr(type(self._inner), name, None)):
            pytest.fail(
                f"transformers {VERSION}: the LFM2 layers use cache.{name}, which is not in LAYER_PROTOCOL or not "
                f"implemented by {type(self._inner).__name__} (service/backends/lfm2_cache.py): implement it there"
            )
        self.calls.add(name)
        return getattr(self._inner, name)


@pytest.fixture(scope="module")
def lfm() -> Lfm2Model:
    torch.manual_seed(0)
    config = Lfm2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=len(LAYERS), num_attention_heads=4,
        num_key_value_heads=2, layer_types=LAYERS, conv_L_cache=3, max_position_embeddings=256,
    )  # fmt: skip
    return Lfm2Model(config).eval()


@pytest.fixture
def inputs(lfm: Lfm2Model) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, 16, lfm.config.hidden_size)


def full(lfm: Lfm2Model, embeddings: torch.Tensor) -> torch.Tensor:
    """The reference: the whole sequence in one forward, no cache."""
    with torch.inference_mode():
        return lfm(inputs_embeds=embeddings, use_cache=False).last_hidden_state


def run(lfm: Lfm2Model, cache: ConversationCache, embeddings: torch.Tensor, calls: set[str]) -> torch.Tensor:
    recorder = Recorder(cache)
    with torch.inference_mode():
        out = forward_positions(lfm, embeddings, recorder)  # type: ignore[arg-type]
    calls |= recorder.calls
    return out


def test_prefill_and_steps_equal_one_full_forward(lfm: Lfm2Model, inputs: torch.Tensor) -> None:
    calls: set[str] = set()
    cache = ConversationCache(LAYERS)
    outs = [run(lfm, cache, inputs[:, :5], calls), run(lfm, cache, inputs[:, 5:9], calls)]  # a chunked prefill
    outs += [run(lfm, cache, inputs[:, i : i + 1], calls) for i in range(9, 16)]  # single-token steps
    assert cache.length == cache.get_seq_length() == 16
    torch.testing.assert_close(torch.cat(outs, 1), full(lfm, inputs), rtol=1e-4, atol=1e-5)
    # the two paths of the short conv (a multi-token update, an in-place single-token step) and attention ran
    assert {"update", "update_conv_state", "get_conv_state"} <= calls


def test_rollback_keeps_the_prefix_and_never_falls_back(lfm: Lfm2Model, inputs: torch.Tensor) -> None:
    calls: set[str] = set()
    stats = CacheStats()
    prefix = PrefixCache(stats)
    cache = ConversationCache(LAYERS)
    run(lfm, cache, inputs[:, :8], calls)
    prefix.mark(cache, 8)
    for i in range(8, 12):  # a response the next turn does not keep
        run(lfm, cache, inputs[:, i : i + 1], calls)
        prefix.tail.append(object())  # type: ignore[arg-type]
    prefix.rollback()
    assert (cache.length, prefix.total, stats.fallbacks) == (8, 8, 0)
    other = torch.randn(1, 3, lfm.config.hidden_size)
    got = torch.cat([run(lfm, cache, other[:, i : i + 1], calls) for i in range(3)], 1)
    expected = full(lfm, torch.cat([inputs[:, :8], other], 1))[:, 8:]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_rollback_that_cannot_keep_the_prefix_is_counted(lfm: Lfm2Model, inputs: torch.Tensor) -> None:
    stats = CacheStats()
    prefix = PrefixCache(stats)
    cache = ConversationCache(LAYERS)
    run(lfm, cache, inputs[:, :4], set())
    prefix.mark(cache, 4)
    run(lfm, cache, inputs[:, 4:5], set())
    prefix.tail.append(object())  # type: ignore[arg-type]
    prefix._conv = {}  # the conv states at the prefix are lost
    prefix.rollback()
    assert stats.fallbacks == 1 and prefix.cache is None and prefix.total == 0


def test_restore_puts_positions_and_states_back(lfm: Lfm2Model, inputs: torch.Tensor) -> None:
    """Undoing a speculative response leaves the positions the cache reports
    where they were (they used to run ahead by the speculation's length)."""
    calls: set[str] = set()
    prefix = PrefixCache()
    cache = ConversationCache(LAYERS)
    run(lfm, cache, inputs[:, :6], calls)
    prefix.mark(cache, 6)
    snapshot = prefix.snapshot()
    run(lfm, cache, inputs[:, 6:10], calls)  # speculative: a prefill of the turn so far
    run(lfm, cache, inputs[:, 10:11], calls)  # and a step of its response
    prefix.restore(snapshot)
    assert cache.length == cache.get_seq_length() == prefix.total == 6
    got = run(lfm, cache, inputs[:, 6:9], calls)
    torch.testing.assert_close(got, full(lfm, inputs[:, :9])[:, 6:], rtol=1e-4, atol=1e-5)


def test_a_batched_step_equals_each_row_alone(lfm: Lfm2Model, inputs: torch.Tensor) -> None:
    calls: set[str] = set()
    lengths = [7, 3, 11]
    slots = SlotCache(lfm.config, torch.float32, torch.device("cpu"))
    seqs = [torch.randn(1, n + 1, lfm.config.hidden_size) for n in lengths]
    for slot, (n, seq) in enumerate(zip(lengths, seqs, strict=True)):
        cache = ConversationCache(LAYERS)
        run(lfm, cache, seq[:, :n], calls)
        slots.load(slot, cache)
    step = slots.step(0, len(lengths))
    recorder = Recorder(step)
    with torch.inference_mode():
        out = forward_step(lfm, torch.cat([seq[:, -1:] for seq in seqs]), recorder)  # type: ignore[arg-type]
    assert slots.lengths == [n + 1 for n in lengths]
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(out[row, -1], full(lfm, seq)[0, -1], rtol=1e-4, atol=1e-5)
    stored = ConversationCache(LAYERS)
    slots.store(1, stored)
    assert stored.length == lengths[1] + 1
    assert recorder.calls <= set(LAYER_PROTOCOL)


def test_both_caches_implement_the_whole_protocol() -> None:
    for cls in (ConversationCache, StepCache):
        missing = [name for name in LAYER_PROTOCOL if not callable(getattr(cls, name, None))]
        assert not missing, f"{cls.__name__} lacks {missing}"

"""A conversation's model cache, kept across turns, and the batched decode state.

`ConversationCache` is the cache object handed to transformers' LFM2 layers
(their protocol: `LAYER_PROTOCOL`). `PrefixCache` keeps one conversation's
cache for a prefix of its history. `SlotCache` holds every
generating conversation's cache in one set of batched tensors, a row per
conversation, for the batched engine's decode steps.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from service.backends.base import CacheStats

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Position:
    """One generated position the cache holds: a text id or a frame's codes."""

    flag: int
    value: int | tuple[int, ...]


# -- the protocol transformers' LFM2 layers call ----------------------------------------
#
# The backbone's attention and short-conv layers read and extend whatever cache
# object they are handed through these methods, and through no others when the
# caller passes explicit position ids and a ready-made mask per layer type (we
# always do: `LFM2Backend.forward` and `forward_rows`). The set is the union of
# what the releases we support call (5.23 and 5.25); tests/test_cache_contract.py
# drives a small LFM2 through prefill, steps, rollback and snapshot/restore and
# names any method a new release calls that is not listed here.
LAYER_PROTOCOL = (
    "update",  # attention: append this forward's keys/values, return the keys/values to attend over
    "get_conv_state",  # short conv: the state a single-token step updates in place (None before a prefill)
    "is_recording_past",  # short conv: False, so a single-token step takes the in-place path
    "increase_count",  # short conv (5.25+): a single-token step ran in place
    "update_conv_state",  # short conv: a multi-token forward; returns past state + new inputs
    "get_seq_length",  # only when no position ids are passed; answered from our explicit length
)


class ConversationCache:
    """One conversation's model cache, in a layout this project owns.

    Per attention layer the keys and values of every position held
    (1, kv_heads, positions, head_dim); per short-conv layer its state
    (1, hidden, kernel). `length` is the number of positions held, set
    explicitly: `begin(n)` before a forward of `n` positions, `end()` after
    it succeeded. Nothing is inferred from tensor shapes or from counters the
    layers bump, so rollback and restore cannot leave positions running ahead.

    Keys and values only ever grow by concatenation and shrink by slicing
    (never written in place), so a snapshot keeps references; conv states
    are updated in place by single-token steps, so snapshots copy them."""

    def __init__(self, layer_types: list[str]) -> None:
        self.attention = [i for i, kind in enumerate(layer_types) if kind != "conv"]
        self.conv = [i for i, kind in enumerate(layer_types) if kind == "conv"]
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.states: dict[int, torch.Tensor] = {}
        self.length = 0  # positions held
        self._adding = 0  # positions the forward in progress adds

    # -- what the caller does --------------------------------------------------------
    def begin(self, positions: int, device: torch.device) -> torch.Tensor:
        """A forward of `positions` new positions starts; returns their position ids (1, positions)."""
        self._adding = positions
        return torch.arange(self.length, self.length + positions, device=device)[None, :]

    def end(self) -> None:
        """The forward succeeded: the new positions are held."""
        self.length += self._adding
        self._adding = 0
        for i in self.attention:
            held = self.keys[i].shape[-2] if i in self.keys else 0
            if held != self.length:
                raise RuntimeError(f"attention layer {i} holds {held} positions, not {self.length}")

    def crop(self, length: int, states: dict[int, torch.Tensor]) -> None:
        """Keep the first `length` positions; `states` are the conv states at that length."""
        for store in (self.keys, self.values):
            for i, tensor in store.items():
                store[i] = tensor[:, :, :length]
        self.states = {i: s.clone() for i, s in states.items()}
        self.length, self._adding = length, 0

    def conv_copy(self) -> dict[int, torch.Tensor]:
        return {i: s.clone() for i, s in self.states.items()}

    # -- what the layers call (LAYER_PROTOCOL) ---------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return self.states.get(layer_idx) if state_idx == 0 else None

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def increase_count(self, layer_idx: int, state_idx: int = 0) -> None:
        pass  # positions are counted by begin()/end(), not by the layers

    def update_conv_state(self, inputs: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs: Any) -> torch.Tensor:  # fmt: skip
        if state_idx != 0:
            raise RuntimeError(f"short-conv layer {layer_idx} asks for state {state_idx}; LFM2 has one")
        past = self.states.get(layer_idx)
        if past is None:
            kernel = int(conv_kernel_size or inputs.shape[-1])
            past = inputs.new_zeros((*inputs.shape[:-1], kernel))
        full = torch.cat([past, inputs], dim=-1)
        self.states[layer_idx] = full[..., -past.shape[-1] :].clone()
        return full

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def to_device(values: Sequence[float] | Sequence[int], device: torch.device) -> torch.Tensor:
    """A small host list on `device` without waiting for the device: on CUDA
    the copy goes from pinned memory and does not block (a plain
    `torch.tensor(values, device=...)` synchronises the stream)."""
    if device.type != "cuda":
        return torch.tensor(values, device=device)
    return torch.tensor(values, pin_memory=True).to(device, non_blocking=True)


def _cache_kwarg(lfm: torch.nn.Module) -> str:
    """The backbone's name for the cache argument ("cache" from transformers 5.25, "past_key_values" before)."""
    cls = type(lfm)
    name = _CACHE_KWARG.get(cls)
    if name is None:
        name = _CACHE_KWARG[cls] = "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
    return name


_CACHE_KWARG: dict[type, str] = {}


def _mask(lfm: torch.nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask in the form the configured attention implementation takes."""
    if getattr(lfm.config, "_attn_implementation", None) == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def forward_positions(lfm: torch.nn.Module, embeddings: torch.Tensor, cache: ConversationCache) -> torch.Tensor:
    """Run `embeddings` (1, n, dim) through the backbone `lfm` after the positions
    `cache` holds, at explicit position ids under an explicit causal mask (so the
    layers infer nothing from the cache), and extend `cache` by n. Returns the
    hidden states (1, n, dim)."""
    count = embeddings.shape[1]
    positions = cache.begin(count, embeddings.device)
    keys = torch.arange(cache.length + count, device=embeddings.device)
    allowed = (keys[None, :] <= positions[0, :, None])[None, None]  # (1, 1, n, past + n)
    masks = {"full_attention": _mask(lfm, allowed, embeddings.dtype), "conv": None}
    out = lfm(inputs_embeds=embeddings, attention_mask=masks, position_ids=positions, use_cache=True,
              **{_cache_kwarg(lfm): cache})  # fmt: skip
    cache.end()
    return out.last_hidden_state


def forward_step(lfm: torch.nn.Module, embeddings: torch.Tensor, step: StepCache) -> torch.Tensor:
    """One decode step of a batch of rows, `embeddings` (rows, 1, dim), each row
    at its own position through `step`; counts the step in the slots once it ran.
    Returns the hidden states (rows, 1, dim)."""
    masks = {"full_attention": _mask(lfm, step.mask, embeddings.dtype), "conv": None}  # one real position per row
    out = lfm(inputs_embeds=embeddings, attention_mask=masks, position_ids=step.positions, use_cache=True,
              **{_cache_kwarg(lfm): step})  # fmt: skip
    step.advance()
    return out.last_hidden_state


class PrefixCache:
    """A conversation's model cache for a prefix of its history.

    After each prefill the cache holds exactly the history so far (`length`
    positions) and its short-conv states are kept aside. Generation then
    extends it by the steps it feeds back (`tail`). At the next turn the tail
    is kept when the history continues with those very steps (an untruncated
    response); otherwise the cache is rolled back to `length`: attention KV
    is cropped and the conv states restored (conv state cannot be cropped)."""

    def __init__(self, stats: CacheStats | None = None) -> None:
        self.cache: ConversationCache | None = None
        self.length = 0
        self.tail: list[Position] = []
        self._conv: dict[int, torch.Tensor] = {}
        self._stats = stats or CacheStats()

    @property
    def total(self) -> int:
        return self.length + len(self.tail)

    def reset(self) -> None:
        self.cache, self.length, self.tail, self._conv = None, 0, [], {}

    def mark(self, cache: ConversationCache, length: int) -> None:
        """`cache` now holds exactly the first `length` history positions."""
        if cache.length != length:
            raise RuntimeError(f"the model cache holds {cache.length} positions, not the history's {length}")
        self.cache, self.length, self.tail = cache, length, []
        self._conv = cache.conv_copy()

    def snapshot(self) -> object:
        """The cache as it is now, for `restore` (undoing a speculative turn
        keeps the cache of the history before it)."""
        cache = self.cache
        if cache is None:
            return None
        held = (dict(cache.keys), dict(cache.values), cache.conv_copy(), cache.length)
        return cache, held, self.length, list(self.tail), self._conv

    def restore(self, snapshot: object) -> None:
        """Put the cache back as it was at `snapshot()`, positions included."""
        if snapshot is None:
            self.reset()
            return
        assert isinstance(snapshot, tuple)
        cache, (keys, values, states, held), length, tail, conv = snapshot
        cache.keys, cache.values, cache.states, cache.length = dict(keys), dict(values), states, held
        self.cache, self.length, self.tail, self._conv = cache, length, list(tail), conv

    def rollback(self) -> None:
        """Forget the tail. Falls back to a full prefill (counted) only when
        the cache does not hold the positions it should."""
        cache = self.cache
        if cache is None or not self.tail:
            self.tail = []
            return
        self.tail = []
        if cache.length < self.length or not self._conv and cache.conv:
            self._stats.fallbacks += 1
            log.warning("model cache holds %d positions, the prefix %d; falling back to full prefill",
                        cache.length, self.length)  # fmt: skip
            self.reset()
            return
        cache.crop(self.length, self._conv)


class SlotCache:
    """The model cache of every decoding row, in batched tensors.

    Row `i` of each buffer is slot `i`: per attention layer a key and a value
    buffer (slots, kv_heads, capacity, head_dim), per short-conv layer a state
    buffer (slots, hidden, kernel). A slot's positions are stored from index
    0 on (right padding), so a row that joins or leaves moves no other row's
    data; a decode step writes each row's new key at its own length and
    attends over the longest row with a mask. The alternative, gathering
    per-row caches into a left-padded batch every step, copies every row's
    whole KV per step, a cost that grows with rows and positions
    (docs/benchmarks.md). Here a step copies no KV; a row's cache is copied once when it joins and once when
    it leaves.

    A conversation's cache is copied in when its row starts decoding
    (`load`) and back out when it ends (`store`). Buffers grow on demand
    (slots up to the engine's batch, positions in steps of `_GROW`) and start
    zeroed; stale positions a previous row left in a slot are zeroed before
    another row uses the slot, so a masked position never holds a NaN that
    a masked-out attention weight of 0 would turn into a NaN output.
    """

    _GROW = 256

    def __init__(self, config: Any, dtype: torch.dtype, device: torch.device) -> None:
        kinds = list(config.layer_types)
        self.attention = [i for i, kind in enumerate(kinds) if kind != "conv"]
        self.conv = [i for i, kind in enumerate(kinds) if kind == "conv"]
        self._kv_heads = int(config.num_key_value_heads)
        self._head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self._hidden = int(config.hidden_size)
        self._kernel = int(config.conv_L_cache)
        self.dtype, self.device = dtype, device
        self.slots = 0
        self.capacity = 0  # positions per slot
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.states: dict[int, torch.Tensor] = {}
        self.lengths: list[int] = []  # positions each slot holds
        self._dirty: list[int] = []  # positions written in each slot since it was last cleaned

    @property
    def bytes_per_position(self) -> int:
        return 2 * len(self.attention) * self._kv_heads * self._head_dim * torch.finfo(self.dtype).bits // 8

    def reserve(self, slots: int, positions: int) -> None:
        """Make room for `slots` slots of `positions` positions each."""
        if slots <= self.slots and positions <= self.capacity:
            return
        slots = max(slots, self.slots)
        capacity = max(self.capacity, -(-positions // self._GROW) * self._GROW)
        self._resize(slots, capacity)

    def trim(self) -> None:
        """Give memory back once the longest row left: shrink to twice what the
        rows now hold when the buffers are four times larger."""
        needed = max(self.lengths, default=0) + 1
        if self.capacity > 4 * needed and self.capacity > 4 * self._GROW:
            self._resize(self.slots, -(-2 * needed // self._GROW) * self._GROW)

    def _resize(self, slots: int, capacity: int) -> None:
        keep_slots, keep = min(slots, self.slots), min(capacity, self.capacity)
        shape = (slots, self._kv_heads, capacity, self._head_dim)
        for store in (self.keys, self.values):
            for i in self.attention:
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i in store:
                    new[:keep_slots, :, :keep] = store[i][:keep_slots, :, :keep]
                store[i] = new
        for i in self.conv:
            new = torch.zeros((slots, self._hidden, self._kernel), dtype=self.dtype, device=self.device)
            if i in self.states:
                new[:keep_slots] = self.states[i][:keep_slots]
            self.states[i] = new
        self.lengths = (self.lengths + [0] * slots)[:slots]
        self._dirty = [min(d, capacity) for d in (self._dirty + [0] * slots)[:slots]]
        self.slots, self.capacity = slots, capacity

    def _clean(self, slot: int, length: int) -> None:
        """Zero what a previous row left in `slot` beyond `length`."""
        dirty = self._dirty[slot]
        if dirty > length:
            for store in (self.keys, self.values):
                for i in self.attention:
                    store[i][slot, :, length:dirty] = 0
        self._dirty[slot] = length

    def load(self, slot: int, cache: ConversationCache) -> None:
        """Copy a conversation's cache into `slot`."""
        length = cache.length
        self.reserve(slot + 1, length + 1)
        for i in self.attention:
            keys, values = cache.keys.get(i), cache.values.get(i)
            if keys is None or values is None or keys.shape[-2] != length:
                raise RuntimeError(f"model cache layer {i} does not hold {length} positions")
            self.keys[i][slot, :, :length] = keys[0]
            self.values[i][slot, :, :length] = values[0]
        for i in self.conv:
            state = cache.states.get(i)
            if state is None:
                raise RuntimeError(f"model cache layer {i} has no short-conv state")
            self.states[i][slot] = state[0]
        self._clean(slot, length)
        self.lengths[slot] = length

    def store(self, slot: int, cache: ConversationCache) -> None:
        """Copy `slot` back into the conversation's cache (which `load` filled)."""
        length = self.lengths[slot]
        for i in self.attention:
            cache.keys[i] = self.keys[i][slot : slot + 1, :, :length].clone()
            cache.values[i] = self.values[i][slot : slot + 1, :, :length].clone()
        for i in self.conv:
            cache.states[i] = self.states[i][slot : slot + 1].clone()
        cache.length = length

    def swap(self, a: int, b: int) -> None:
        """Exchange two slots' contents."""
        if a == b:
            return
        span = max(self.lengths[a], self.lengths[b])
        for store in (self.keys, self.values):
            for i in self.attention:
                buf = store[i]
                buf[[a, b], :, :span] = buf[[b, a], :, :span]
        for i in self.conv:
            self.states[i][[a, b]] = self.states[i][[b, a]]
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]
        self._dirty[a] = self._dirty[b] = max(self._dirty[a], self._dirty[b])

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def step(self, start: int, stop: int) -> StepCache:
        """The cache a decode step of slots start..stop-1 passes to the model."""
        self.reserve(stop, max(self.lengths[start:stop]) + 1)
        return StepCache(self, start, stop)

    def conv_snapshot(self, start: int, stop: int) -> list[torch.Tensor]:
        """The short-conv states of slots start..stop-1 (a step updates them in place)."""
        return [self.states[i][start:stop].clone() for i in self.conv]

    def restore_conv(self, start: int, stop: int, snapshot: list[torch.Tensor]) -> None:
        for i, state in zip(self.conv, snapshot, strict=True):
            self.states[i][start:stop] = state


class StepCache:
    """One decode step's view of a run of slots, in the shape of the cache
    object transformers' LFM2 layers call: `update` writes each row's new key
    and value at the row's length and returns the keys up to the longest row;
    `get_conv_state` returns the rows' conv states, which the model updates in
    place. `positions` and `mask` are the step's position ids and attention
    mask; `advance()` counts the step once the forward succeeded. It answers
    the same `LAYER_PROTOCOL` as `ConversationCache`."""

    def __init__(self, slots: SlotCache, start: int, stop: int) -> None:
        self._slots, self._start, self._stop = slots, start, stop
        lengths = slots.lengths[start:stop]
        self._span = max(lengths) + 1
        device = slots.device
        self._rows = torch.arange(stop - start, device=device)
        at = to_device(lengths, device)
        self._at = at
        self.positions = at[:, None]
        self.mask = (torch.arange(self._span, device=device)[None, :] <= at[:, None])[:, None, None, :]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        keys = self._slots.keys[layer_idx][self._start : self._stop]
        values = self._slots.values[layer_idx][self._start : self._stop]
        keys[self._rows, :, self._at] = key[:, :, -1]
        values[self._rows, :, self._at] = value[:, :, -1]
        return keys[:, :, : self._span], values[:, :, : self._span]

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self._slots.states[layer_idx][self._start : self._stop]

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def increase_count(self, layer_idx: int, state_idx: int = 0) -> None:
        pass  # positions are counted by advance(), not by the layers

    def update_conv_state(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("a batched decode step feeds one position per row; the layers asked for a multi-token update")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise RuntimeError("a batched decode step passes explicit position ids")

    def advance(self) -> None:
        slots = self._slots
        for slot in range(self._start, self._stop):
            slots.lengths[slot] += 1
            slots._dirty[slot] = max(slots._dirty[slot], slots.lengths[slot])

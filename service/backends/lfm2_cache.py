"""A conversation's model cache, kept across turns, and the batched decode state.

`PrefixCache` is one conversation's cache (attention KV and short-conv state
in a `DynamicCache`) for a prefix of its history. `SlotCache` holds every
generating conversation's cache in one set of batched tensors, a row per
conversation, for the batched engine's decode steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Position:
    """One generated position the cache holds: a text id or a frame's codes."""

    flag: int
    value: int | tuple[int, ...]


class PrefixCache:
    """A conversation's model cache for a prefix of its history.

    After each prefill the cache holds exactly the history so far (`length`
    positions) and its short-conv states are snapshotted. Generation then
    extends it by the steps it feeds back (`tail`). At the next turn the tail
    is kept when the history continues with those very steps (an untruncated
    response); otherwise the cache is rolled back to `length`: attention KV
    is cropped and the conv states restored (conv state cannot be cropped)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.length = 0
        self.tail: list[Position] = []
        self._conv: list[tuple[Any, dict[int, torch.Tensor]]] = []

    @property
    def total(self) -> int:
        return self.length + len(self.tail)

    def reset(self) -> None:
        self.cache, self.length, self.tail, self._conv = None, 0, [], []

    def mark(self, cache: DynamicCache, length: int) -> None:
        """`cache` now holds exactly the first `length` history positions."""
        self.cache, self.length, self.tail = cache, length, []
        self._conv = [
            (layer, {i: s.clone() for i, s in layer.conv_states.items() if s is not None})
            for layer in cache.layers
            if hasattr(layer, "conv_states")
        ]

    def snapshot(self) -> object:
        """The cache as it is now, for `restore` (undoing a speculative turn
        keeps the cache of the history before it). Attention KV tensors are
        never written in place (they grow by concatenation and are cropped by
        slicing), so references keep them; short-conv states are updated in
        place, so they are copied."""
        cache = self.cache
        if cache is None:
            return None
        layers = [
            (layer, getattr(layer, "keys", None), getattr(layer, "values", None),
             {i: s.clone() for i, s in layer.conv_states.items() if s is not None}
             if hasattr(layer, "conv_states") else None)
            for layer in cache.layers
        ]  # fmt: skip
        return cache, layers, self.length, list(self.tail), self._conv

    def restore(self, snapshot: object) -> None:
        """Put the cache back as it was at `snapshot()`."""
        if snapshot is None:
            self.reset()
            return
        assert isinstance(snapshot, tuple)
        cache, layers, length, tail, conv = snapshot
        for layer, keys, values, states in layers:
            if states is None:
                layer.keys, layer.values = keys, values
            else:
                for i, state in states.items():
                    layer.conv_states[i].copy_(state)
        self.cache, self.length, self.tail, self._conv = cache, length, list(tail), conv

    def rollback(self) -> None:
        """Forget the tail; drop the cache when its layout is not understood."""
        cache = self.cache
        if cache is None or not self.tail:
            self.tail = []
            return
        for layer in cache.layers:
            if isinstance(layer, DynamicLayer):
                extra = layer.get_seq_length() - self.length
                if extra > 0:
                    layer.crop(-extra)
        for layer, states in self._conv:
            for i, state in states.items():
                layer.conv_states[i].copy_(state)
        self.tail = []
        if cache.get_seq_length() != self.length:
            log.warning("model cache layout not understood; falling back to full prefill")
            self.reset()


class SlotCache:
    """The model cache of every decoding row, in batched tensors.

    Row `i` of each buffer is slot `i`: per attention layer a key and a value
    buffer (slots, kv_heads, capacity, head_dim), per short-conv layer a state
    buffer (slots, hidden, kernel). A slot's positions are stored from index
    0 on (right padding), so a row that joins or leaves moves no other row's
    data; a decode step writes each row's new key at its own length and
    attends over the longest row with a mask. The alternative, gathering
    per-row caches into a left-padded batch every step, copies every row's
    whole KV per step: measured on the full-size model in bf16 on 2 CPU
    cores, 11.8 ms per step at 16 rows of 300 positions, 15.5 ms at 32 rows,
    39 ms at 16 rows of 1000 (a backbone step is 155-184 ms). Here a step
    copies no KV; a row's cache is copied once when it joins and once when
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

    def load(self, slot: int, cache: DynamicCache, length: int) -> None:
        """Copy a conversation's cache, holding `length` positions, into `slot`."""
        self.reserve(slot + 1, length + 1)
        layers: list[Any] = list(cache.layers)
        for i in self.attention:
            layer = layers[i]
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if keys is None or values is None or keys.shape[-2] != length:
                raise RuntimeError(f"model cache layer {i} does not hold {length} positions")
            self.keys[i][slot, :, :length] = keys[0]
            self.values[i][slot, :, :length] = values[0]
        for i in self.conv:
            state = layers[i].conv_states.get(0)
            if state is None:
                raise RuntimeError(f"model cache layer {i} has no short-conv state")
            self.states[i][slot] = state[0]
        self._clean(slot, length)
        self.lengths[slot] = length

    def store(self, slot: int, cache: DynamicCache) -> None:
        """Copy `slot` back into the conversation's cache (which `load` filled)."""
        length = self.lengths[slot]
        layers: list[Any] = list(cache.layers)
        for i in self.attention:
            layer = layers[i]
            layer.keys = self.keys[i][slot : slot + 1, :, :length].clone()
            layer.values = self.values[i][slot : slot + 1, :, :length].clone()
        for i in self.conv:
            layers[i].conv_states[0].copy_(self.states[i][slot : slot + 1])

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
    mask; `advance()` counts the step once the forward succeeded."""

    def __init__(self, slots: SlotCache, start: int, stop: int) -> None:
        self._slots, self._start, self._stop = slots, start, stop
        lengths = slots.lengths[start:stop]
        self._span = max(lengths) + 1
        device = slots.device
        self._rows = torch.arange(stop - start, device=device)
        at = torch.tensor(lengths, device=device)
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

    def advance(self) -> None:
        slots = self._slots
        for slot in range(self._start, self._stop):
            slots.lengths[slot] += 1
            slots._dirty[slot] = max(slots._dirty[slot], slots.lengths[slot])

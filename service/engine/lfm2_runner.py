"""The LFM2-Audio runner: prefill, one batched forward per step, and the heads.

With one forward per response per step, N concurrent responses each run at
1/N of the model's speed, although one backbone step costs about the same for
1 row as for 16 (the weights are read once per step either way). Here every
decoding row advances in one forward:

* prefill: a row's new history is first embedded whole (the audio encoder only
  takes whole audio segments, `LFM2Conversation._history_from`), then the
  backbone runs over the embeddings chunk by chunk, which is exact because it
  is causal. While rows decode, a chunk is at most `prefill_chunk` positions
  and about what one decode step costs in time;
* step: ONE backbone forward for every row with a step to feed back, each row
  at its own position with its own attention mask (`lfm2_cache.SlotCache`);
  then the heads: the text head for rows in text mode, a batched depthformer
  for rows in audio mode, each row with its own temperature and top-k. The
  step rules (`ResponseSteps`) are the serial loop's, so ends, interleaving and
  max_new_tokens agree step for step. A step waits for the device once: every
  row's token or frame comes to the host in one transfer.

Greedy rows produce the tokens and frames they produce alone (the tests compare
with a batch of one); batched matrix products round differently in the last
bits, so exact agreement rests on no two logits being that close.

Each conversation's cache lives in the conversation (`PrefixCache`) between
turns and is copied into a slot of the batched cache while it generates, and
back out at the end, so turn N prefills only what is new. An error in the
batched forward is retried row by row to find the failing rows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from service.backends.base import AudioFrame, EndReason, GenerateMode, Sampling, TextToken
from service.backends.lfm2 import (
    AUDIO_VOCAB,
    LFM2Conversation,
    PrefillPlan,
    ResponseSteps,
    end_of_audio_filled,
    sampler_args,
)
from service.backends.lfm2_cache import SlotCache, to_device
from service.backends.lfm2_decode import inference
from service.engine.api import FatalEngineError, GenerationRequest, TextStream, UserTurn
from service.engine.runner import Row, Runner, StepOut

if TYPE_CHECKING:
    from service.backends.lfm2 import LFM2Backend

log = logging.getLogger(__name__)

Params = tuple[float | None, int | None]  # the package's (temperature, top_k); (None, None) is greedy


# -- batched sampling ---------------------------------------------------------------


def sample_rows(logits: torch.Tensor, params: Sequence[Params]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `logits` (rows, vocab), by the package's rules:
    greedy is the argmax; otherwise the logits are divided by the
    temperature, cut to the top k and sampled. Returns the tokens and, per
    row, whether its probabilities were finite (the package's sampler raises
    on those; the caller fails them). Both stay on the device: nothing here
    waits for it."""
    tokens = logits.argmax(-1)
    ok = torch.isfinite(logits).all(-1)
    sampled = [i for i, (temperature, _) in enumerate(params) if temperature is not None]
    if not sampled:
        return tokens, ok
    device = logits.device
    rows = to_device(sampled, device)
    temperatures = [t for t, _ in (params[i] for i in sampled) if t is not None]
    x = logits[rows].float() / to_device(temperatures, device)[:, None]
    vocab = x.shape[-1]
    ks = [min(params[i][1] or vocab, vocab) for i in sampled]
    kth = torch.topk(x, max(ks), dim=-1).values.gather(1, to_device(ks, device)[:, None] - 1)
    probs = x.masked_fill(x < kth, -math.inf).softmax(-1)
    finite = torch.isfinite(probs).all(-1)
    ok[rows] = finite
    probs = torch.where(finite[:, None], probs, torch.ones_like(probs))  # let the others draw
    tokens[rows] = torch.multinomial(probs, 1)[:, 0]
    return tokens, ok


def sample_frames(model: Any, hidden: torch.Tensor, params: Sequence[Params]) -> tuple[torch.Tensor, torch.Tensor]:
    """The package's `_sample_audio_frame` for a batch of rows: `hidden`
    (rows, dim) -> frames (rows, codebooks), each codebook sampled from the
    depthformer given the codes before it, and per row whether every
    codebook's probabilities were finite. All rows are at the same
    depthformer position, so the batch needs no mask."""
    rows, books, dim = hidden.shape[0], model.codebooks, model.depthformer_dim
    inputs = model.depth_linear(hidden).view(rows, books, dim)
    token = torch.zeros_like(inputs[:, 0])
    cache = None
    codes: list[torch.Tensor] = []
    ok = torch.ones(rows, dtype=torch.bool, device=hidden.device)
    for i in range(books):
        out, cache = model.depthformer.forward_cached((inputs[:, i] + token)[:, None, :], cache)
        logits = model.depth_embeddings[i].get_logits(out[:, 0])
        code, finite = sample_rows(logits, params)
        ok &= finite
        codes.append(code)
        token = model.depth_embeddings[i](code)
    return torch.stack(codes, 1), ok


class _Ema:
    """An exponential moving average (None until the first sample)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.value: float | None = None
        self._weight = weight

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self._weight * (sample - self.value)


class _State:
    """A row's model state: prefilling, then decoding."""

    def __init__(self, sampling: Sampling, backend: LFM2Backend) -> None:
        self.text_params: Params = sampler_args(sampling.text_temperature, sampling.text_top_k, backend.text_vocab)
        self.audio_params: Params = sampler_args(sampling.audio_temperature, sampling.audio_top_k, AUDIO_VOCAB)
        self.text = TextStream(backend.detokenize)
        self.steps: ResponseSteps | None = None
        self.plan: PrefillPlan | None = None
        self.embeddings: torch.Tensor | None = None  # the new history, embedded, while prefilling
        self.prefilled = 0  # positions of the plan run so far
        self.prefill_started = 0.0
        self.slot: int | None = None  # index in the batch while decoding
        self.hidden: torch.Tensor | None = None  # a hidden state to sample from
        self.fed: torch.Tensor | None = None  # the embedding of the last step, to feed next
        self.suspended = False  # out of the batch for a while; its cache is in the conversation


def _state(row: Row) -> _State:
    assert isinstance(row.model, _State)
    return row.model


def _conversation(row: Row) -> LFM2Conversation:
    assert isinstance(row.state, LFM2Conversation)
    return row.state


class LFM2Runner(Runner):
    """Every decoding LFM2 row in one batched forward per step."""

    MIN_CHUNK = 16  # smallest prefill chunk the time budget may ask for

    def __init__(self, backend: LFM2Backend, *, max_batch: int, prefill_chunk: int) -> None:
        self.backend = backend
        self._lfm2 = backend
        self.max_batch = max(1, int(max_batch))
        self.prefill_chunk = max(1, int(prefill_chunk))
        self._slots = SlotCache(backend.model.lfm.config, backend.dtype, backend.device)
        self._decoding: list[Row] = []  # row i is in slot i
        self.step_ms = _Ema()  # one decode step (forward + heads)
        self.prefill_ms_per_position = _Ema()
        self.max_positions = int(getattr(backend.model.lfm.config, "max_position_embeddings", 0) or 0)
        with inference():
            self._slots.reserve(min(self.max_batch, 8), 512)  # no allocation on the first requests

    @contextlib.contextmanager
    def engine_thread(self) -> Iterator[None]:
        with inference():  # the engine thread only runs the model
            yield

    @contextlib.contextmanager
    def iteration(self) -> Iterator[None]:
        with self._lfm2.step_lock, inference():
            yield

    @contextlib.contextmanager
    def editing(self) -> Iterator[None]:
        with inference():
            yield

    def fits(self, row: Row) -> str | None:
        if not self.max_positions:
            return None
        history = int(_conversation(row).chat.modality_flag.shape[1])
        if history + row.request.sampling.max_new_tokens > self.max_positions:
            return (f"the conversation holds {history} positions; with {row.request.sampling.max_new_tokens} "
                    f"more it would outgrow the model's context of {self.max_positions}")  # fmt: skip
        return None

    def start(self, row: Row) -> bool:
        state = _conversation(row)
        row.model = model = _State(row.request.sampling, self._lfm2)
        user = row.request.user
        if user.audio is not None and len(user.audio):
            state.add_user_audio(user.audio, user.audio_rate)
        if user.text:
            state.add_user_text(user.text)
        state.begin_response()
        model.steps = state.response_steps(row.request.sampling)
        return model.steps.steps_left > 0

    # -- prefill --------------------------------------------------------------------
    def prefill_budget(self) -> float:
        """At most `prefill_chunk`, and about what one decode step costs in time."""
        budget = self.prefill_chunk
        step, per_position = self.step_ms.value, self.prefill_ms_per_position.value
        if step is not None and per_position:
            budget = min(budget, max(self.MIN_CHUNK, int(step / per_position)))
        return budget

    def prefill(self, rows: list[Row], budget: float) -> list[tuple[Row, BaseException | None]]:
        model = self._lfm2.model
        done: list[tuple[Row, BaseException | None]] = []
        for row in rows:
            if budget <= 0:
                break
            state = _state(row)
            try:
                if state.plan is None:
                    state.prefill_started = time.perf_counter()
                    state.plan = _conversation(row).plan_prefill()
                    state.embeddings = model._prefill(**state.plan.inputs)  # the audio encoder: whole segments
                plan, embeddings = state.plan, state.embeddings
                assert embeddings is not None
                count = int(min(budget, plan.positions - state.prefilled))
                started = time.perf_counter()
                hidden = self._lfm2.forward(embeddings[:, state.prefilled : state.prefilled + count], plan.cache)
                if count >= self.MIN_CHUNK:
                    self._lfm2.synchronize()  # the time feeds the budget: the device's work, not the launch
                    self.prefill_ms_per_position.add((time.perf_counter() - started) * 1000 / count)
                state.prefilled += count
                budget -= count
                if state.prefilled < plan.positions:
                    continue
                _conversation(row).prefill_done(plan, state.prefill_started)
                state.embeddings = None
                slot = len(self._decoding)
                self._slots.reserve(min(self.max_batch, max(4, 2 * (slot + 1))), plan.length + 1)
                self._slots.load(slot, plan.cache)
                state.slot, state.hidden = slot, hidden
                self._decoding.append(row)
                done.append((row, None))
            except FatalEngineError:
                raise
            except Exception as exc:  # noqa: BLE001 - fails this request only
                done.append((row, exc))
        return done

    # -- decode ---------------------------------------------------------------------
    def step(self, rows: list[Row]) -> list[StepOut]:
        started = time.perf_counter()
        failed = self._forward(rows)
        failed_rows = {out.row for out in failed}
        outs = failed + self._sample([row for row in rows if row not in failed_rows])
        self.step_ms.add((time.perf_counter() - started) * 1000)  # ends after `_sample`'s one wait for the device
        return outs

    def _forward(self, rows: list[Row]) -> list[StepOut]:
        """One backbone step for every row with a step to feed back; returns the rows that failed."""
        fed = [row for row in rows if _state(row).fed is not None]
        if not fed:
            return []
        for i, row in enumerate(fed):  # the rows that run take slots 0..n-1
            slot = _state(row).slot
            if slot != i:
                assert slot is not None and slot > i
                self._swap(i, slot)
        embeddings = torch.stack([_state(row).fed for row in fed])[:, None, :]  # type: ignore[misc]
        count = len(fed)
        snapshot = self._slots.conv_snapshot(0, count)
        try:
            self._forward_slots(0, count, embeddings, fed)
        except Exception as batch_error:  # noqa: BLE001 - find which rows fail: run them one by one
            if isinstance(batch_error, FatalEngineError):
                raise
            log.warning("batched step of %d rows failed (%r); retrying row by row", count, batch_error)
            self._slots.restore_conv(0, count, snapshot)
            failed: list[StepOut] = []
            for i, row in enumerate(fed):
                try:
                    self._forward_slots(i, i + 1, embeddings[i : i + 1], [row])
                except Exception as exc:  # noqa: BLE001 - fails this request only
                    failed.append(StepOut(row, error=exc))
            return failed
        return []

    def _forward_slots(self, start: int, stop: int, embeddings: torch.Tensor, rows: list[Row]) -> None:
        hidden = self._lfm2.forward_rows(embeddings, self._slots.step(start, stop))
        for i, row in enumerate(rows):
            state = _state(row)
            state.hidden, state.fed = hidden[i], None
            kv = _conversation(row).cache
            if kv is not None and state.steps is not None and state.steps.pending is not None:
                kv.tail.append(state.steps.pending)

    def _swap(self, a: int, b: int) -> None:
        self._slots.swap(a, b)
        rows = self._decoding
        rows[a], rows[b] = rows[b], rows[a]
        _state(rows[a]).slot, _state(rows[b]).slot = a, b

    def _sample(self, rows: list[Row]) -> list[StepOut]:
        """Sample every row that has a hidden state. The step's one wait for
        the device is here: every row's token or frame and its finiteness
        come to the host in a single transfer."""
        rows = [row for row in rows if _state(row).hidden is not None]
        if not rows:
            return []
        model = self._lfm2.model
        text = [row for row in rows if _state(row).steps.wants_text]  # type: ignore[union-attr]
        audio = [row for row in rows if not _state(row).steps.wants_text]  # type: ignore[union-attr]
        for row in rows:
            _state(row).steps.begin()  # type: ignore[union-attr]
        packed: list[torch.Tensor] = []
        if text:
            hidden = torch.stack([_state(row).hidden for row in text])  # type: ignore[misc]
            logits = torch.nn.functional.linear(hidden, model.lfm.embed_tokens.weight)
            tokens, text_ok = self._sample_text(text, logits)
            fed = model.lfm.embed_tokens(tokens)
            for i, row in enumerate(text):
                _state(row).fed = fed[i]
            packed += [tokens.long(), text_ok.long()]
        if audio:
            hidden = torch.stack([_state(row).hidden for row in audio])  # type: ignore[misc]
            frames, audio_ok = self._sample_audio(audio, hidden)
            frames = end_of_audio_filled(frames)
            fed = model.audio_embedding(frames + model.codebook_offsets).sum(1)
            for i, row in enumerate(audio):
                _state(row).fed = fed[i]
            packed += [frames.long().flatten(), audio_ok.long()]
        host = torch.cat(packed).tolist()  # the one device-to-host transfer of the step
        for row in rows:
            _state(row).hidden = None
        outs: list[StepOut] = []
        n = len(text)
        for row, token, ok in zip(text, host[:n], host[n : 2 * n], strict=True):
            outs.append(self._text_out(row, token) if ok else StepOut(row, error=RuntimeError(
                "text probabilities are not finite")))  # fmt: skip
        if audio:
            books = model.codebooks
            codes = np.asarray(host[2 * n : 2 * n + len(audio) * books], dtype=np.int64).reshape(len(audio), books)
            for i, (row, ok) in enumerate(zip(audio, host[2 * n + len(audio) * books :], strict=True)):
                outs.append(self._frame_out(row, codes[i]) if ok else StepOut(row, error=RuntimeError(
                    "audio probabilities are not finite")))  # fmt: skip
        return outs

    def _text_out(self, row: Row, token: int) -> StepOut:
        state = _state(row)
        assert state.steps is not None
        if state.steps.text(token):  # <|im_end|>: the end, not delivered
            return StepOut(row, end=EndReason.END_OF_TURN)
        out = StepOut(row, TextToken(token, state.text.push(token)))
        if state.steps.steps_left <= 0:
            out.end = EndReason.MAX_TOKENS
        return out

    def _frame_out(self, row: Row, frame: np.ndarray) -> StepOut:
        state = _state(row)
        assert state.steps is not None
        state.steps.frame(tuple(int(c) for c in frame))
        out = StepOut(row, AudioFrame(frame))
        if state.steps.steps_left <= 0:
            out.end = EndReason.MAX_TOKENS
        return out

    def _sample_text(self, rows: list[Row], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text head's samples for `rows` (a seam the tests use to force tokens)."""
        return sample_rows(logits, [_state(row).text_params for row in rows])

    def _sample_audio(self, rows: list[Row], hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The audio head's frames for `rows` (a seam the tests use to force frames)."""
        return sample_frames(self._lfm2.model, hidden, [_state(row).audio_params for row in rows])

    # -- giving a place up for a while ---------------------------------------------------
    def can_suspend(self, row: Row) -> bool:
        state = _state(row)
        return state.slot is not None and state.hidden is None and _conversation(row).cache is not None

    def suspend(self, row: Row) -> None:
        """Store the row's cache in its conversation and free its slot; `fed` and
        the step rules stay in the row, so it goes on exactly where it stopped."""
        state, kv = _state(row), _conversation(row).cache
        assert state.slot is not None and kv is not None and kv.cache is not None
        self._slots.store(state.slot, kv.cache)
        self._free_slot(state)
        state.suspended = True

    def resume(self, row: Row) -> None:
        state, kv = _state(row), _conversation(row).cache
        assert state.suspended and kv is not None and kv.cache is not None
        slot = len(self._decoding)
        self._slots.reserve(min(self.max_batch, max(4, 2 * (slot + 1))), kv.cache.length + 1)
        self._slots.load(slot, kv.cache)
        state.slot, state.suspended = slot, False
        self._decoding.append(row)

    def _free_slot(self, state: _State) -> None:
        slot = state.slot
        assert slot is not None
        last = len(self._decoding) - 1
        if slot != last:
            self._swap(slot, last)
        self._decoding.pop()
        self._slots.release(last)
        state.slot = None

    # -- the end of a row ---------------------------------------------------------------
    def remove(self, row: Row, keep_cache: bool) -> None:
        state = row.model
        if not isinstance(state, _State):
            return
        kv = _conversation(row).cache
        try:
            if state.slot is not None:
                try:
                    if keep_cache and kv is not None and kv.cache is not None:
                        self._slots.store(state.slot, kv.cache)
                finally:
                    self._free_slot(state)
            elif state.prefilled and not state.suspended and kv is not None:
                kv.reset()  # a partly run prefill leaves the cache between two states
            if not keep_cache and kv is not None:
                kv.reset()  # the cache may hold a half-run step
        except Exception:
            if kv is not None:
                kv.reset()
            raise
        finally:
            state.hidden = state.fed = state.embeddings = None

    def idle(self) -> None:
        if self._slots.slots:
            self._slots.trim()

    # -- warm-up --------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run the batched path once in the calling thread (two rows, through
        both heads), so a server's first real request pays no lazy initialisation."""
        from service.engine.scheduler import Scheduler

        started = time.perf_counter()
        engine = Scheduler(self, max_batch=2, threaded=False)
        conf = self._lfm2.model.conf
        sampling = Sampling(max_new_tokens=conf.interleaved_n_text + 2)
        sinks = []
        for text in ("Hello!", "Hello there, how are you?"):
            ref = engine.open(self._lfm2.default_system_prompt(), GenerateMode.CHAT)
            sink = _Collect()
            sinks.append(sink)
            engine.submit(GenerationRequest(ref, UserTurn(text=text), sampling), sink)
        engine.drive(lambda: all(sink.done for sink in sinks))
        engine.close(0)
        log.info("batched path warmed up in %.2f s", time.perf_counter() - started)


class _Collect:
    """A sink that only remembers the end (warm-up)."""

    def __init__(self) -> None:
        self.done = False

    def started(self, ts_ms: float) -> None:
        pass

    def steps(self, items: Sequence[TextToken | AudioFrame], ts_ms: float) -> None:
        pass

    def finished(self, reason: EndReason | None, error: BaseException | None) -> None:
        self.done = True
        if error is not None:
            log.warning("batched warm-up failed: %r", error)

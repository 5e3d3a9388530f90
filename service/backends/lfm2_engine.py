"""The batched LFM2 engine: one thread owns the model and advances every
generating conversation in one forward pass per step.

With the serial engine each response takes the model in turns, so N
concurrent responses each run at 1/N of the model's speed, although one
backbone step costs about the same for 1 row as for 16 (the weights are read
once per step either way). Here one engine thread owns the model and every
conversation's model state, and each iteration of its loop:

1. applies queued operations in order per conversation (open, history edits,
   release); a conversation with a request waiting or running holds its
   later operations until that request finished, as a lane does;
2. admits waiting requests in FIFO order while fewer than `max_batch` rows
   are in the batch (a request beyond it waits, counted in `stats.waiting`);
   admitting a request adds the user turn to the history and calls
   `sink.started`;
3. prefills admitted rows, at most `prefill_chunk` positions per iteration,
   fewer when an estimate says the chunk would take longer than one decode
   step (so a long turn delays the others by about one step per iteration).
   A row's new history is first embedded whole: the audio encoder only takes
   whole audio segments (`LFM2Conversation._history_from`), so a user turn's
   audio is encoded in one call; the backbone then runs over the embeddings
   chunk by chunk, which is exact because it is causal. With no row decoding
   a prefill runs in one pass;
4. runs ONE backbone forward for every row that has a step to feed back,
   each row at its own position with its own attention mask
   (`lfm2_cache.SlotCache`); rows join and leave between steps;
5. samples every row that has a hidden state: the text head for rows in text
   mode, a batched depthformer for rows in audio mode, each row with its own
   temperature and top-k; the step rules (`ResponseSteps`) are the serial
   loop's, so ends, interleaving and max_new_tokens agree step for step.

Greedy rows produce the tokens and frames they produce alone (the tests
compare with the serial engine); batched matrix products round differently
in the last bits, so exact agreement rests on no two logits being that close.
Sampled rows draw from the same distributions as alone, in another random
order.

Each conversation's cache lives in the conversation (`PrefixCache`) between
turns and is copied into a slot of the batched cache while the conversation
generates, and back out at the end, so turn N prefills only what is new. A
failure fails its request only: an error while preparing or prefilling a row
or sampling it (non-finite probabilities) fails that row; an error in the
batched forward is retried row by row to find the failing rows. The failed
conversation's cache is reset; the others go on.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from service.backends.base import (
    AudioFrame,
    Conversation,
    EndReason,
    GenerateMode,
    Sampling,
    TextToken,
)
from service.backends.engine import (
    ConversationRef,
    Engine,
    GenerationRequest,
    RequestHandle,
    StepSink,
    TextStream,
    UserTurn,
)
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
from service.clock import now_ms

if TYPE_CHECKING:
    from service.backends.lfm2 import LFM2Backend

log = logging.getLogger(__name__)

T = TypeVar("T")

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


# -- engine-side records ----------------------------------------------------------------


class _Handle(RequestHandle):
    """A request handle that wakes the engine thread when it resumes or
    aborts: a paused row is skipped, and with only paused rows the engine
    sleeps until one of them changes."""

    def __init__(self, request: GenerationRequest, wake: Callable[[], None]) -> None:
        super().__init__(request)
        self._wake = wake

    def abort(self) -> None:
        super().abort()
        self._wake()

    def resume(self) -> None:
        super().resume()
        self._wake()


@dataclass(eq=False)
class _Request:
    handle: RequestHandle
    sink: StepSink


@dataclass(eq=False)
class _Lane:
    """One conversation on the engine thread: its operations in order; while
    `busy` (a request of it waits or runs) the later ones wait."""

    ref: ConversationRef
    ops: deque[tuple[Any, ...]] = field(default_factory=deque)
    busy: bool = False
    error: BaseException | None = None  # the conversation could not be created


class _Row:
    """A request with its place in the batch: prefilling, then decoding."""

    def __init__(self, lane: _Lane, request: _Request, state: LFM2Conversation, backend: LFM2Backend) -> None:
        self.lane, self.handle, self.sink, self.state = lane, request.handle, request.sink, state
        sampling = request.handle.request.sampling
        self.sampling = sampling
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

    def __repr__(self) -> str:
        return f"_Row({self.lane.ref!r})"


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


class _Ema:
    """An exponential moving average (None until the first sample)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.value: float | None = None
        self._weight = weight

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self._weight * (sample - self.value)


# -- the engine ---------------------------------------------------------------------------


class BatchedLFM2Engine(Engine):
    """Every generating conversation of the process in one batched forward per step.

    `open`, `submit`, `edit` and `release` only enqueue (thread-safe, never
    block); everything else happens on the engine thread (see the module
    docstring for one iteration of its loop)."""

    MIN_CHUNK = 16  # smallest prefill chunk the time budget may ask for

    def __init__(self, backend: LFM2Backend, *, max_batch: int, prefill_chunk: int) -> None:
        super().__init__(backend)
        self._lfm2 = backend
        self.backend = backend
        self.max_batch = max(1, int(max_batch))
        self.prefill_chunk = max(1, int(prefill_chunk))
        self._cond = threading.Condition()
        # Filled by any thread, drained by the engine thread every iteration.
        # Unbounded by design: every entry is a conversation's operation, and
        # the pipeline bounds conversations and their in-flight requests.
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._open_ids: set[int] = set()
        self._closed = False
        self._thread: threading.Thread | None = None
        # engine-thread state
        self._lanes: dict[int, _Lane] = {}
        self._ready: dict[int, _Lane] = {}  # lanes whose next operation may run (insertion order)
        self._waiting: deque[tuple[_Lane, _Request]] = deque()  # FIFO for a place in the batch
        self._prefilling: deque[_Row] = deque()
        self._decoding: list[_Row] = []  # row i is in slot i
        model = backend.model
        self._slots = SlotCache(model.lfm.config, backend.dtype, backend.device)
        self.step_ms = _Ema()  # one decode iteration (forward + heads)
        self.prefill_ms_per_position = _Ema()

    @property
    def name(self) -> str:
        return "batched"

    # -- any thread ---------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._closed:
                with inference():
                    self._slots.reserve(min(self.max_batch, 8), 512)  # no allocation on the first requests
                self._thread = threading.Thread(target=self._run, name="lfm2-engine", daemon=True)
                self._thread.start()

    def _post(self, item: tuple[Any, ...], conversation: ConversationRef | None = None) -> bool:
        """Queue `item` for the engine thread; False when the engine is closed
        or `conversation` was released (the caller reports that)."""
        with self._cond:
            if self._closed or (conversation is not None and conversation.id not in self._open_ids):
                return False
            if item[0] == "submit":
                self.stats.waiting += 1
            self._inbox.append(item)
            self._cond.notify()
        self.start()
        return True

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def open(self, system_prompt: str, mode: GenerateMode = GenerateMode.CHAT) -> ConversationRef:
        ref = ConversationRef(system_prompt, mode)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._open_ids.add(ref.id)
        self._post(("open", ref))
        return ref

    def submit(self, request: GenerationRequest, sink: StepSink) -> RequestHandle:
        handle = _Handle(request, self._wake)
        if not self._post(("submit", request.conversation.id, _Request(handle, sink)), request.conversation):
            sink.finished(None, RuntimeError("the engine is closed or the conversation was released"))
        return handle

    def edit(self, conversation: ConversationRef, op: Callable[[Conversation], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if not self._post(("edit", conversation.id, op, future), conversation):
            future.set_exception(RuntimeError("the engine is closed or the conversation was released"))
        return future

    def release(self, conversation: ConversationRef) -> None:
        with self._cond:
            if self._closed or conversation.id not in self._open_ids:
                return
            self._open_ids.discard(conversation.id)
            self._inbox.append(("release", conversation.id))
            self._cond.notify()

    def close(self, timeout: float) -> bool:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is None:
            with inference():
                self._accept_inbox()
                self._shutdown()
            return True
        thread.join(timeout)
        stopped = not thread.is_alive()
        if not stopped:
            log.warning("batched engine thread still busy after %.1f s", timeout)
        return stopped

    # -- the engine thread ----------------------------------------------------------
    def _run(self) -> None:
        with inference():  # the engine thread only runs the model (grad mode is per thread)
            while self._loop_once():
                pass

    def _loop_once(self) -> bool:
        with self._cond:
            while not self._inbox and not self._closed and not self._has_work():
                self._cond.wait()
            closed = self._closed
        self._accept_inbox()
        if closed:
            self._shutdown()
            return False
        try:
            self._iterate()
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the engine: fail the rows in flight
            log.exception("batched engine iteration failed")
            for row in [*self._prefilling, *self._decoding]:
                self._finish(row, None, exc)
        return True

    def _has_work(self) -> bool:
        rows = [*self._prefilling, *self._decoding]
        if self._ready or any(not row.handle.paused for row in rows):
            return True
        if any(row.handle.aborted for row in rows) or any(r.handle.aborted for _, r in self._waiting):
            return True
        return bool(self._waiting) and len(rows) < self.max_batch

    def _accept_inbox(self) -> None:
        with self._cond:
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            if item[0] == "open":
                ref: ConversationRef = item[1]
                lane = _Lane(ref)
                self._lanes[ref.id] = lane
                try:
                    ref.state = self._lfm2.new_conversation(ref.system_prompt, ref.mode)
                except Exception as exc:  # noqa: BLE001 - later operations on the conversation report it
                    log.exception("cannot create %r", ref)
                    lane.error = exc
                continue
            lane_or_none = self._lanes.get(item[1])
            if lane_or_none is None:  # released before: the front end refuses that, so only a race at close
                self._refuse(item, KeyError(f"conversation {item[1]} is not open"))
                continue
            lane_or_none.ops.append(item)
            self._ready[lane_or_none.ref.id] = lane_or_none

    def _refuse(self, item: tuple[Any, ...], error: BaseException) -> None:
        if item[0] == "submit":
            request: _Request = item[2]
            self._unwait()
            self._report(request.sink, None, error)
        elif item[0] == "edit":
            future: concurrent.futures.Future[Any] = item[3]
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _unwait(self) -> None:
        with self._cond:  # `submit` counts up on other threads
            self.stats.waiting -= 1

    @staticmethod
    def _report(sink: StepSink, reason: EndReason | None, error: BaseException | None) -> None:
        try:
            sink.started(now_ms())
            sink.finished(reason, error)
        except Exception:  # noqa: BLE001 - a sink's failure must not stop the engine
            log.exception("sink failed")

    def _iterate(self) -> None:
        self._run_lanes()
        self._admit()
        self._stop_aborted()
        if not (self._prefilling or self._decoding):
            return
        started = time.perf_counter()
        with self._lfm2.step_lock, inference():
            decoding = any(not row.handle.paused for row in self._decoding)
            self._prefill(self._prefill_budget() if decoding else math.inf)
            forward_started = time.perf_counter()
            fed = self._forward()
            sampled = self._sample()
        if sampled:
            self.stats.steps += 1
            self.stats.rows += sampled
        if fed and decoding:  # the time ends after `_sample`'s transfer, which waited for the device
            self.step_ms.add((time.perf_counter() - forward_started) * 1000)
        self.stats.running = len(self._prefilling) + len(self._decoding)
        if self._slots.slots and not self._decoding:
            self._slots.trim()
        log.debug("iteration: %d fed, %d sampled in %.1f ms", fed, sampled, (time.perf_counter() - started) * 1000)

    # -- operations per conversation --------------------------------------------------
    def _run_lanes(self) -> None:
        for key, lane in list(self._ready.items()):
            while lane.ops and not lane.busy:
                item = lane.ops.popleft()
                kind = item[0]
                if kind == "edit":
                    self._apply_edit(lane, item[2], item[3])
                elif kind == "submit":
                    request: _Request = item[2]
                    if lane.ref.state is None:
                        self._unwait()
                        self._report(request.sink, None, RuntimeError("the conversation could not be created"))
                    else:
                        lane.busy = True
                        self._waiting.append((lane, request))
                else:  # release
                    lane.ref.state = None
                    self._lanes.pop(key, None)
                    for rest in lane.ops:
                        self._refuse(rest, KeyError(f"{lane.ref!r} was released"))
                    lane.ops.clear()
            self._ready.pop(key, None)

    @staticmethod
    def _apply_edit(lane: _Lane, op: Callable[[Conversation], Any], future: concurrent.futures.Future[Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            state = lane.ref.state
            if state is None:
                raise RuntimeError("the conversation could not be created")
            with inference():
                future.set_result(op(state))
        except Exception as exc:  # noqa: BLE001 - delivered to the caller through the future
            future.set_exception(exc)

    # -- admission ------------------------------------------------------------------
    def _admit(self) -> None:
        # An aborted request does not wait for a place: it ends at once.
        if any(request.handle.aborted for _, request in self._waiting):
            keep: deque[tuple[_Lane, _Request]] = deque()
            for lane, request in self._waiting:
                if request.handle.aborted:
                    self._start(lane, request)
                else:
                    keep.append((lane, request))
            self._waiting = keep
        while self._waiting and len(self._prefilling) + len(self._decoding) < self.max_batch:
            # committed turns first: speculation never delays a committed response
            at = next((i for i, (_, r) in enumerate(self._waiting) if not r.handle.request.speculative), 0)
            lane, request = self._waiting[at]
            del self._waiting[at]
            self._start(lane, request)
        if any(not r.handle.request.speculative for _, r in self._waiting):
            # the batch is full and a committed turn waits: a speculative row gives up its
            # place (paused ones first); it ends as STOPPED at the next iteration
            rows = [*self._decoding, *self._prefilling]
            spec = [r for r in rows if r.handle.request.speculative and not r.handle.aborted]
            victim = next((r for r in spec if r.handle.paused), spec[0] if spec else None)
            if victim is not None:
                victim.handle.abort()

    def _start(self, lane: _Lane, request: _Request) -> None:
        """Give a request its row: add the user turn and open the response."""
        handle = request.handle
        self._unwait()
        state = lane.ref.state
        assert isinstance(state, LFM2Conversation)
        row = _Row(lane, request, state, self._lfm2)
        try:
            request.sink.started(now_ms())
            user: UserTurn = handle.request.user
            if user.audio is not None and len(user.audio):
                state.add_user_audio(user.audio, user.audio_rate)
            if user.text:
                state.add_user_text(user.text)
            state.begin_response()
            row.steps = state.response_steps(row.sampling)
        except Exception as exc:  # noqa: BLE001 - fails this request only
            self._finish(row, None, exc)
            return
        if handle.aborted:
            self._finish(row, EndReason.STOPPED, None)
        elif row.steps.steps_left <= 0:
            self._finish(row, EndReason.MAX_TOKENS, None)
        elif handle.request.speculative:
            self._prefilling.append(row)
        else:  # ahead of speculative rows whose prefill has not begun
            at = next((i for i, r in enumerate(self._prefilling) if r.handle.request.speculative and r.plan is None),
                      len(self._prefilling))  # fmt: skip
            self._prefilling.insert(at, row)

    def _stop_aborted(self) -> None:
        for row in [*self._prefilling, *self._decoding]:
            if row.handle.aborted:
                self._finish(row, EndReason.STOPPED, None)

    # -- prefill --------------------------------------------------------------------
    def _prefill_budget(self) -> float:
        """Positions to prefill this iteration while rows are decoding: at most
        `prefill_chunk`, and about what one decode step costs in time."""
        budget = self.prefill_chunk
        step, per_position = self.step_ms.value, self.prefill_ms_per_position.value
        if step is not None and per_position:
            budget = min(budget, max(self.MIN_CHUNK, int(step / per_position)))
        return budget

    def _prefill(self, budget: float) -> None:
        model = self._lfm2.model
        while budget > 0:
            row = next((r for r in self._prefilling if not r.handle.paused), None)
            if row is None:
                return
            try:
                if row.plan is None:
                    row.prefill_started = time.perf_counter()
                    row.plan = row.state.plan_prefill()
                    row.embeddings = model._prefill(**row.plan.inputs)  # the audio encoder: whole segments
                plan, embeddings = row.plan, row.embeddings
                assert embeddings is not None
                count = int(min(budget, plan.positions - row.prefilled))
                started = time.perf_counter()
                hidden = self._lfm2.forward(embeddings[:, row.prefilled : row.prefilled + count], plan.cache)
                if count >= self.MIN_CHUNK:
                    self._lfm2.synchronize()  # the time feeds the prefill budget: count the device's work, not the launch
                    self.prefill_ms_per_position.add((time.perf_counter() - started) * 1000 / count)
                row.prefilled += count
                budget -= count
                if row.prefilled < plan.positions:
                    continue
                row.state.prefill_done(plan, row.prefill_started)
                self._prefilling.remove(row)
                row.embeddings = None
                slot = len(self._decoding)
                self._slots.reserve(min(self.max_batch, max(4, 2 * (slot + 1))), plan.length + 1)
                self._slots.load(slot, plan.cache)
                row.slot, row.hidden = slot, hidden
                self._decoding.append(row)
            except Exception as exc:  # noqa: BLE001 - fails this request only
                log.warning("prefill failed for %r: %r", row, exc)
                self._finish(row, None, exc)

    # -- decode ---------------------------------------------------------------------
    def _forward(self) -> int:
        """One backbone step for every decoding row with a step to feed back;
        returns how many rows ran."""
        rows = [row for row in self._decoding if row.fed is not None and not row.handle.paused]
        if not rows:
            return 0
        for i, row in enumerate(rows):  # the rows that run take slots 0..n-1
            if row.slot != i:
                assert row.slot is not None and row.slot > i
                self._swap(i, row.slot)
        embeddings = torch.stack([row.fed for row in rows if row.fed is not None])[:, None, :]
        count = len(rows)
        snapshot = self._slots.conv_snapshot(0, count)
        try:
            self._forward_slots(0, count, embeddings, rows)
        except Exception as batch_error:  # noqa: BLE001 - find which rows fail: run them one by one
            log.warning("batched step of %d rows failed (%r); retrying row by row", count, batch_error)
            self._slots.restore_conv(0, count, snapshot)
            failed: list[tuple[_Row, BaseException]] = []
            for i, row in enumerate(rows):
                try:
                    self._forward_slots(i, i + 1, embeddings[i : i + 1], [row])
                except Exception as exc:  # noqa: BLE001 - fails this request only
                    failed.append((row, exc))
            for row, error in failed:
                self._finish(row, None, error)
        return count

    def _forward_slots(self, start: int, stop: int, embeddings: torch.Tensor, rows: list[_Row]) -> None:
        step = self._slots.step(start, stop)
        hidden = self._lfm2.forward_rows(embeddings, step)
        for i, row in enumerate(rows):
            row.hidden, row.fed = hidden[i], None
            kv = row.state.cache
            if kv is not None and row.steps is not None and row.steps.pending is not None:
                kv.tail.append(row.steps.pending)

    def _swap(self, a: int, b: int) -> None:
        self._slots.swap(a, b)
        rows = self._decoding
        rows[a], rows[b] = rows[b], rows[a]
        rows[a].slot, rows[b].slot = a, b

    def _sample(self) -> int:
        """Sample every row that has a hidden state; returns how many. The
        step's one wait for the device is here: every row's token or frame
        and its finiteness come to the host in a single transfer."""
        rows = [row for row in self._decoding if row.hidden is not None and not row.handle.paused]
        if not rows:
            return 0
        model = self._lfm2.model
        text = [row for row in rows if row.steps is not None and row.steps.wants_text]
        audio = [row for row in rows if row.steps is not None and not row.steps.wants_text]
        for row in rows:
            assert row.steps is not None
            row.steps.begin()
        packed: list[torch.Tensor] = []
        if text:
            hidden = torch.stack([row.hidden for row in text if row.hidden is not None])
            logits = torch.nn.functional.linear(hidden, model.lfm.embed_tokens.weight)
            tokens, text_ok = self._sample_text(text, logits)
            fed = model.lfm.embed_tokens(tokens)
            for i, row in enumerate(text):
                row.fed = fed[i]
            packed += [tokens.long(), text_ok.long()]
        if audio:
            hidden = torch.stack([row.hidden for row in audio if row.hidden is not None])
            frames, audio_ok = self._sample_audio(audio, hidden)
            frames = end_of_audio_filled(frames)
            fed = model.audio_embedding(frames + model.codebook_offsets).sum(1)
            for i, row in enumerate(audio):
                row.fed = fed[i]
            packed += [frames.long().flatten(), audio_ok.long()]
        host = torch.cat(packed).tolist()  # the one device-to-host transfer of the step
        results: list[tuple[_Row, int | None, np.ndarray | None]] = []
        failed: list[tuple[_Row, BaseException]] = []
        n = len(text)
        for row, token, ok in zip(text, host[:n], host[n : 2 * n], strict=True):
            if ok:
                results.append((row, token, None))
            else:
                failed.append((row, RuntimeError("text probabilities are not finite")))
        if audio:
            books = model.codebooks
            flat = host[2 * n : 2 * n + len(audio) * books]
            codes = np.asarray(flat, dtype=np.int64).reshape(len(audio), books)
            for i, (row, ok) in enumerate(zip(audio, host[2 * n + len(audio) * books :], strict=True)):
                if ok:
                    results.append((row, None, codes[i]))
                else:
                    failed.append((row, RuntimeError("audio probabilities are not finite")))
        ts = now_ms()
        for row in rows:
            row.hidden = None
        for row, token, frame in results:
            self._deliver(row, token, frame, ts)
        for row, exc in failed:
            self._finish(row, None, exc)
        return len(rows)

    def _sample_text(self, rows: list[_Row], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text head's samples for `rows` (a seam the tests use to force tokens)."""
        return sample_rows(logits, [row.text_params for row in rows])

    def _sample_audio(self, rows: list[_Row], hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The audio head's frames for `rows` (a seam the tests use to force frames)."""
        return sample_frames(self._lfm2.model, hidden, [row.audio_params for row in rows])

    def _deliver(self, row: _Row, token: int | None, frame: np.ndarray | None, ts: float) -> None:
        steps = row.steps
        assert steps is not None
        try:
            if token is not None:
                if steps.text(token):  # <|im_end|>: the end, not yielded
                    self._finish(row, EndReason.END_OF_TURN, None)
                    return
                row.sink.steps((TextToken(token, row.text.push(token)),), ts)
            else:
                assert frame is not None
                steps.frame(tuple(int(c) for c in frame))
                row.sink.steps((AudioFrame(frame),), ts)
        except Exception as exc:  # noqa: BLE001 - a failing sink fails its request only
            self._finish(row, None, exc)
            return
        if steps.steps_left <= 0:
            self._finish(row, EndReason.MAX_TOKENS, None)

    # -- the end of a request -----------------------------------------------------------
    def _finish(self, row: _Row, reason: EndReason | None, error: BaseException | None) -> None:
        """Take `row` out of the batch, keep or reset its conversation's cache,
        and report the end to its sink (exactly once: a row is finished once)."""
        try:
            self._release_row(row, keep_cache=error is None)
        except Exception:  # noqa: BLE001 - bookkeeping must not keep the sink from hearing the end
            log.exception("cannot release %r", row)
            if row.state.cache is not None:
                row.state.cache.reset()
        row.hidden = row.fed = row.embeddings = None
        try:
            row.sink.finished(reason, error)
        except Exception:  # noqa: BLE001 - a sink's failure must not stop the engine
            log.exception("sink failed")
        lane = row.lane
        lane.busy = False
        if lane.ops:
            self._ready[lane.ref.id] = lane
        self.stats.running = len(self._prefilling) + len(self._decoding)

    def _release_row(self, row: _Row, *, keep_cache: bool) -> None:
        kv = row.state.cache
        if row.slot is not None:
            slot = row.slot
            try:
                if keep_cache and kv is not None and kv.cache is not None:
                    self._slots.store(slot, kv.cache)
            finally:
                last = len(self._decoding) - 1
                if slot != last:
                    self._swap(slot, last)
                self._decoding.pop()
                self._slots.release(last)
                row.slot = None
        elif row in self._prefilling:
            self._prefilling.remove(row)
            if row.prefilled and kv is not None:
                kv.reset()  # a partly run prefill leaves the cache between two states
        if not keep_cache and kv is not None:
            kv.reset()  # the cache may hold a half-run step

    def _shutdown(self) -> None:
        """Closing: every request ends as stopped, every edit fails."""
        for row in [*self._prefilling, *self._decoding]:
            row.handle.abort()
            self._finish(row, EndReason.STOPPED, None)
        for _, request in self._waiting:
            request.handle.abort()
            self._unwait()
            self._report(request.sink, EndReason.STOPPED, None)
        self._waiting.clear()
        closed = RuntimeError("the engine is closed")
        for lane in self._lanes.values():
            for item in lane.ops:
                if item[0] == "submit":
                    item[2].handle.abort()
                    self._unwait()
                    self._report(item[2].sink, EndReason.STOPPED, None)
                else:
                    self._refuse(item, closed)
            lane.ops.clear()
            lane.ref.state = None
        self._lanes.clear()
        self._ready.clear()
        self.stats.running = 0

    # -- warm-up --------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run the batched path once in the calling thread (two rows, through
        both heads), so a server's first real request pays no lazy
        initialisation; `LFM2Backend.warmup` calls it on a spare engine.
        Only before `start()`."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("warm_up() runs before start()")
        started = time.perf_counter()
        conf = self._lfm2.model.conf
        sampling = Sampling(max_new_tokens=conf.interleaved_n_text + 2)
        sinks: list[_Collect] = []
        with inference():
            for text in ("Hello!", "Hello there, how are you?"):
                ref = ConversationRef(self._lfm2.default_system_prompt(), GenerateMode.CHAT)
                ref.state = self._lfm2.new_conversation(ref.system_prompt, ref.mode)
                sink = _Collect()
                sinks.append(sink)
                handle = RequestHandle(GenerationRequest(ref, UserTurn(text=text), sampling))
                with self._cond:
                    self.stats.waiting += 1
                self._waiting.append((_Lane(ref, busy=True), _Request(handle, sink)))
            while not all(sink.done for sink in sinks):
                self._iterate()
        log.info("batched path warmed up in %.2f s (%d steps)", time.perf_counter() - started, self.stats.steps)

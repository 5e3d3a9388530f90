"""The real model: LFM2-Audio and LFM2.5-Audio on the `liquid-audio` package.

The backend is split by concern: `lfm2_load` finds, checks and loads the
checkpoint; `lfm2_cache` keeps each conversation's model cache across turns
and the batched decode state (the batched engine is `service.engine.lfm2_runner`); and
`lfm2_decode` holds the streaming audio decoders. This module has the
conversation, the serial step loop and the backend. What it adds on top of
the package:

* A conversation that follows the package's `ChatState` chat template
  (system, user and assistant turns) and appends every response back with its
  end markers (<|text_end|>, the end-of-audio frame) and modality flags, cut
  to what the listener heard when a response was truncated.
* Its own step loop, equal step for step to the package's
  `generate_interleaved` / `generate_sequential` (it calls the package's
  samplers; the step rules live in `ResponseSteps`, which the batched engine
  shares), so that it can (a) check the stop event between steps; (b) tell
  "max_new_tokens reached" from a real end; (c) keep the model's cache
  (attention KV and short-conv state) across turns: the package re-prefills
  the whole conversation every turn; here a turn prefills only the positions
  the cache does not hold yet, so turn N costs about what turn 1 did; and
  (d) on the serial engine, hold the model lock for one step at a time, so
  concurrent conversations interleave fairly instead of one holding the
  model for a whole response.
* `generate` is the serial reference loop (tests compare the engine's
  batched path, `service.engine.lfm2_runner`, with it step for step).
* Streaming audio decoders with per-response state (`lfm2_decode`): Mimi in
  streaming mode (LFM2-Audio) and a windowed stream of the whole-sequence
  LFM2.5 detokenizer that matches a one-shot decode (see
  `DetokenizerDecoder`). The package's detokenizer loader hard-codes
  `.cuda()`; it is built here on any device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from liquid_audio import ChatState, LFM2AudioDetokenizer, LFM2AudioModel, LFM2AudioProcessor, LFMModality

from service.backends.base import (
    END_OF_AUDIO_CODE,
    NUM_CODEBOOKS,
    AssistantTurn,
    AudioDecoder,
    AudioFrame,
    Backend,
    BackendLoadError,
    Conversation,
    EndReason,
    Finished,
    GenerateMode,
    Sampling,
    Step,
    TextToken,
    is_end_of_audio,
)
from service.backends.lfm2_cache import (
    CacheStats,
    ConversationCache,
    Position,
    PrefixCache,
    StepCache,
    forward_positions,
    forward_step,
)
from service.backends.lfm2_decode import (
    DetokenizerDecoder,
    MimiDecoder,
    MimiPool,
    inference,
    load_detokenizer,
)

# Names other modules import from here (loading moved to lfm2_load).
from service.backends.lfm2_load import (  # noqa: F401
    DEFAULT_MODEL,
    DETOKENIZER_DIR,
    DOWNLOAD_HINT,
    LFM2_MODEL,
    MIMI_FILE,
    PINNED_REVISION,
    PINNED_REVISIONS,
    check_checkpoint,
    check_weights,
    configure_torch,
    pinned_revision,
    resolve_checkpoint,
    resolve_device,
    resolve_dtype,
    weights_file,
)

log = logging.getLogger(__name__)

# Token ids the model code hard-codes.
IM_END = 7
AUDIO_START = 128
TEXT_END = 130
_EXPECTED_SPECIALS = {IM_END: "<|im_end|>", AUDIO_START: "<|audio_start|>", TEXT_END: "<|text_end|>"}
AUDIO_VOCAB = END_OF_AUDIO_CODE + 1

CHAT_PROMPT = "Respond with interleaved text and audio."
ASR_PROMPT = "Perform ASR."
TTS_PROMPT = "Perform TTS. Use the US female voice."

# -- sampling -----------------------------------------------------------------


def sampler_args(temperature: float, top_k: int, vocab: int) -> tuple[float | None, int | None]:
    """Map `Sampling` values onto the package's sampler arguments.

    The contract says temperature 0 or top-k 0/1 is greedy; the package wants
    None for greedy, a `float` temperature (it asserts the type) and a top-k
    no larger than the vocabulary."""
    if temperature <= 0 or top_k <= 1:
        return None, None
    return float(temperature), min(int(top_k), vocab)


# -- concurrency ----------------------------------------------------------------


class FairLock:
    """A FIFO lock: waiters get it in arrival order.

    `threading.Lock` lets the releasing thread take it straight back, so one
    generating conversation would starve the others; with this lock held per
    model step, concurrent conversations take turns step by step. A waiter
    must not abandon its wait (worker threads are never interrupted there)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


# -- the step rules -------------------------------------------------------------

_TEXT = int(LFMModality.TEXT)
_AUDIO_IN = int(LFMModality.AUDIO_IN)
_AUDIO_OUT = int(LFMModality.AUDIO_OUT)


class ResponseSteps:
    """The step rules of one response, as the package's `generate_interleaved`
    (chat) and `generate_sequential` (transcribe, synthesize) apply them; the
    serial loop and the batched engine both follow them, so their ends agree.

    Per step: `begin()`, sample from the head `modality` names, then `text()`
    or `frame()` with the sample. Chat alternates `n_text` text tokens and
    `n_audio` frames until <|text_end|>, after which audio runs until the
    end-of-audio frame; <|im_end|> ends the turn unyielded (and, when
    transcribing, <|audio_start|> too). Sequential modes switch to audio at
    <|audio_start|> and back to text at the end-of-audio frame. `pending` is
    the last yielded step: the model is fed it before the next one."""

    __slots__ = ("_interleaved", "_n_audio", "_n_text", "_text_done", "_transcribe", "left", "modality",
                 "pending", "steps_left")  # fmt: skip

    def __init__(self, mode: GenerateMode, n_text: int, n_audio: int, max_new_tokens: int) -> None:
        self._interleaved = mode is GenerateMode.CHAT
        self._transcribe = mode is GenerateMode.TRANSCRIBE
        self._n_text, self._n_audio = n_text, n_audio
        self._text_done = False
        self.modality = _TEXT
        self.left = n_text  # steps left in the current run of one modality (chat)
        self.steps_left = max_new_tokens
        self.pending: Position | None = None

    @property
    def wants_text(self) -> bool:
        """The next step samples the text head (else the audio head)."""
        return self.modality == _TEXT

    def begin(self) -> None:
        self.steps_left -= 1
        self.left -= 1

    def text(self, token_id: int) -> bool:
        """Record a sampled text token; True when it ends the turn (it is then not yielded)."""
        if token_id == IM_END or (self._transcribe and token_id == AUDIO_START):
            return True
        self.pending = Position(_TEXT, token_id)
        if self._interleaved:
            self._text_done = self._text_done or token_id == TEXT_END
            if not self.left or self._text_done:
                self.modality, self.left = _AUDIO_OUT, self._n_audio
        elif token_id == AUDIO_START:
            self.modality = _AUDIO_OUT
        return False

    def frame(self, codes: tuple[int, ...]) -> None:
        """Record a sampled audio frame (an end-of-audio frame is all END_OF_AUDIO_CODE)."""
        if self._interleaved and not self.left and not self._text_done:
            self.modality, self.left = _TEXT, self._n_text
        if codes[0] == END_OF_AUDIO_CODE:
            self.modality = _TEXT
        self.pending = Position(_AUDIO_OUT, codes)


def end_of_audio_filled(frames: torch.Tensor) -> torch.Tensor:
    """Frames (..., 8) with every frame whose codebook 0 is the end-of-audio
    code made all end-of-audio, as the package does."""
    ended = frames[..., :1] == END_OF_AUDIO_CODE
    return torch.where(ended, torch.full_like(frames, END_OF_AUDIO_CODE), frames)


@dataclass
class PrefillPlan:
    """What a turn's prefill runs: the history inputs from `start` on, into
    `cache` (the conversation's own, or a fresh one when `start` is 0)."""

    cache: ConversationCache
    inputs: dict[str, torch.Tensor]
    start: int
    length: int  # history positions once the prefill ran

    @property
    def positions(self) -> int:
        return self.length - self.start


# -- conversation ---------------------------------------------------------------


class LFM2Conversation(Conversation):
    """History in the package's `ChatState` plus this conversation's model cache."""

    def __init__(self, backend: LFM2Backend, system_prompt: str, mode: GenerateMode) -> None:
        super().__init__()
        self._backend = backend
        self.mode = mode
        self._open: str | None = None  # role of the turn left open, if any
        self.cache: PrefixCache | None = PrefixCache(backend.cache_stats) if backend.prefix_cache else None
        self.last_prefill_positions = 0
        self.last_prefill_ms = 0.0
        with inference(), backend.tokenizer_lock:
            self.chat = ChatState(backend.processor, codebooks=NUM_CODEBOOKS, dtype=backend.dtype)
            self.chat.new_turn("system")
            self._add_plain_text(system_prompt)
            self.chat.end_turn()

    # -- history ----------------------------------------------------------------
    def _open_turn(self, role: str) -> None:
        if self._open == role:
            return
        if self._open == "assistant":
            self._append_assistant(AssistantTurn())  # a response that was never recorded
        elif self._open is not None:
            self.chat.end_turn()
        self.chat.new_turn(role)  # type: ignore[arg-type]
        self._open = role

    def _add_user_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        wave = np.ascontiguousarray(np.asarray(pcm, dtype=np.float32).reshape(-1))
        if wave.size == 0:
            return
        with inference():
            with self._backend.tokenizer_lock:
                self._open_turn("user")
            # ChatState resamples to 16 kHz and computes the log-mel features
            # (outside the tokenizer lock: that can take a while).
            self.chat.add_audio(torch.from_numpy(wave)[None, :], sample_rate)

    def _add_user_text(self, text: str) -> None:
        with inference(), self._backend.tokenizer_lock:
            self._open_turn("user")
            self._add_plain_text(text)

    def _add_plain_text(self, text: str) -> None:
        """Like `ChatState.add_text`, but special-token names in `text` stay
        plain text: a typed "<|im_end|>" cannot close a turn or forge one."""
        ids = self._backend.processor.text.encode(text, add_special_tokens=False, split_special_tokens=True)
        if ids:
            new = torch.tensor([ids], dtype=torch.long, device=self.chat.device)
            self.chat.text = torch.cat([self.chat.text, new], 1)
            self.chat.modality_flag = torch.cat([self.chat.modality_flag, torch.full_like(new, _TEXT)], 1)

    def _append_assistant(self, turn: AssistantTurn) -> None:
        """Append a response as the model would have produced it whole: the
        kept steps, then the markers a cut-short response lacks: in chat
        <|text_end|> and the end-of-audio frame; in sequential modes the
        end-of-audio frame after any audio. The turn is then closed."""
        text_ids: list[int] = []
        frames: list[np.ndarray] = []
        flags: list[int] = []
        for step in turn.steps:
            if isinstance(step, TextToken):
                text_ids.append(int(step.token_id))
                flags.append(_TEXT)
            else:
                frames.append(np.asarray(step.codes, dtype=np.int64).reshape(NUM_CODEBOOKS))
                flags.append(_AUDIO_OUT)
        if self.mode is GenerateMode.CHAT and TEXT_END not in text_ids:
            text_ids.append(TEXT_END)
            flags.append(_TEXT)
        # (A <|text_end|> just added is followed by audio that must end too.)
        needs_eoa = self.mode is GenerateMode.CHAT or bool(frames)
        if needs_eoa and not (frames and flags[-1] == _AUDIO_OUT and is_end_of_audio(frames[-1])):
            frames.append(np.full(NUM_CODEBOOKS, END_OF_AUDIO_CODE, dtype=np.int64))
            flags.append(_AUDIO_OUT)
        device = self.chat.device
        audio = np.stack(frames, 1) if frames else np.zeros((NUM_CODEBOOKS, 0), dtype=np.int64)
        with inference(), self._backend.tokenizer_lock:
            self.chat.append(
                text=torch.tensor([text_ids], dtype=torch.long, device=device).reshape(1, -1),
                audio_out=torch.from_numpy(audio).to(device),
                modality_flag=torch.tensor([flags], dtype=torch.long, device=device),
            )
            self.chat.end_turn()
        self._open = None

    # -- speculation --------------------------------------------------------------
    def _snapshot(self) -> object:
        # ChatState only ever replaces its tensors (torch.cat), so references keep them.
        tensors = {name: getattr(self.chat, name) for name in self.chat.model_inputs}
        with inference():
            cache = self.cache.snapshot() if self.cache is not None else None
        return self._open, tensors, cache

    def _restore(self, state: object) -> None:
        assert isinstance(state, tuple)
        self._open, tensors, cache = state
        for name, tensor in tensors.items():
            setattr(self.chat, name, tensor)
        if self.cache is not None:
            with inference():
                self.cache.restore(cache)

    # -- generation ---------------------------------------------------------------
    def begin_response(self) -> None:
        """Close the user turn and open the assistant's, as `generate` does
        before its first step (the batched engine calls this directly)."""
        self._flush_pending()
        with inference(), self._backend.tokenizer_lock:
            if self._open == "assistant":
                self._append_assistant(AssistantTurn())
            self._open_turn("assistant")

    def response_steps(self, sampling: Sampling) -> ResponseSteps:
        conf = self._backend.model.conf
        return ResponseSteps(self.mode, conf.interleaved_n_text, conf.interleaved_n_audio, sampling.max_new_tokens)

    def _generate(self, sampling: Sampling, stop: threading.Event) -> Iterator[Step]:
        # The template changes now, not at the first step, so the history is
        # consistent even if the caller never iterates.
        self.begin_response()
        return self._steps(sampling, stop)

    def _steps(self, sampling: Sampling, stop: threading.Event) -> Iterator[Step]:
        backend = self._backend
        model = backend.model
        text_t, text_k = sampler_args(sampling.text_temperature, sampling.text_top_k, backend.text_vocab)
        audio_t, audio_k = sampler_args(sampling.audio_temperature, sampling.audio_top_k, AUDIO_VOCAB)
        turn = self.response_steps(sampling)
        reason = EndReason.MAX_TOKENS
        cache: ConversationCache | None = None
        next_emb: torch.Tensor | None = None  # the embedding of turn.pending
        try:
            while turn.steps_left > 0:
                if stop.is_set():
                    reason = EndReason.STOPPED
                    break
                turn.begin()
                with backend.step_lock, inference():
                    if cache is None:
                        cache, hidden = self._prefill()
                    else:
                        assert next_emb is not None and turn.pending is not None
                        hidden = backend.forward(next_emb, cache)
                    if self.cache is not None and turn.pending is not None:
                        self.cache.tail.append(turn.pending)
                    if turn.modality == _TEXT:
                        logits = torch.nn.functional.linear(hidden, model.lfm.embed_tokens.weight)
                        token = model._sample_text_token(logits, temperature=text_t, top_k=text_k)
                        token_id = int(token)
                        next_emb = model.lfm.embed_tokens(token)[None, :]
                    else:
                        frame = model._sample_audio_frame(hidden, temperature=audio_t, top_k=audio_k)
                        frame = end_of_audio_filled(frame)
                        codes = frame.cpu().numpy()
                        next_emb = model.audio_embedding(frame + model.codebook_offsets).sum(0)[None, None, :]
                if turn.modality == _TEXT:
                    # <|im_end|> ends the turn; the history gets it from end_turn().
                    if turn.text(token_id):
                        reason = EndReason.END_OF_TURN
                        break
                    yield TextToken(token_id)
                else:
                    turn.frame(tuple(int(c) for c in codes))
                    yield AudioFrame(codes.astype(np.int64))
        except Exception:
            if self.cache is not None:
                self.cache.reset()  # the cache may hold a half-run step
            raise
        yield Finished(reason)

    def _prefill(self) -> tuple[ConversationCache, torch.Tensor]:
        """Run the history positions the cache lacks in one pass; return the
        cache and the last position's hidden state. Called under the step lock."""
        started = time.perf_counter()
        plan = self.plan_prefill()
        hidden = self._backend.forward(self._backend.model._prefill(**plan.inputs), plan.cache)
        self.prefill_done(plan, started)
        return plan.cache, hidden

    def plan_prefill(self) -> PrefillPlan:
        """What this turn's prefill must run (resets or rolls back the
        conversation's cache as needed; runs no model)."""
        length = int(self.chat.modality_flag.shape[1])
        start = self._reusable_prefix(length)
        inputs = self._history_from(start)
        if inputs is None:
            start, inputs = 0, self._history_from(0)
            assert inputs is not None
        if start == 0:
            cache = self._backend.new_cache()
            if self.cache is not None:
                self.cache.reset()
        else:
            assert self.cache is not None and self.cache.cache is not None
            cache = self.cache.cache
        return PrefillPlan(cache, inputs, start, length)

    def prefill_done(self, plan: PrefillPlan, started: float) -> None:
        """`plan.cache` now holds the whole history (`started`: perf_counter at the start)."""
        if self.cache is not None:
            self.cache.mark(plan.cache, plan.length)
        self.last_prefill_positions = plan.positions
        self.last_prefill_ms = (time.perf_counter() - started) * 1000
        log.debug("prefill of %d new positions (history %d) in %.1f ms", plan.positions, plan.length,
                  self.last_prefill_ms)  # fmt: skip

    def _reusable_prefix(self, length: int) -> int:
        """How many leading history positions the cache can stand for."""
        kv = self.cache
        if kv is None or kv.cache is None:
            return 0
        if kv.tail and not self._tail_matches(kv, length):
            kv.rollback()
        if kv.cache is None or kv.total >= length:
            kv.reset()
            return 0
        return kv.total

    def _tail_matches(self, kv: PrefixCache, length: int) -> bool:
        """Does the history continue, after the cached prefix, with exactly the
        steps generation fed into the cache?"""
        start, count = kv.length, len(kv.tail)
        if start + count > length:
            return False
        flags = self.chat.modality_flag[0].tolist()
        t0, a0 = flags[:start].count(_TEXT), flags[:start].count(_AUDIO_OUT)
        segment = flags[start : start + count]
        if segment != [p.flag for p in kv.tail]:
            return False
        n_text = segment.count(_TEXT)
        texts = iter(self.chat.text[0, t0 : t0 + n_text].tolist())
        frames = iter(self.chat.audio_out[:, a0 : a0 + count - n_text].T.tolist())
        for p in kv.tail:
            stored = next(texts) if p.flag == _TEXT else tuple(next(frames))
            if stored != p.value:
                return False
        return True

    def _history_from(self, start: int) -> dict[str, torch.Tensor] | None:
        """The model inputs for history positions `start`.. (None when `start`
        falls inside an audio input, which the encoder only takes whole)."""
        chat = self.chat
        if start == 0:
            return {name: chat[name] for name in chat}
        flags = chat.modality_flag[0, :start].tolist()
        t0, a0, n_in = flags.count(_TEXT), flags.count(_AUDIO_OUT), flags.count(_AUDIO_IN)
        lens = chat.audio_in_lens.tolist()
        segments = positions = 0
        while segments < len(lens) and positions + -(lens[segments] // -8) <= n_in:
            positions += -(lens[segments] // -8)  # mel frames -> model positions (8:1, rounded up)
            segments += 1
        if positions != n_in:
            return None
        mel0 = sum(lens[:segments])
        return {
            "text": chat.text[:, t0:],
            "audio_in": chat.audio_in[:, mel0:],
            "audio_in_lens": chat.audio_in_lens[segments:],
            "audio_out": chat.audio_out[:, a0:],
            "modality_flag": chat.modality_flag[:, start:],
        }


# -- the backend ------------------------------------------------------------------


class LFM2Backend(Backend):
    """LFM2-Audio / LFM2.5-Audio weights shared by every conversation."""

    name = "lfm2"
    can_undo = True

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        revision: str | None = None,
        device: str = "auto",
        *,
        dtype: str | None = None,
        decoder: str = "auto",
        system_prompt: str | None = None,
        prefix_cache: bool = True,
    ) -> None:
        """`model`: a Hugging Face id (served from the local cache at
        `revision`, default the pinned one) or a checkpoint folder.
        `decoder`: auto (the LFM2.5 detokenizer when the checkpoint has one,
        else Mimi), detokenizer or mimi. `system_prompt`: the chat prompt used
        when a client gives none. `prefix_cache`: keep each conversation's
        model cache across turns (off: re-prefill every turn, as the package)."""
        self._model_arg = model
        self._revision = revision
        self._device_arg = device
        self._dtype_arg = dtype
        self._decoder_arg = decoder
        self._chat_prompt = system_prompt or CHAT_PROMPT
        self.prefix_cache = prefix_cache
        self.cache_stats = CacheStats()
        self._label = model
        self._load_lock = threading.Lock()
        self.step_lock = FairLock()
        self.tokenizer_lock = threading.RLock()  # HF fast tokenizers are not safe to share across threads
        self._model: LFM2AudioModel | None = None
        self._processor: LFM2AudioProcessor | None = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.decoder_kind = ""
        self.folder: Path | None = None
        self._detok: LFM2AudioDetokenizer | None = None
        self._detok_context = 0
        self._mimi_pool: MimiPool | None = None

    # -- loading ------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self._label

    @property
    def model(self) -> LFM2AudioModel:
        if self._model is None:
            raise RuntimeError("LFM2Backend.load() has not run")
        return self._model

    @property
    def processor(self) -> LFM2AudioProcessor:
        if self._processor is None:
            raise RuntimeError("LFM2Backend.load() has not run")
        return self._processor

    @property
    def text_vocab(self) -> int:
        return int(self.model.lfm.embed_tokens.num_embeddings)

    @property
    def detokenizer_context(self) -> int:
        return self._detok_context

    def load(self) -> None:
        with self._load_lock:
            if self._model is None:
                self._load()

    def _load(self) -> None:
        started = time.perf_counter()
        device = resolve_device(self._device_arg)
        dtype = resolve_dtype(device, self._dtype_arg)
        configure_torch(device)
        folder, label = resolve_checkpoint(self._model_arg, self._revision)
        decoder = check_checkpoint(folder, label, self._decoder_arg)
        try:
            model = LFM2AudioModel.from_pretrained(folder, dtype=dtype, device=device).eval()
            weights = weights_file(folder)
            assert weights is not None
            check_weights(model, weights, label)
            processor = LFM2AudioProcessor.from_pretrained(folder, device=device).eval()
            self._check_tokenizer(processor, label)
            if decoder == "detokenizer":
                self._detok, self._detok_context = load_detokenizer(folder / DETOKENIZER_DIR, device)
                processor._audio_detokenizer = self._detok  # so the package's own decode() works off CUDA too
            else:
                self._mimi_pool = MimiPool(processor.mimi.eval())
        except BackendLoadError:
            raise
        except Exception as exc:
            raise BackendLoadError(f"cannot load checkpoint {label} ({folder}): {exc}; if a download was "
                                   f"interrupted, {DOWNLOAD_HINT} again") from exc  # fmt: skip
        self._model, self._processor = model, processor
        self.device, self.dtype, self.decoder_kind, self.folder, self._label = device, dtype, decoder, folder, label
        log.info("loaded %s on %s (%s, decoder %s) in %.1f s", label, device, str(dtype).removeprefix("torch."),
                 decoder, time.perf_counter() - started)  # fmt: skip

    @staticmethod
    def _check_tokenizer(processor: LFM2AudioProcessor, label: str) -> None:
        """The chat template writes "<|im_end|>" as text while the step loop
        ends a turn on id 7: they must agree. The names of 128 and 130 come
        from comments in the package, so a mismatch there is only logged."""
        tokens = processor.text.convert_ids_to_tokens(list(_EXPECTED_SPECIALS))
        wrong = {i: t for i, t in zip(_EXPECTED_SPECIALS, tokens, strict=True) if t != _EXPECTED_SPECIALS[i]}
        if IM_END in wrong:
            raise BackendLoadError(
                f"checkpoint {label}: tokenizer id {IM_END} is {wrong[IM_END]!r}, not '<|im_end|>'; {DOWNLOAD_HINT}"
            )
        if wrong:
            log.warning("checkpoint %s: unexpected special tokens %s", label, wrong)

    def synchronize(self) -> None:
        """Wait for the device's queued work (a no-op on the CPU), before a time is read."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def new_cache(self) -> ConversationCache:
        return ConversationCache(list(self.model.lfm.config.layer_types or ()))

    def forward(self, embeddings: torch.Tensor, cache: ConversationCache) -> torch.Tensor:
        """One backbone pass of `embeddings` (1, n, dim) that extends `cache`
        by n positions; returns the last position's hidden state. Called under `step_lock`."""
        return forward_positions(self.model.lfm, embeddings, cache)[0, -1]

    def forward_rows(self, embeddings: torch.Tensor, step: StepCache) -> torch.Tensor:
        """One decode step for a batch of rows: `embeddings` (rows, 1, dim)
        through `step` (`SlotCache`'s view of the rows). Returns the rows'
        hidden states (rows, dim)."""
        return forward_step(self.model.lfm, embeddings, step)[:, -1]

    def warmup(self) -> None:
        """A short generation and decode, so the first request pays no lazy
        initialisation (the engine's runner warms the batched path itself)."""
        started = time.perf_counter()
        conversation = self.new_conversation(self.default_system_prompt())
        conversation.add_user_text("Hello!")
        steps = self.model.conf.interleaved_n_text + 2  # reaches the audio head too
        sampling = Sampling(max_new_tokens=steps)
        for _ in conversation.generate(sampling, threading.Event()):
            pass
        decoder = self.new_decoder()
        try:
            silence = [np.zeros(NUM_CODEBOOKS, dtype=np.int64)] * 4
            decoder.decode(silence[:1])
            decoder.decode(silence)
            decoder.flush()
        finally:
            decoder.close()
        log.info("warm-up done in %.2f s", time.perf_counter() - started)

    # -- factories ----------------------------------------------------------------
    def default_sampling(self, mode: GenerateMode = GenerateMode.CHAT) -> Sampling:
        # README recipes: chat text greedy with audio T=1.0/k=4; TTS audio
        # T=0.8/k=64; ASR greedy.
        if mode is GenerateMode.TRANSCRIBE:
            return Sampling(text_temperature=0.0, text_top_k=0, audio_temperature=0.0, audio_top_k=0)
        if mode is GenerateMode.SYNTHESIZE:
            return Sampling(text_temperature=0.0, text_top_k=0, audio_temperature=0.8, audio_top_k=64)
        return Sampling(text_temperature=0.0, text_top_k=0, audio_temperature=1.0, audio_top_k=4)

    def default_system_prompt(self, mode: GenerateMode = GenerateMode.CHAT) -> str:
        if mode is GenerateMode.TRANSCRIBE:
            return ASR_PROMPT
        if mode is GenerateMode.SYNTHESIZE:
            return TTS_PROMPT
        return self._chat_prompt

    def new_conversation(self, system_prompt: str, mode: GenerateMode = GenerateMode.CHAT) -> LFM2Conversation:
        self.model  # noqa: B018 - fail early when not loaded
        return LFM2Conversation(self, system_prompt or self.default_system_prompt(mode), mode)

    def new_decoder(self) -> AudioDecoder:
        if self._detok is not None:
            return DetokenizerDecoder(self._detok, self._detok_context, self.device)
        if self._mimi_pool is not None:
            return MimiDecoder(self._mimi_pool, self.device)
        raise RuntimeError("LFM2Backend.load() has not run")

    def detokenize(self, token_ids: Sequence[int]) -> str:
        with self.tokenizer_lock:
            return str(self.processor.text.decode([int(t) for t in token_ids], skip_special_tokens=True))

    def close(self) -> None:
        self._model = self._processor = self._detok = None
        self._mimi_pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

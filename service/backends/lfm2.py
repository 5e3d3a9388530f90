"""The real model: LFM2-Audio and LFM2.5-Audio on the `liquid-audio` package.

What this module adds on top of the package:

* Loading that never downloads and never fakes. A Hugging Face id resolves
  from the local cache only, at a pinned revision; a folder is passed to the
  package as a `Path` (a `str` would be sent to the Hub as a repo id). A
  missing or incomplete checkpoint raises `BackendLoadError` naming
  `make download`. The package loads weights non-strictly, so the weight file
  is checked against the model's parameters first.
* A conversation that follows the package's `ChatState` chat template
  (system, user and assistant turns) and appends every response back with its
  end markers (<|text_end|>, the end-of-audio frame) and modality flags, cut
  to what the listener heard when a response was truncated.
* Its own step loop, equal step for step to the package's
  `generate_interleaved` / `generate_sequential` (it calls the package's
  samplers), so that it can (a) hold the model lock for one step at a time:
  concurrent conversations interleave fairly instead of one holding the model
  for a whole response; (b) check the stop event between steps; (c) tell
  "max_new_tokens reached" from a real end; and (d) keep the model's cache
  (attention KV and short-conv state) across turns. The package re-prefills
  the whole conversation every turn; here a turn prefills only the positions
  the cache does not hold yet, so turn N costs about what turn 1 did.
* Streaming audio decoders with per-response state (`lfm2_decode`): Mimi in streaming mode
  (LFM2-Audio) and a windowed stream of the whole-sequence LFM2.5 detokenizer
  that matches a one-shot decode (see `DetokenizerDecoder`). The package's
  detokenizer loader hard-codes `.cuda()`; it is built here on any device.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from liquid_audio import ChatState, LFM2AudioDetokenizer, LFM2AudioModel, LFM2AudioProcessor, LFMModality
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

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
from service.backends.lfm2_decode import (
    DetokenizerDecoder,
    MimiDecoder,
    MimiPool,
    inference,
    load_detokenizer,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "LiquidAI/LFM2.5-Audio-1.5B"
LFM2_MODEL = "LiquidAI/LFM2-Audio-1.5B"
# Commits on the Hugging Face Hub: the revisions that several independent
# public projects pin and load (cache snapshot paths, `hf models info` pins,
# links to config.json at the commit). Move both only with a test download.
PINNED_REVISIONS: dict[str, str] = {
    DEFAULT_MODEL: "c362a0625dfe45aa588dce5f0ada28a7e5707628",
    LFM2_MODEL: "c798aad30dc3cd72e72970beab51326b8443bd94",
}
PINNED_REVISION = PINNED_REVISIONS[DEFAULT_MODEL]
DOWNLOAD_HINT = "run `make download` (scripts/download_model.py) to fetch it"

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
DETOKENIZER_DIR = "audio_detokenizer"

# Token ids the model code hard-codes.
IM_END = 7
AUDIO_START = 128
TEXT_END = 130
_EXPECTED_SPECIALS = {IM_END: "<|im_end|>", AUDIO_START: "<|audio_start|>", TEXT_END: "<|text_end|>"}
AUDIO_VOCAB = END_OF_AUDIO_CODE + 1

CHAT_PROMPT = "Respond with interleaved text and audio."
ASR_PROMPT = "Perform ASR."
TTS_PROMPT = "Perform TTS. Use the US female voice."

# -- torch set-up -------------------------------------------------------------


def configure_torch(device: torch.device) -> None:
    """Process-wide torch settings for serving, all in one place.

    TF32 matmuls on CUDA (the backbone runs in bf16 anyway; this covers the
    fp32 codec and detokenizer). CPU math is left exact. Autograd is switched
    off per call with `inference()` because grad mode is thread-local and the
    model runs in worker threads."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BackendLoadError(f"device {device!r} requested but no CUDA device is available")
    return resolved


def resolve_dtype(device: torch.device, dtype: str | None) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 kernels are slower and less exact)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]  # fmt: skip
    except KeyError:
        raise BackendLoadError(f"unknown dtype {dtype!r}: choose bf16, fp16 or fp32") from None


# -- checkpoint resolution ----------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def pinned_revision(model: str) -> str:
    """The revision to fetch or load for a Hugging Face id."""
    return PINNED_REVISIONS.get(model, "main")


def resolve_checkpoint(model: str, revision: str | None) -> tuple[Path, str]:
    """The checkpoint folder for a local path or a Hugging Face id, and a label.

    Hugging Face ids are looked up in the local cache only: serving never
    downloads (a download belongs to `make download`)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision:
            log.warning("revision %s ignored: %s is a local folder", revision, model)
        return path.resolve(), str(path)
    if not _REPO_ID.match(model):
        raise BackendLoadError(f"checkpoint folder {model!r} does not exist; {DOWNLOAD_HINT} or pass a folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    rev = revision or pinned_revision(model)
    try:
        folder = snapshot_download(model, revision=rev, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - every way of "not in the cache" means the same to the operator
        raise BackendLoadError(
            f"model {model} at revision {rev} is not in the local Hugging Face cache ({HF_HUB_CACHE}); {DOWNLOAD_HINT}"
        ) from exc
    return Path(folder), f"{model}@{rev[:12]}"


def _weights_file(folder: Path) -> Path | None:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def check_checkpoint(folder: Path, label: str, decoder: str) -> str:
    """Raise unless every file the model needs is there; return the decoder to
    use ("detokenizer" or "mimi")."""
    missing = [name for name in ("config.json", "tokenizer.json") if not (folder / name).is_file()]
    if _weights_file(folder) is None:
        missing.append("model.safetensors")
    has_detok = all((folder / DETOKENIZER_DIR / n).is_file() for n in ("config.json", "model.safetensors"))
    has_mimi = (folder / MIMI_FILE).is_file()
    if decoder == "auto":
        decoder = "detokenizer" if has_detok else "mimi"
    if decoder == "detokenizer" and not has_detok:
        missing.append(f"{DETOKENIZER_DIR}/config.json and {DETOKENIZER_DIR}/model.safetensors")
    elif decoder == "mimi" and not has_mimi:
        missing.append(MIMI_FILE)
    elif decoder not in ("detokenizer", "mimi"):
        raise BackendLoadError(f"unknown audio decoder {decoder!r}: choose auto, detokenizer or mimi")
    if missing:
        raise BackendLoadError(
            f"checkpoint {label} ({folder}) is incomplete: missing {', '.join(missing)}; {DOWNLOAD_HINT}"
        )
    return decoder


def _stored_keys(weights: Path) -> set[str]:
    from safetensors import safe_open

    if weights.name.endswith(".index.json"):
        return set(json.loads(weights.read_text())["weight_map"])
    with safe_open(str(weights), framework="pt") as f:
        return set(f.keys())


def check_weights(model: torch.nn.Module, weights: Path, label: str) -> None:
    """The package loads non-strictly (missing tensors keep their random
    init), so a truncated or foreign weight file would serve noise: refuse it.
    Tied parameters count as present when any of their names is stored."""
    stored = _stored_keys(weights)
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    missing = [names[0] for names in groups.values() if not any(n in stored for n in names)]
    missing += [n for n, _ in model.named_buffers() if n.endswith(("running_mean", "running_var")) and n not in stored]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise BackendLoadError(f"checkpoint {label}: {weights.name} lacks {shown}; {DOWNLOAD_HINT}")


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


# -- the conversation's model cache ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _Position:
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
        self.tail: list[_Position] = []
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


# -- conversation ---------------------------------------------------------------

_TEXT = int(LFMModality.TEXT)
_AUDIO_IN = int(LFMModality.AUDIO_IN)
_AUDIO_OUT = int(LFMModality.AUDIO_OUT)


class LFM2Conversation(Conversation):
    """History in the package's `ChatState` plus this conversation's model cache."""

    def __init__(self, backend: LFM2Backend, system_prompt: str, mode: GenerateMode) -> None:
        super().__init__()
        self._backend = backend
        self.mode = mode
        self._open: str | None = None  # role of the turn left open, if any
        self.cache: PrefixCache | None = PrefixCache() if backend.prefix_cache else None
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

    # -- generation ---------------------------------------------------------------
    def _generate(self, sampling: Sampling, stop: threading.Event) -> Iterator[Step]:
        # The template changes now, not at the first step, so the history is
        # consistent even if the caller never iterates.
        with inference(), self._backend.tokenizer_lock:
            if self._open == "assistant":
                self._append_assistant(AssistantTurn())
            self._open_turn("assistant")
        return self._steps(sampling, stop)

    def _steps(self, sampling: Sampling, stop: threading.Event) -> Iterator[Step]:
        backend = self._backend
        model = backend.model
        interleaved = self.mode is GenerateMode.CHAT
        text_t, text_k = sampler_args(sampling.text_temperature, sampling.text_top_k, backend.text_vocab)
        audio_t, audio_k = sampler_args(sampling.audio_temperature, sampling.audio_top_k, AUDIO_VOCAB)
        n_text, n_audio = model.conf.interleaved_n_text, model.conf.interleaved_n_audio
        modality, left, text_done = _TEXT, n_text, False
        reason = EndReason.MAX_TOKENS
        cache: DynamicCache | None = None
        pending: _Position | None = None  # the last step, fed to the model next
        next_emb: torch.Tensor | None = None
        try:
            for _ in range(sampling.max_new_tokens):
                if stop.is_set():
                    reason = EndReason.STOPPED
                    break
                left -= 1
                with backend.step_lock, inference():
                    if cache is None:
                        cache, hidden = self._prefill()
                    else:
                        assert next_emb is not None and pending is not None
                        hidden = backend.forward(next_emb, cache)
                    if self.cache is not None and pending is not None:
                        self.cache.tail.append(pending)
                    if modality == _TEXT:
                        logits = torch.nn.functional.linear(hidden, model.lfm.embed_tokens.weight)
                        token = model._sample_text_token(logits, temperature=text_t, top_k=text_k)
                        token_id = int(token)
                        next_emb = model.lfm.embed_tokens(token)[None, :]
                    else:
                        frame = model._sample_audio_frame(hidden, temperature=audio_t, top_k=audio_k)
                        if int(frame[0]) == END_OF_AUDIO_CODE:
                            frame = torch.full_like(frame, END_OF_AUDIO_CODE)
                        codes = frame.cpu().numpy()
                        next_emb = model.audio_embedding(frame + model.codebook_offsets).sum(0)[None, None, :]
                if modality == _TEXT:
                    # <|im_end|> ends the turn; the history gets it from end_turn().
                    if token_id == IM_END or (self.mode is GenerateMode.TRANSCRIBE and token_id == AUDIO_START):
                        reason = EndReason.END_OF_TURN
                        break
                    pending = _Position(_TEXT, token_id)
                    yield TextToken(token_id)
                    if interleaved:
                        text_done = text_done or token_id == TEXT_END
                        if not left or text_done:
                            modality, left = _AUDIO_OUT, n_audio
                    elif token_id == AUDIO_START:
                        modality = _AUDIO_OUT
                else:
                    if interleaved and not left and not text_done:
                        modality, left = _TEXT, n_text
                    if int(codes[0]) == END_OF_AUDIO_CODE:
                        modality = _TEXT
                    pending = _Position(_AUDIO_OUT, tuple(int(c) for c in codes))
                    yield AudioFrame(codes.astype(np.int64))
        except Exception:
            if self.cache is not None:
                self.cache.reset()  # the cache may hold a half-run step
            raise
        yield Finished(reason)

    def _prefill(self) -> tuple[DynamicCache, torch.Tensor]:
        """Run the history positions the cache lacks; return the cache and the
        last position's hidden state. Called under the step lock."""
        backend = self._backend
        started = time.perf_counter()
        length = int(self.chat.modality_flag.shape[1])
        start = self._reusable_prefix(length)
        inputs = self._history_from(start)
        if inputs is None:
            start, inputs = 0, self._history_from(0)
            assert inputs is not None
        if start == 0:
            cache = DynamicCache(config=backend.model.lfm.config)
            if self.cache is not None:
                self.cache.reset()
        else:
            assert self.cache is not None and self.cache.cache is not None
            cache = self.cache.cache
        hidden = backend.forward(backend.model._prefill(**inputs), cache)
        if self.cache is not None:
            self.cache.mark(cache, length)
        self.last_prefill_positions = length - start
        self.last_prefill_ms = (time.perf_counter() - started) * 1000
        log.debug("prefill of %d new positions (history %d) in %.1f ms", length - start, length,
                  self.last_prefill_ms)  # fmt: skip
        return cache, hidden

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
        self._cache_kwarg = "past_key_values"

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
            weights = _weights_file(folder)
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
        forward_params = inspect.signature(model.lfm.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
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

    def forward(self, embeddings: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """One backbone pass that extends `cache`; returns the last position's
        hidden state. Called under `step_lock`."""
        out = self.model.lfm(inputs_embeds=embeddings, use_cache=True, **{self._cache_kwarg: cache})
        return out.last_hidden_state[0, -1]

    def warmup(self) -> None:
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

"""The one interface every model backend implements.

A backend owns the model weights (shared by every session) and hands out
per-conversation state (`Conversation`) and per-response streaming audio
decoders (`AudioDecoder`). Everything here is synchronous and runs in worker
threads: the asyncio pipeline (`service.pipeline`) never calls it on the event
loop.

The vocabulary mirrors LFM2-Audio: a response is a sequence of steps, each a
text token or an audio frame of 8 Mimi codebook codes (80 ms of 24 kHz audio),
and the code 2048 marks the end of audio.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

OUTPUT_SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1_920  # one audio frame = 80 ms at 24 kHz
FRAME_MS = 80
NUM_CODEBOOKS = 8
END_OF_AUDIO_CODE = 2048
MAX_AUDIO_CODE = 2047


def sanitize_mimi_codes(codes: np.ndarray) -> np.ndarray:
    """Return `codes` as int64 with every value clamped to a valid Mimi code.

    Decoders accept codes 0..MAX_AUDIO_CODE only; the end-of-audio marker and
    any out-of-range value a sampler might produce are mapped into range so a
    decode never raises mid-response. Callers drop whole end-of-audio frames
    (see `is_end_of_audio`) before decoding; this guards everything else.
    """
    return np.clip(np.asarray(codes, dtype=np.int64), 0, MAX_AUDIO_CODE)


def is_end_of_audio(codes: np.ndarray) -> bool:
    """True for the frame that ends a response's audio (codebook 0 == 2048)."""
    return int(codes[0]) == END_OF_AUDIO_CODE


class GenerateMode(enum.Enum):
    """Kinds of generation; mirrors voicechat.v1.GenerateMode."""

    CHAT = "chat"  # interleaved text + audio
    TRANSCRIBE = "transcribe"  # audio in, text out (ASR)
    SYNTHESIZE = "synthesize"  # text in, audio out (TTS)


class EndReason(enum.Enum):
    """Why a generation ended."""

    END_OF_TURN = "end_of_turn"  # the model ended its answer
    MAX_TOKENS = "max_tokens"  # max_new_tokens reached first
    STOPPED = "stopped"  # the caller set the stop event


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling parameters of one response (effective values, no unset ones).

    A temperature of 0 or a top-k of 0/1 means greedy.
    """

    text_temperature: float = 0.0
    text_top_k: int = 0
    audio_temperature: float = 1.0
    audio_top_k: int = 4
    max_new_tokens: int = 1024


@dataclass(frozen=True, slots=True)
class TextToken:
    """A generated text token (special tokens included) and, once an engine has
    detokenized it, the text it adds ("" for special tokens and while a UTF-8
    character is incomplete)."""

    token_id: int
    text: str = ""


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """A generated audio frame: NUM_CODEBOOKS codes; all 2048 ends the audio."""

    codes: np.ndarray


@dataclass(frozen=True, slots=True)
class Finished:
    """Last item of every generation."""

    reason: EndReason


Step = TextToken | AudioFrame | Finished


@dataclass
class AssistantTurn:
    """What the model generated for one response, in generation order."""

    steps: list[TextToken | AudioFrame] = field(default_factory=list)

    @property
    def audio_frames(self) -> int:
        """Audio frames with sound (the end-of-audio frame not counted)."""
        return sum(isinstance(s, AudioFrame) and not is_end_of_audio(s.codes) for s in self.steps)

    @property
    def text(self) -> str:
        """The text of the turn (as detokenized by the engine)."""
        return "".join(s.text for s in self.steps if isinstance(s, TextToken))

    def truncated(self, audio_frames_kept: int) -> AssistantTurn:
        """The prefix of this turn up to (not including) audio frame number
        `audio_frames_kept`: what a listener who heard that many frames heard."""
        kept: list[TextToken | AudioFrame] = []
        frames = 0
        for step in self.steps:
            if isinstance(step, AudioFrame):
                if frames >= audio_frames_kept:
                    break
                frames += 1
            kept.append(step)
        return AssistantTurn(kept)


class Conversation(ABC):
    """Model-side state of one conversation (one Converse stream).

    Not thread-safe: the pipeline calls it from one worker thread at a time.
    The assistant's latest response is held as *pending* until the next user
    input, so a TruncateResponse that arrives after the response ended can
    still shorten it; the pending turn is then appended to the history.
    """

    def __init__(self) -> None:
        self._pending: AssistantTurn | None = None
        self._pending_sent: AssistantTurn | None = None  # all of it the listener received

    # -- user input ---------------------------------------------------------
    def add_user_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Add mono float32 audio in [-1, 1] to the current user turn."""
        self._flush_pending()
        self._add_user_audio(pcm, sample_rate)

    def add_user_text(self, text: str) -> None:
        """Add typed text to the current user turn."""
        self._flush_pending()
        self._add_user_text(text)

    # -- assistant output ---------------------------------------------------
    def record_response(self, turn: AssistantTurn, heard_frames: int | None = None) -> None:
        """Remember the response just ended: `turn` is what the listener
        received, `heard_frames` how many of its audio frames they are
        estimated to have heard (None: all of it)."""
        self._flush_pending()
        self._pending_sent = turn
        self._pending = turn if heard_frames is None else turn.truncated(heard_frames)

    def truncate_response(self, audio_frames_kept: int) -> AssistantTurn | None:
        """Keep only what the listener heard of the latest response; return
        what is kept, or None when there is no pending response to truncate
        (it was already followed by new user input)."""
        if self._pending is None or self._pending_sent is None:
            return None
        self._pending = self._pending_sent.truncated(audio_frames_kept)
        return self._pending

    # -- speculation ----------------------------------------------------------
    def snapshot(self) -> object:
        """An opaque copy of the history, for `restore` (a speculative response
        is generated after one and undone with the other)."""
        return (self._pending, self._pending_sent, self._snapshot())

    def restore(self, snapshot: object) -> None:
        """Put the history back exactly as it was at `snapshot()`."""
        assert isinstance(snapshot, tuple)
        pending: AssistantTurn | None = snapshot[0]
        sent: AssistantTurn | None = snapshot[1]
        self._restore(snapshot[2])
        self._pending, self._pending_sent = pending, sent

    def _snapshot(self) -> object:
        raise NotImplementedError(f"{type(self).__name__} cannot undo a speculative response")

    def _restore(self, state: object) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot undo a speculative response")

    def _flush_pending(self) -> None:
        if self._pending is not None:
            self._append_assistant(self._pending)
            self._pending = self._pending_sent = None

    # -- generation ---------------------------------------------------------
    def generate(self, sampling: Sampling, stop: threading.Event) -> Iterator[Step]:
        """Close the user turn and generate the assistant's answer.

        Yields TextToken / AudioFrame steps as the model produces them and a
        final `Finished`. Checks `stop` between steps and finishes with
        EndReason.STOPPED once it is set. Runs in a worker thread.
        """
        self._flush_pending()
        return self._generate(sampling, stop)

    @abstractmethod
    def _add_user_audio(self, pcm: np.ndarray, sample_rate: int) -> None: ...

    @abstractmethod
    def _add_user_text(self, text: str) -> None: ...

    @abstractmethod
    def _append_assistant(self, turn: AssistantTurn) -> None:
        """Append an assistant turn (possibly truncated) to the history,
        adding whatever end markers the model expects."""

    @abstractmethod
    def _generate(self, sampling: Sampling, stop: threading.Event) -> Iterator[Step]: ...


class AudioDecoder(ABC):
    """Streaming decoder of audio frames to 24 kHz PCM, one per response.

    Successive `decode` calls continue the same signal: the concatenation of
    every `decode` output followed by `flush()` equals one-shot decoding of
    all frames (within the tolerance the backend documents).
    """

    @abstractmethod
    def decode(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Decode frames (each NUM_CODEBOOKS codes, no end-of-audio frame)
        into float32 mono PCM in [-1, 1]. May hold back a few samples."""

    def flush(self) -> np.ndarray:
        """Return any held-back samples at the end of the response."""
        return np.zeros(0, dtype=np.float32)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release per-response resources."""


class BackendLoadError(RuntimeError):
    """The backend cannot start (for example the checkpoint is missing)."""


class CacheStats:
    """A backend's prefix-cache counters (exported as metrics)."""

    def __init__(self) -> None:
        self.fallbacks = 0  # rollbacks that could not keep the prefix and ran a full prefill


class Backend(ABC):
    """A model: shared weights plus factories for per-stream state."""

    #: short backend name, e.g. "lfm2" or "scripted"
    name: str = ""
    #: prefix-cache counters; backends without a prefix cache keep this shared, never-incremented one
    cache_stats: CacheStats = CacheStats()
    #: conversations implement `snapshot`/`restore`, so the engine can run a speculation on a fork
    can_undo: bool = False

    @property
    def model_id(self) -> str:
        """Which model is loaded (reported in SessionStarted)."""
        return self.name

    def load(self) -> None:  # noqa: B027 - optional hook
        """Load weights; raise BackendLoadError with what to do on failure."""

    @abstractmethod
    def warmup(self) -> None:
        """Run a dummy generation and decode so the first real turn is fast."""

    @abstractmethod
    def default_sampling(self, mode: GenerateMode = GenerateMode.CHAT) -> Sampling:
        """The model's recommended sampling for a mode."""

    @abstractmethod
    def default_system_prompt(self, mode: GenerateMode = GenerateMode.CHAT) -> str:
        """The system prompt used when the client gives none."""

    @abstractmethod
    def new_conversation(self, system_prompt: str, mode: GenerateMode = GenerateMode.CHAT) -> Conversation:
        """Fresh conversation state starting with `system_prompt`."""

    @abstractmethod
    def new_decoder(self) -> AudioDecoder:
        """A streaming audio decoder for one response."""

    @abstractmethod
    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of the given tokens with special tokens removed. A trailing
        incomplete UTF-8 sequence decodes to U+FFFD (the caller holds it back)."""


    def close(self) -> None:  # noqa: B027 - optional hook
        """Free model resources at shutdown."""

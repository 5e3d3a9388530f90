"""A deterministic stand-in for LFM2-Audio, with no torch dependency.

It behaves like the real interleaved generator: 6 text tokens first, then runs
of 12 audio frames (8 codes each, 80 ms of 24 kHz audio per frame) alternating
with runs of 6 text tokens, `<|text_end|>` when the text is done, and a frame
of 2048s that ends the audio. Per-step delays mimic a GPU's cadence, and the
decoder turns codes into an audible, phase-continuous tone so streaming and
one-shot decoding give the same samples.

Replies depend on the input so tests can tell turns apart:
- text turn:  "Turn N. You said: <text>."
- audio turn: "Turn N. I heard <seconds> seconds of audio."
- after a truncated response the next reply starts with
  "(You heard <ms> ms of my last answer.)".
Directives in typed text, for tests and demos: `#frames=N` makes the reply
exactly N audio frames long; `#fail` raises inside generation after a few steps;
`#fatal` (on the engine's scripted runner) is a model that can no longer run: the
engine stops, as on a device error (the watchdog's tests).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from service.backends.base import (
    END_OF_AUDIO_CODE,
    FRAME_MS,
    FRAME_SAMPLES,
    NUM_CODEBOOKS,
    OUTPUT_SAMPLE_RATE,
    AssistantTurn,
    AudioDecoder,
    AudioFrame,
    Backend,
    Conversation,
    EndReason,
    Finished,
    GenerateMode,
    Sampling,
    Step,
    TextToken,
    sanitize_mimi_codes,
)

IM_END = 7
TEXT_END = 130
_PIECE_BYTES = 3  # bytes per text token: splits multi-byte characters on purpose
_PIECE_BASE = 1 << 24
_FRAMES_PER_CHAR = 0.9  # ~14 characters per second of speech
_FRAMES_RE = re.compile(r"#frames=(\d+)")


class ScriptedFailure(RuntimeError):
    """Raised by the `#fail` directive to exercise backend-failure handling."""


def encode_text(text: str) -> list[int]:
    """Token ids for `text`: UTF-8 pieces of up to 3 bytes."""
    data = text.encode()
    ids = []
    for i in range(0, len(data), _PIECE_BYTES):
        piece = data[i : i + _PIECE_BYTES]
        ids.append(_PIECE_BASE * len(piece) + int.from_bytes(piece.ljust(_PIECE_BYTES, b"\0"), "big"))
    return ids


def decode_tokens(token_ids: Sequence[int]) -> str:
    data = bytearray()
    for token in token_ids:
        length = token // _PIECE_BASE
        if 1 <= length <= _PIECE_BYTES:
            data += (token % _PIECE_BASE).to_bytes(_PIECE_BYTES, "big")[:length]
    return data.decode("utf-8", errors="replace")


def frame_codes(char: str, index: int, temperature: float) -> np.ndarray:
    """Codes of one frame: codebook 0 follows the spoken character."""
    base = (ord(char) * 7 + (index if temperature > 0 else 0)) % 2048
    return np.array([(base * (k + 1) * 37 + k) % 2048 for k in range(NUM_CODEBOOKS)], dtype=np.int64)


class ScriptedConversation(Conversation):
    def __init__(self, backend: ScriptedBackend, system_prompt: str, mode: GenerateMode) -> None:
        super().__init__()
        self._backend = backend
        self.mode = mode
        self.system_prompt = system_prompt
        self.history: list[tuple[str, object]] = [("system", system_prompt)]
        self._user_text: list[str] = []
        self._user_audio_s = 0.0
        self._heard_note = ""
        self.turns = 0
        self.last_sampling: Sampling | None = None

    def _add_user_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        self._user_audio_s += len(pcm) / sample_rate
        self.history.append(("user_audio", len(pcm) / sample_rate))

    def _add_user_text(self, text: str) -> None:
        self._user_text.append(text)
        self.history.append(("user_text", text))

    def _append_assistant(self, turn: AssistantTurn) -> None:
        self.history.append(("assistant", turn))
        if self._backend.last_reply_frames.get(id(self)) not in (None, turn.audio_frames):
            self._heard_note = f"(You heard {turn.audio_frames * FRAME_MS} ms of my last answer.) "

    def _snapshot(self) -> object:
        last = self._backend.last_reply_frames.get(id(self))
        return (list(self.history), list(self._user_text), self._user_audio_s, self._heard_note, self.turns, last)

    def _restore(self, state: object) -> None:
        assert isinstance(state, tuple)
        history: list[tuple[str, object]] = state[0]
        user_text: list[str] = state[1]
        self.history, self._user_text = list(history), list(user_text)
        self._user_audio_s, self._heard_note, self.turns = float(state[2]), str(state[3]), int(state[4])
        last: int | None = state[5]
        if last is None:
            self._backend.last_reply_frames.pop(id(self), None)
        else:
            self._backend.last_reply_frames[id(self)] = last

    def _reply(self) -> tuple[str, int | None]:
        text = " ".join(self._user_text)
        match = _FRAMES_RE.search(text)
        frames = int(match.group(1)) if match else None
        spoken = _FRAMES_RE.sub("", text).replace("#fatal", "").replace("#fail", "").strip()
        if self.mode is GenerateMode.SYNTHESIZE:
            return spoken, frames
        if self._user_text:
            reply = f"Turn {self.turns}. You said: {spoken}."
        else:
            reply = f"Turn {self.turns}. I heard {self._user_audio_s:.1f} seconds of audio."
        return self._heard_note + reply, frames

    def _generate(self, sampling: Sampling, stop: threading.Event) -> Iterator[Step]:
        return self.script(sampling, stop, paced=True)

    def script(self, sampling: Sampling, stop: threading.Event, paced: bool) -> Iterator[Step]:
        """The answer's steps; `paced` sleeps the backend's prefill and step
        times in the iterator (alone), else the caller paces it (batched)."""
        self.turns += 1
        self.last_sampling = sampling
        reply, frames = self._reply()
        fail = any("#fail" in t for t in self._user_text)
        self._user_text, self._user_audio_s, self._heard_note = [], 0.0, ""
        if self.mode is GenerateMode.TRANSCRIBE:
            frames = 0
        elif frames is None:
            frames = max(4, round(len(reply) * _FRAMES_PER_CHAR))
        self._backend.last_reply_frames[id(self)] = frames
        return self._steps(reply, frames, sampling, stop, fail, paced)

    def _steps(
        self, reply: str, frames: int, sampling: Sampling, stop: threading.Event, fail: bool, paced: bool
    ) -> Iterator[Step]:
        backend = self._backend
        text = encode_text(reply) + [TEXT_END]
        audio = [frame_codes(reply[i % max(1, len(reply))], i, sampling.audio_temperature) for i in range(frames)]
        if frames:
            audio.append(np.full(NUM_CODEBOOKS, END_OF_AUDIO_CODE, dtype=np.int64))
        if backend.prefill_s and paced:
            time.sleep(backend.prefill_s)
        produced = 0
        n_text, n_audio = backend.n_text, backend.n_audio
        while text or audio:
            run: list[Step] = [TextToken(t) for t in text[:n_text]]
            del text[:n_text]
            if not text or not run:
                n_audio = len(audio)  # text done: the rest of the audio follows
            run += [AudioFrame(a) for a in audio[:n_audio]]
            del audio[:n_audio]
            for step in run:
                if stop.is_set():
                    yield Finished(EndReason.STOPPED)
                    return
                if produced >= sampling.max_new_tokens:
                    yield Finished(EndReason.MAX_TOKENS)
                    return
                if fail and produced == 3:
                    raise ScriptedFailure("scripted backend failure (#fail directive)")
                if backend.step_s and paced:
                    time.sleep(backend.step_s)
                produced += 1
                yield step
        yield Finished(EndReason.END_OF_TURN)


class ScriptedDecoder(AudioDecoder):
    """Codes -> a tone per frame whose pitch follows codebook 0.

    The phase carries over between frames and calls, so decoding frame by
    frame gives exactly the samples of decoding all frames at once.
    """

    def __init__(self, delay_s: float) -> None:
        self._phase = 0.0
        self._delay_s = delay_s
        self._t = np.arange(FRAME_SAMPLES, dtype=np.float64)

    def decode(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        if self._delay_s:
            time.sleep(self._delay_s)
        out = []
        for codes in frames:
            code0 = int(sanitize_mimi_codes(codes)[0])
            freq = 140.0 + (code0 % 48) * 6.0
            step = 2 * np.pi * freq / OUTPUT_SAMPLE_RATE
            phase = self._phase + step * self._t
            envelope = 0.55 + 0.25 * np.sin(np.pi * self._t / FRAME_SAMPLES)
            out.append(0.3 * envelope * (np.sin(phase) + 0.3 * np.sin(2 * phase)))
            self._phase = float((self._phase + step * FRAME_SAMPLES) % (2 * np.pi))
        if not out:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(out).astype(np.float32)


class ScriptedBackend(Backend):
    """Deterministic backend for tests, demos and benchmarks."""

    name = "scripted"
    can_undo = True

    def __init__(
        self,
        step_ms: float = 0.0,
        prefill_ms: float = 0.0,
        decode_ms: float = 0.0,
        n_text: int = 6,
        n_audio: int = 12,
    ) -> None:
        self.step_s = step_ms / 1000
        self.prefill_s = prefill_ms / 1000
        self.decode_s = decode_ms / 1000
        self.n_text = n_text
        self.n_audio = n_audio
        self.last_reply_frames: dict[int, int] = {}
        self.warmed_up = False

    @property
    def model_id(self) -> str:
        return f"scripted(step={self.step_s * 1000:g}ms)"

    def warmup(self) -> None:
        conversation = self.new_conversation("warmup")
        conversation.add_user_text("warmup #frames=2")
        frames = [
            s.codes
            for s in conversation.generate(Sampling(), threading.Event())
            if isinstance(s, AudioFrame) and s.codes[0] != END_OF_AUDIO_CODE
        ]
        ScriptedDecoder(0.0).decode(frames)
        self.last_reply_frames.pop(id(conversation), None)
        self.warmed_up = True

    def default_sampling(self, mode: GenerateMode = GenerateMode.CHAT) -> Sampling:
        return Sampling()

    def default_system_prompt(self, mode: GenerateMode = GenerateMode.CHAT) -> str:
        return {
            GenerateMode.CHAT: "Respond with interleaved text and audio.",
            GenerateMode.TRANSCRIBE: "Perform ASR.",
            GenerateMode.SYNTHESIZE: "Perform TTS. Use the US female voice.",
        }[mode]

    def new_conversation(self, system_prompt: str, mode: GenerateMode = GenerateMode.CHAT) -> ScriptedConversation:
        return ScriptedConversation(self, system_prompt, mode)

    def new_decoder(self) -> ScriptedDecoder:
        return ScriptedDecoder(self.decode_s)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return decode_tokens(token_ids)

"""Streaming audio decoders for LFM2-Audio (Mimi) and LFM2.5-Audio (the
LFM2-based detokenizer), with per-response state.

The package's detokenizer loader hard-codes `.cuda()`; `load_detokenizer`
builds it on any device. Each decoder runs its work on its own CUDA stream on
a GPU, so decoding overlaps the model's next steps.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from liquid_audio import LFM2AudioDetokenizer
from transformers import Lfm2Config

from service.backends.base import FRAME_SAMPLES, NUM_CODEBOOKS, AudioDecoder, sanitize_mimi_codes

# The LFM2.5 detokenizer upsamples each frame to 6 positions, each one ISTFT
# hop of 320 samples; a 1280-sample window with "same" padding means the last
# (1280 - 320) / 2 samples of a signal still change when a frame follows.
_DETOK_UPSAMPLE = 6
_ISTFT_HOLD = (1280 - 320) // 2
DETOKENIZER_TOLERANCE = 1e-4  # max |streamed - one-shot| in fp32, before clipping


def inference() -> torch.inference_mode:
    """The context every model call runs in (thread-local, so used per call)."""
    return torch.inference_mode()


def load_detokenizer(folder: Path, device: torch.device) -> tuple[LFM2AudioDetokenizer, int]:
    """Build the LFM2.5 detokenizer on `device` (the package's own loader
    calls `.cuda()`), and return it with the left context in frames that a
    windowed decode needs to be exact."""
    from safetensors.torch import load_file

    config = Lfm2Config.from_pretrained(str(folder / "config.json"))
    kinds = list(config.layer_types or [])
    # As the package does: sliding attention becomes full attention with the
    # window imposed by the detokenizer's own band mask.
    config.layer_types = ["conv" if kind == "conv" else "full_attention" for kind in kinds]
    detok = LFM2AudioDetokenizer(config)
    detok.load_state_dict(load_file(str(folder / "model.safetensors")))
    detok = detok.eval().to(device=device, dtype=torch.float32)
    window = int(detok.sliding_window_size)
    reach = sum((window - 1) if kind != "conv" else (config.conv_L_cache - 1) for kind in kinds)
    # The first sample of frame f needs ISTFT hops from 6f - 2 on, and each of
    # those needs `reach` positions of history.
    context = math.ceil((reach + 2) / _DETOK_UPSAMPLE)
    return detok, context


# -- audio decoders ---------------------------------------------------------------


def _stack_frames(frames: Sequence[np.ndarray]) -> np.ndarray:
    """(8, n) int64 codes, each clamped into Mimi's range."""
    return np.stack([sanitize_mimi_codes(np.asarray(f).reshape(NUM_CODEBOOKS)) for f in frames], 1)


def _to_pcm(wave: torch.Tensor) -> np.ndarray:
    return np.clip(wave.reshape(-1).float().cpu().numpy(), -1.0, 1.0).astype(np.float32, copy=False)


class DetokenizerDecoder(AudioDecoder):
    """Streams the LFM2.5 detokenizer, which only decodes whole sequences.

    The detokenizer is causal over its input positions (short convolutions and
    attention limited to a 30-position band) with a receptive field of
    `context` frames, and its ISTFT overlaps the next frame by 480 samples.
    Each call decodes a window: `context` frames of left context plus every
    frame not yet emitted, emits samples up to 480 before the end and holds
    those back for the next call or `flush()`. Samples beyond the receptive
    field do not influence the emitted ones, so the stream equals a one-shot
    decode up to float rounding: max |difference| <= DETOKENIZER_TOLERANCE
    in fp32 on CPU (about 1e-7 measured, tiny and full-size configs); with
    TF32 matmuls on a GPU expect differences at TF32 rounding, far below
    audibility. The detokenizer holds no state, so all
    decoders share one instance."""

    def __init__(self, detok: LFM2AudioDetokenizer, context: int, device: torch.device) -> None:
        self._detok = detok
        self._context = context
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._codes = np.zeros((NUM_CODEBOOKS, 0), dtype=np.int64)
        self._first = 0  # index of the frame self._codes starts at
        self._frames = 0  # frames received
        self._emitted = 0  # samples returned so far
        self._last: tuple[int, int, np.ndarray] | None = None  # (first frame, frames, pcm) of the last window

    def decode(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        if frames:
            self._codes = np.concatenate([self._codes, _stack_frames(frames)], 1)
            self._frames += len(frames)
        return self._emit(self._frames * FRAME_SAMPLES - _ISTFT_HOLD)

    def flush(self) -> np.ndarray:
        return self._emit(self._frames * FRAME_SAMPLES)

    def _emit(self, until: int) -> np.ndarray:
        if until <= self._emitted:
            return np.zeros(0, dtype=np.float32)
        last = self._last
        if last is not None and last[1] == self._frames:
            first, _, pcm = last  # flush right after a decode: nothing new to run
        else:
            first = max(0, self._emitted // FRAME_SAMPLES - self._context)
            codes = self._codes[:, first - self._first :]
            pcm = self._run(codes)
            self._last = (first, self._frames, pcm)
            # Frames before this window's start are never needed again.
            self._codes, self._first = codes, first
        out = pcm[self._emitted - first * FRAME_SAMPLES : until - first * FRAME_SAMPLES]
        self._emitted = until
        return out

    def _run(self, codes: np.ndarray) -> np.ndarray:
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with inference(), stream:
            tensor = torch.from_numpy(codes)[None].to(self._device)
            return _to_pcm(self._detok(tensor))


class MimiPool:
    """Mimi instances for concurrent streams.

    Mimi keeps its streaming state on its modules, so each stream needs its
    own instance. Instances are deep copies of the loaded model (which itself
    never streams, so it is always safe to copy) that share its weights:
    parameters and buffers are pre-seeded in the copy memo, so an extra
    stream costs module objects and state, not another 80 M parameters.
    Released instances are reused."""

    def __init__(self, template: torch.nn.Module) -> None:
        self._template = template
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self.size = 0

    def acquire(self) -> Any:  # a MimiModel
        with self._lock:
            if self._free:
                return self._free.pop()
            self.size += 1
        template = self._template
        shared = {id(t): t for t in itertools.chain(template.parameters(), template.buffers())}
        return copy.deepcopy(template, shared)

    def release(self, mimi: Any) -> None:
        with self._lock:
            self._free.append(mimi)


class MimiDecoder(AudioDecoder):
    """Mimi in streaming mode: each decode continues the previous one exactly
    (the codec is causal and keeps its convolution and attention state)."""

    def __init__(self, pool: MimiPool, device: torch.device) -> None:
        self._pool = pool
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._mimi: Any = pool.acquire()
        self._session = self._mimi.streaming(1)
        if self._stream is not None:
            # the streaming state was zeroed on the current stream; decode runs on ours
            self._stream.wait_stream(torch.cuda.current_stream(device))
        # Mimi CUDA-graphs its streaming calls: that needs a fixed batch shape
        # and flips a process-global flag that is not thread-safe. Batches
        # here vary (1..64 frames) and decoders run in parallel threads.
        state = self._mimi._streaming_state
        for name in ("graphed_tr_enc", "graphed_tr_dec", "graphed_encoder", "graphed_decoder"):
            graphed = getattr(state, name, None)
            if graphed is not None:
                graphed.disable = True

    def decode(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        if not frames:
            return np.zeros(0, dtype=np.float32)
        if self._mimi is None:
            raise RuntimeError("decoder already closed")
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with inference(), stream:
            codes = torch.from_numpy(_stack_frames(frames))[None].to(self._device)
            return _to_pcm(self._mimi.decode(codes))

    def flush(self) -> np.ndarray:
        self.close()  # Mimi holds nothing back
        return np.zeros(0, dtype=np.float32)

    def close(self) -> None:
        if self._mimi is not None:
            self._session.close()
            self._pool.release(self._mimi)
            self._mimi = None

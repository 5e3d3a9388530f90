"""The LFM2-Audio backend end to end on a tiny random-weight checkpoint.

The checkpoint is built offline (scripts/make_tiny_model.py) and loaded
through the same code as the real weights. Its random weights never end a
response by themselves, so end conditions are forced by replacing the
package's samplers (`_sample_text_token`, `_sample_audio_frame`).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: E402

pytest_plugins = ["tests.lfm2_fixtures"]

from liquid_audio import LFMModality  # noqa: E402

from service.backends.base import (  # noqa: E402
    END_OF_AUDIO_CODE,
    FRAME_SAMPLES,
    AssistantTurn,
    AudioFrame,
    BackendLoadError,
    EndReason,
    Finished,
    GenerateMode,
    Sampling,
    Step,
    TextToken,
)
from service.backends.lfm2 import (  # noqa: E402
    AUDIO_START,
    IM_END,
    PINNED_REVISION,
    TEXT_END,
    FairLock,
    LFM2Backend,
    LFM2Conversation,
)
from service.backends.lfm2_decode import DETOKENIZER_TOLERANCE, DetokenizerDecoder  # noqa: E402

EOA = [END_OF_AUDIO_CODE] * 8
GREEDY = Sampling(text_temperature=0.0, text_top_k=0, audio_temperature=0.0, audio_top_k=0, max_new_tokens=30)


def run_turn(conversation: LFM2Conversation, sampling: Sampling = GREEDY) -> list[Step]:
    """Generate one response, record it, and return every step (Finished last)."""
    steps = list(conversation.generate(sampling, threading.Event()))
    conversation.record_response(AssistantTurn([s for s in steps if not isinstance(s, Finished)]))
    return steps


def values(steps: Iterable[Step]) -> list[object]:
    """Comparable form: token ids and code tuples (Finished dropped)."""
    return [
        s.token_id if isinstance(s, TextToken) else tuple(int(c) for c in s.codes)
        for s in steps
        if not isinstance(s, Finished)
    ]


def noise(seconds: float, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * rate)) * 0.1).astype(np.float32)


def kinds(steps: Iterable[object]) -> str:
    return "".join("T" if isinstance(s, TextToken) else "A" if isinstance(s, AudioFrame) else "F" for s in steps)


def force(monkeypatch: pytest.MonkeyPatch, backend: LFM2Backend, texts: list[int], frames: list[list[int]]) -> dict:
    """Make the model sample exactly these tokens and frames, in order."""
    text_iter, frame_iter = iter(texts), iter(frames)
    calls: dict[str, int] = {"text": 0, "audio": 0}

    def text(logits: torch.Tensor, **_: object) -> torch.Tensor:
        calls["text"] += 1
        return torch.tensor([next(text_iter)], device=logits.device)

    def audio(embedding: torch.Tensor, **_: object) -> torch.Tensor:
        calls["audio"] += 1
        return torch.tensor(next(frame_iter), device=embedding.device)

    monkeypatch.setattr(backend.model, "_sample_text_token", text)
    monkeypatch.setattr(backend.model, "_sample_audio_frame", audio)
    return calls


def history_text(backend: LFM2Backend, conversation) -> str:
    return backend.processor.text.decode(conversation.chat.text[0].tolist())


# -- turns ----------------------------------------------------------------------------


def test_text_turn_yields_interleaved_text_and_audio(tiny_backend: LFM2Backend) -> None:
    conversation = tiny_backend.new_conversation("")
    conversation.add_user_text("Hello there")
    steps = run_turn(conversation, GREEDY)
    assert kinds(steps) == "T" * 6 + "A" * 12 + "T" * 6 + "A" * 6 + "F"
    assert steps[-1] == Finished(EndReason.MAX_TOKENS)
    for frame in (s for s in steps if isinstance(s, AudioFrame)):
        assert frame.codes.shape == (8,) and frame.codes.dtype == np.int64
        assert 0 <= frame.codes.min() and frame.codes.max() < END_OF_AUDIO_CODE
    assert history_text(tiny_backend, conversation).startswith(
        "<|startoftext|><|im_start|>system\nRespond with interleaved text and audio.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    )


def test_audio_turn_is_encoded_and_answered(tiny_backend: LFM2Backend) -> None:
    conversation = tiny_backend.new_conversation("")
    conversation.add_user_audio(noise(3.0, rate=24_000), 24_000)  # resampled to 16 kHz by ChatState
    steps = run_turn(conversation, GREEDY)
    assert kinds(steps).startswith("T" * 6 + "A" * 12)
    chat = conversation.chat
    assert chat.audio_in_lens.tolist() == [301]  # 3 s of 10 ms mel frames
    assert (chat.modality_flag == LFMModality.AUDIO_IN).sum() == 38  # one position per 80 ms
    assert conversation.last_prefill_positions == chat.modality_flag.shape[1]  # first turn: everything


def test_second_turn_sees_the_first(tiny_backend: LFM2Backend) -> None:
    conversation = tiny_backend.new_conversation("Be brief.")
    conversation.add_user_text("First question")
    first = run_turn(conversation, GREEDY)
    conversation.add_user_audio(noise(1.0), 16_000)
    run_turn(conversation, GREEDY)
    chat = conversation.chat
    text = history_text(tiny_backend, conversation)
    assert text.count("<|im_start|>system\nBe brief.<|im_end|>") == 1  # the demo re-inserted it every turn
    assert text.count("<|im_start|>assistant\n") == 2
    ids = chat.text[0].tolist()
    first_text = [s.token_id for s in first if isinstance(s, TextToken)]
    header = tiny_backend.processor.text.encode("<|im_start|>assistant\n", add_special_tokens=False)
    at = next(i for i in range(len(ids)) if ids[i : i + len(header)] == header) + len(header)
    assert ids[at : at + len(first_text)] == first_text
    assert ids[at + len(first_text)] == TEXT_END  # the model never said it: added on append
    first_frames = np.stack([s.codes for s in first if isinstance(s, AudioFrame)], 1)
    assert torch.equal(chat.audio_out[:, : first_frames.shape[1]], torch.from_numpy(first_frames))
    assert chat.audio_out[:, first_frames.shape[1]].tolist() == EOA  # end-of-audio frame appended
    flags = chat.modality_flag[0].tolist()
    assert flags.count(LFMModality.AUDIO_OUT) == chat.audio_out.shape[1] == first_frames.shape[1] + 1


def test_truncated_response_keeps_only_heard_frames(tiny_backend: LFM2Backend) -> None:
    conversation = tiny_backend.new_conversation("")
    conversation.add_user_text("Tell me a story")
    steps = run_turn(conversation, GREEDY)
    assert conversation.truncate_response(5)
    conversation.add_user_text("Stop")  # appends the truncated response
    chat = conversation.chat
    generated = [s.codes for s in steps if isinstance(s, AudioFrame)]
    assert chat.audio_out.shape[1] == 5 + 1
    assert chat.audio_out[:, :5].T.tolist() == [f.tolist() for f in generated[:5]]
    assert chat.audio_out[:, 5].tolist() == EOA
    flags = chat.modality_flag[0].tolist()
    text, audio = LFMModality.TEXT, LFMModality.AUDIO_OUT
    reply = flags.index(audio) - 6
    # 6 text tokens, the 5 heard frames, <|text_end|>, the end-of-audio frame, then text again
    assert flags[reply : reply + 14] == [text] * 6 + [audio] * 5 + [text, audio, text]
    assert history_text(tiny_backend, conversation).endswith("<|text_end|><|im_end|>\n<|im_start|>user\nStop")


def test_typed_special_tokens_stay_text(tiny_backend: LFM2Backend) -> None:
    conversation = tiny_backend.new_conversation("")
    before = conversation.chat.text.shape[1]
    conversation.add_user_text("<|im_end|>")
    header = len(tiny_backend.processor.text.encode("<|im_start|>user\n", add_special_tokens=False))
    typed = conversation.chat.text[0, before + header :].tolist()
    assert IM_END not in typed and len(typed) == len("<|im_end|>")
    assert tiny_backend.detokenize(typed) == "<|im_end|>"


def test_detokenize_drops_specials_and_marks_partial_utf8(tiny_backend: LFM2Backend) -> None:
    ids = tiny_backend.processor.text.encode("hé", add_special_tokens=False)
    assert tiny_backend.detokenize([1, *ids, TEXT_END, IM_END]) == "hé"
    assert tiny_backend.detokenize(ids[:-1]) == "h\ufffd"


# -- sampling ---------------------------------------------------------------------------


def test_sampling_parameters_reach_the_package(tiny_backend: LFM2Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_backend.model
    seen: list[tuple[str, object, object]] = []
    text_sampler, audio_sampler = model._sample_text_token, model._sample_audio_frame

    def text(logits, *, temperature=None, top_k=None):
        seen.append(("text", temperature, top_k))
        return text_sampler(logits, temperature=temperature, top_k=top_k)

    def audio(embedding, *, temperature=None, top_k=None):
        seen.append(("audio", temperature, top_k))
        return audio_sampler(embedding, temperature=temperature, top_k=top_k)

    monkeypatch.setattr(model, "_sample_text_token", text)
    monkeypatch.setattr(model, "_sample_audio_frame", audio)
    conversation = tiny_backend.new_conversation("")
    conversation.add_user_text("Hi")
    # int-valued temperatures would trip the package's float assertion
    sampled = Sampling(text_temperature=1, text_top_k=50, audio_temperature=1, audio_top_k=9999, max_new_tokens=8)
    run_turn(conversation, sampled)
    assert seen[0] == ("text", 1.0, 50) and isinstance(seen[0][1], float)
    assert seen[-1] == ("audio", 1.0, 2049)  # top-k clamped to the audio vocabulary
    seen.clear()
    conversation.add_user_text("Again")
    run_turn(conversation, Sampling(text_temperature=0.7, text_top_k=1, audio_temperature=0.0, max_new_tokens=8))
    assert set(seen) == {("text", None, None), ("audio", None, None)}  # top-k 1 / temperature 0: greedy


def test_greedy_is_deterministic_and_sampling_varies(tiny_backend: LFM2Backend) -> None:
    def reply(sampling: Sampling, seed: int) -> list[object]:
        torch.manual_seed(seed)
        conversation = tiny_backend.new_conversation("")
        conversation.add_user_text("Same input")
        return values(run_turn(conversation, sampling))

    sampled = Sampling(text_temperature=1.0, text_top_k=50, audio_temperature=1.0, audio_top_k=64, max_new_tokens=24)
    assert reply(GREEDY, 1) == reply(GREEDY, 2)
    assert reply(sampled, 1) != reply(sampled, 2)


# -- end conditions ---------------------------------------------------------------------


def frames(n: int, start: int = 0) -> list[list[int]]:
    return [[(start + i + k) % 2048 for k in range(8)] for i in range(n)]


def test_im_end_ends_the_turn_unyielded(tiny_backend: LFM2Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    force(monkeypatch, tiny_backend, [300, 301, IM_END], [])
    conversation = tiny_backend.new_conversation("")
    conversation.add_user_text("Hi")
    steps = run_turn(conversation, GREEDY)
    assert [s.token_id for s in steps[:-1]] == [300, 301]
    assert steps[-1] == Finished(EndReason.END_OF_TURN)


def test_text_end_then_end_of_audio_then_im_end(tiny_backend: LFM2Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    eoa_first = [END_OF_AUDIO_CODE] + [5] * 7  # codebook 0 decides; the frame becomes all 2048
    force(monkeypatch, tiny_backend, [300, 301, TEXT_END, IM_END], [*frames(3), eoa_first])
    conversation = tiny_backend.new_conversation("")
    conversation.add_user_text("Hi")
    steps = run_turn(conversation, GREEDY)
    # <|text_end|> switches to audio at once; audio runs until end-of-audio,
    # then the model is back in text and ends with <|im_end|>.
    assert kinds(steps) == "TTTAAAAF"
    assert steps[2] == TextToken(TEXT_END)
    assert steps[-2].codes.tolist() == EOA
    assert steps[-1] == Finished(EndReason.END_OF_TURN)
    conversation.add_user_text("Next")
    text = history_text(tiny_backend, conversation)
    assert text.count("<|text_end|>") == 1  # nothing added: the response was complete
    assert conversation.chat.audio_out.shape[1] == 4
    assert text.endswith("<|text_end|><|im_end|>\n<|im_start|>user\nNext")


def test_max_new_tokens_without_an_end(tiny_backend: LFM2Backend) -> None:
    conversation = tiny_backend.new_conversation("")
    conversation.add_user_text("Hi")
    steps = run_turn(conversation, Sampling(max_new_tokens=7))
    assert len(steps) == 8 and steps[-1] == Finished(EndReason.MAX_TOKENS)


def test_stop_event_ends_with_stopped(tiny_backend: LFM2Backend) -> None:
    conversation = tiny_backend.new_conversation("")
    conversation.add_user_text("Hi")
    stop = threading.Event()
    seen = []
    for step in conversation.generate(GREEDY, stop):
        seen.append(step)
        if len(seen) == 3:
            stop.set()
    assert kinds(seen) == "TTTF" and seen[-1] == Finished(EndReason.STOPPED)
    stop.set()
    assert list(tiny_backend.new_conversation("").generate(GREEDY, stop)) == [Finished(EndReason.STOPPED)]


def test_synthesize_is_sequential(tiny_backend: LFM2Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    force(monkeypatch, tiny_backend, [AUDIO_START, IM_END], [*frames(3), EOA])
    conversation = tiny_backend.new_conversation("", GenerateMode.SYNTHESIZE)
    conversation.add_user_text("Say this")
    steps = run_turn(conversation, GREEDY)
    assert kinds(steps) == "TAAAAF" and steps[0] == TextToken(AUDIO_START)
    assert steps[-1] == Finished(EndReason.END_OF_TURN)  # <|im_end|> is not yielded
    assert history_text(tiny_backend, conversation).startswith("<|startoftext|><|im_start|>system\nPerform TTS.")


def test_transcribe_is_text_only(tiny_backend: LFM2Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = force(monkeypatch, tiny_backend, [300, 301, AUDIO_START], [])
    conversation = tiny_backend.new_conversation("", GenerateMode.TRANSCRIBE)
    conversation.add_user_audio(noise(1.0), 16_000)
    steps = run_turn(conversation, GREEDY)
    assert values(steps) == [300, 301] and steps[-1] == Finished(EndReason.END_OF_TURN)
    assert calls["audio"] == 0
    assert "Perform ASR." in history_text(tiny_backend, conversation)


# -- the conversation cache ------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # the package's own call
def test_prefix_cache_matches_full_prefill_and_the_package(
    tiny_backend: LFM2Backend, uncached_backend: LFM2Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy outputs of every turn are equal with the cache, without it, and
    from the package's own generate_interleaved on the same history; so are
    the logits, within float rounding. Turn 2 is truncated, which forces the
    cache to roll back."""
    turns: list[object] = ["Hello there", noise(2.0, seed=1), "More text", noise(0.77, seed=2)]
    logits: dict[str, list[torch.Tensor]] = {"cached": [], "uncached": []}

    def spy(backend: LFM2Backend, key: str) -> None:
        original = backend.model._sample_text_token

        def sample(x, **kw):
            logits[key].append(x.clone())
            return original(x, **kw)

        monkeypatch.setattr(backend.model, "_sample_text_token", sample)

    spy(tiny_backend, "cached")
    spy(uncached_backend, "uncached")
    outputs: dict[str, list[list[object]]] = {}
    prefills: dict[str, list[int]] = {}
    lengths: list[int] = []
    for key, backend in (("cached", tiny_backend), ("uncached", uncached_backend)):
        conversation = backend.new_conversation("")
        outputs[key], prefills[key] = [], []
        for i, turn in enumerate(turns):
            if isinstance(turn, str):
                conversation.add_user_text(turn)
            else:
                conversation.add_user_audio(turn, 16_000)
            iterator = conversation.generate(GREEDY, threading.Event())
            with torch.inference_mode():
                reference = [
                    t.tolist() for t in backend.model.generate_interleaved(**conversation.chat, max_new_tokens=30)
                ]
            steps = list(iterator)
            mine = [[s.token_id] if isinstance(s, TextToken) else s.codes.tolist() for s in steps[:-1]]
            assert mine == reference, f"{key} turn {i} differs from the package"
            outputs[key].append(values(steps))
            prefills[key].append(conversation.last_prefill_positions)
            if key == "cached":
                lengths.append(conversation.chat.modality_flag.shape[1])
            conversation.record_response(AssistantTurn(steps[:-1]))
            if i == 1:
                conversation.truncate_response(4)
    assert outputs["cached"] == outputs["uncached"]
    assert tiny_backend.cache_stats.fallbacks == 0  # the truncated turn rolled back without a full prefill
    for a, b in zip(logits["cached"], logits["uncached"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # uncached: the whole history every turn
    assert prefills["uncached"] == lengths
    # cached: only what is new. After a complete reply the cache already holds
    # the 29 reply steps it fed back (the 30th was never fed); after the
    # truncated reply of turn 1 it rolls back and re-reads that reply.
    fed = GREEDY.max_new_tokens - 1
    assert prefills["cached"] == [lengths[0], lengths[1] - lengths[0] - fed, lengths[2] - lengths[1],
                                  lengths[3] - lengths[2] - fed]  # fmt: skip


def test_restore_undoes_a_speculative_turn_and_keeps_the_cache(tiny_backend: LFM2Backend) -> None:
    """A speculative response generated after `snapshot()` and undone with
    `restore()` leaves no trace: the committed turn's reply equals that of a
    conversation that never speculated, and its prefill reuses the cache of
    the history before the speculation (only the new positions run)."""

    def opened() -> LFM2Conversation:
        conversation = tiny_backend.new_conversation("")
        conversation.add_user_text("Hello there")
        run_turn(conversation)
        return conversation

    reference = opened()
    reference.add_user_audio(noise(1.0, seed=5), 16_000)
    expected = run_turn(reference)

    conversation = opened()
    kv = conversation.cache
    assert kv is not None and kv.cache is not None
    held = kv.cache.length
    snapshot = conversation.snapshot()
    conversation.add_user_audio(noise(0.6, seed=5), 16_000)  # the turn so far
    assert len(list(conversation.generate(GREEDY, threading.Event()))) == GREEDY.max_new_tokens + 1
    conversation.restore(snapshot)
    # the positions the cache reports are those before the speculation again, not ahead by its length
    assert kv.cache is not None and kv.cache.get_seq_length() == kv.cache.length == kv.total == held
    conversation.add_user_audio(noise(1.0, seed=5), 16_000)  # the committed turn
    got = run_turn(conversation)
    assert values(got) == values(expected)
    assert (
        conversation.last_prefill_positions == reference.last_prefill_positions < reference.chat.modality_flag.shape[1]
    )
    for name in ("text", "audio_in", "audio_in_lens", "audio_out", "modality_flag"):
        assert torch.equal(conversation.chat[name], reference.chat[name]), name


# -- concurrency ------------------------------------------------------------------------


def test_concurrent_conversations_interleave_and_match_sequential(tiny_backend: LFM2Backend) -> None:
    def conversation(prompt: str):
        c = tiny_backend.new_conversation("")
        c.add_user_text(prompt)
        return c

    prompts = ["First speaker", "Second speaker, longer"]
    expected = [values(run_turn(conversation(p))) for p in prompts]
    order: list[int] = []
    results: list[list[object]] = [[], []]
    barrier = threading.Barrier(2)

    def worker(i: int) -> None:
        c = conversation(prompts[i])
        barrier.wait()
        steps = []
        for step in c.generate(GREEDY, threading.Event()):
            order.append(i)
            steps.append(step)
        results[i] = values(steps)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == expected
    # The model lock is taken per step and in arrival order, so the two
    # replies alternate; a plain lock lets one thread run its whole reply.
    switches = sum(a != b for a, b in zip(order, order[1:], strict=False))
    assert switches >= len(order) // 3, order


def test_fair_lock_serves_in_arrival_order() -> None:
    lock = FairLock()
    served: list[int] = []
    lock.__enter__()
    arrived = []
    threads = []
    for i in range(4):
        t = threading.Thread(target=lambda i=i: (lock.__enter__(), served.append(i), lock.__exit__()))
        t.start()
        threads.append(t)
        arrived.append(i)
        for _ in range(200):  # let thread i queue before starting the next
            if lock._next == i + 2:
                break
            threading.Event().wait(0.005)
    lock.__exit__()
    for t in threads:
        t.join(timeout=5)
    assert served == arrived


# -- decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("batches", [[1] * 20, [2, 1, 4, 16, 3, 19], [45]])
def test_detokenizer_stream_equals_one_shot(tiny_backend: LFM2Backend, batches: list[int]) -> None:
    rng = np.random.default_rng(3)
    codes = [rng.integers(0, 2048, 8) for _ in range(sum(batches))]
    with torch.inference_mode():
        one_shot = tiny_backend.processor.decode(torch.tensor(np.stack(codes, 1))[None])[0].numpy()
    decoder = tiny_backend.new_decoder()
    pieces, at = [], 0
    for n in batches:
        pieces.append(decoder.decode(codes[at : at + n]))
        at += n
    pieces.append(decoder.flush())
    decoder.close()
    streamed = np.concatenate(pieces)
    assert streamed.dtype == np.float32 and len(streamed) == len(codes) * FRAME_SAMPLES
    assert np.abs(streamed - np.clip(one_shot, -1, 1)).max() <= DETOKENIZER_TOLERANCE
    assert all(len(p) > 0 for p in pieces[:-1])  # every batch yields audio at once (480 samples held back)


def test_detokenizer_window_needs_its_left_context(tiny_backend: LFM2Backend) -> None:
    """The equality above is not vacuous: a window with too little left
    context does differ from the one-shot decode."""
    rng = np.random.default_rng(4)
    codes = [rng.integers(0, 2048, 8) for _ in range(12)]
    with torch.inference_mode():
        one_shot = tiny_backend.processor.decode(torch.tensor(np.stack(codes, 1))[None])[0].numpy()
    assert tiny_backend.detokenizer_context == 6  # conv (2) + 30-position band (29), ISTFT: ceil(33 / 6)
    short = DetokenizerDecoder(tiny_backend._detok, 1, tiny_backend.device)
    streamed = np.concatenate([short.decode([c]) for c in codes] + [short.flush()])
    assert np.abs(streamed - np.clip(one_shot, -1, 1)).max() > 100 * DETOKENIZER_TOLERANCE


def test_decoder_clamps_out_of_range_codes(tiny_backend: LFM2Backend) -> None:
    decoder = tiny_backend.new_decoder()
    out = decoder.decode([np.array([2048, 4000, -3, 0, 0, 0, 0, 0])])
    assert len(out) + len(decoder.flush()) == FRAME_SAMPLES
    assert np.isfinite(out).all()


# -- loading ------------------------------------------------------------------------------


def test_relative_str_path_loads(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_dir.parent)
    backend = LFM2Backend(model=tiny_dir.name, revision=None, device="auto")  # no GPU here: CPU
    backend.load()
    assert backend.device.type in ("cpu", "cuda") and backend.model_id == tiny_dir.name
    backend.warmup()
    backend.close()


def test_hugging_face_id_resolves_from_the_local_cache_only(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BackendLoadError, match="make download") as missing:
        LFM2Backend(model="LiquidAI/LFM2.5-Audio-1.5B", revision=None, device="cpu").load()
    assert PINNED_REVISION in str(missing.value) and "not in the local Hugging Face cache" in str(missing.value)
    snapshot = tmp_path / "models--LiquidAI--LFM2.5-Audio-1.5B" / "snapshots" / PINNED_REVISION
    shutil.copytree(tiny_dir, snapshot)
    backend = LFM2Backend(model="LiquidAI/LFM2.5-Audio-1.5B", revision=None, device="cpu")
    backend.load()
    assert backend.model_id == f"LiquidAI/LFM2.5-Audio-1.5B@{PINNED_REVISION[:12]}"
    backend.close()


def test_missing_checkpoint_names_make_download(tmp_path: Path) -> None:
    with pytest.raises(BackendLoadError, match="make download"):
        LFM2Backend(model=str(tmp_path / "nowhere"), revision=None, device="cpu").load()


@pytest.mark.parametrize("remove", ["model.safetensors", "tokenizer.json", "audio_detokenizer"])
def test_incomplete_checkpoint_names_make_download(tiny_dir: Path, tmp_path: Path, remove: str) -> None:
    broken = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(BackendLoadError, match=r"missing .*make download"):
        LFM2Backend(model=str(broken), device="cpu").load()


def test_weights_missing_tensors_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    state = load_file(str(broken / "model.safetensors"))
    del state[next(k for k in state if k.startswith("depthformer."))]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(BackendLoadError, match=r"lacks depthformer\..*make download"):
        LFM2Backend(model=str(broken), device="cpu").load()


def test_truncated_weight_file_is_a_load_error(tiny_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BackendLoadError, match="make download"):
        LFM2Backend(model=str(broken), device="cpu").load()

"""The benchmarks run end to end with tiny parameters and report sane figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu, latency
from bench.load import rfc3550_jitter, simulate_playback


def test_player_counts_a_late_chunk_as_one_underrun_and_waits_for_it() -> None:
    # 40 ms chunks; the third arrives 30 ms after it was due (t0 = 10 once 50 ms are buffered)
    arrivals = [(0.0, 40.0), (10.0, 40.0), (120.0, 40.0), (125.0, 40.0)]
    play = simulate_playback(arrivals, prebuffer_ms=50)
    assert play.start_ms == 10.0
    assert play.underruns == 1
    assert play.stall_ms == pytest.approx(30.0)
    assert play.end_ms == pytest.approx(10.0 + 30.0 + 160.0)


def test_player_on_time_stream_has_no_underrun_and_short_reply_plays_at_once() -> None:
    steady = [(i * 40.0, 40.0) for i in range(20)]
    assert simulate_playback(steady).underruns == 0
    short = [(5.0, 30.0)]  # less than the prebuffer in all: it plays when it is all there
    assert simulate_playback(short) == simulate_playback(short, prebuffer_ms=10)


def test_jitter_is_zero_for_real_time_arrivals_and_grows_with_bursts() -> None:
    steady = [(i * 40.0, 40.0) for i in range(50)]
    assert rfc3550_jitter(steady) == (0.0, 40.0)
    bursts = [(i // 8 * 320.0, 40.0) for i in range(48)]  # 8 chunks at once every 320 ms
    jitter, gap = rfc3550_jitter(bursts)
    assert jitter > 10.0
    assert gap == 320.0


def test_quick_bench_compares_tuned_and_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["--quick", "--conversations", "2", "--turns", "1", "--ramp-s", "0.2", "--json", str(out)]
    assert latency.main(argv) == 0
    printed = capsys.readouterr().out
    assert "tuned vs baseline" in printed and "end of speech -> first audio" in printed
    report = json.loads(out.read_text())
    tuned, baseline = report["runs"]["tuned"], report["runs"]["baseline"]
    for run in (tuned, baseline):
        assert run["errors"] == 0, run["error_samples"]
        assert run["turns_ok"] == run["turns_planned"] == 2
        assert 0 < run["first_text_ms"]["p50"] <= run["first_audio_ms"]["p50"] < 2000
        assert run["server_overhead_ms"]["events"] > 0
        assert 0 <= run["server_overhead_ms"]["p50"] < 1000
        assert run["underruns"] >= 0 and run["rtf"]["p50"] > 1
        assert run["server_cpu_pct"] > 0 and run["server_rss_mb"] > 10
    # the fast path: first audio after 6 text tokens + 2 frames instead of 16 frames
    assert tuned["first_audio_ms"]["p50"] < baseline["first_audio_ms"]["p50"]
    assert [t["met"] in (True, False) for t in report["targets"]] == [True, True, True]


def test_gpu_script_runs_on_the_tiny_model_on_cpu(tmp_path: Path) -> None:
    from scripts.make_tiny_model import build

    model = build(tmp_path / "tiny", variant="lfm2.5", size="tiny")
    out = tmp_path / "gpu.json"
    argv = ["--model", str(model), "--tiny", "--device", "cpu", "--concurrency", "1", "--turns", "1",
            "--max-new-tokens", "24", "--ramp-s", "0", "--json", str(out)]
    assert gpu.main(argv) == 0
    (level,) = json.loads(out.read_text())["levels"]
    assert level["concurrency"] == 1 and level["turns_ok"] == 1 and level["errors"] == 0
    assert level["prefill_ms"]["p50"] > 0
    assert level["steps_per_s_per_stream"]["p50"] > 0
    assert level["decode_batch_ms"]["p50"] > 0
    assert level["first_audio_ms"]["p50"] > 0

"""bench.realtime runs end to end (a short run): every audio delta is paired with its gRPC read."""

from __future__ import annotations

from bench.realtime import run


async def test_realtime_bench_pairs_every_delta() -> None:
    figures = await run(turns=2, step_ms=2.0)
    assert figures["deltas_per_turn"] == 80  # 40 frames of 80 ms, sent in 40 ms chunks
    added = figures["bridge_added_per_delta_ms"]
    assert added["n"] == 2 * figures["deltas_per_turn"]
    assert 0 <= added["p50"] <= added["max"]  # the WebSocket copy never arrives before the gRPC read
    assert figures["first_audio_ws_ms"]["n"] == figures["first_audio_grpc_ms"]["n"] == 2

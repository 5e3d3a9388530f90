"""Benchmarks: latency and scale of the voice-chat service (see bench/README.md)."""

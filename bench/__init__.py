"""Benchmarks: latency and scale of the voice-chat service (see the README's Benchmarks section)."""

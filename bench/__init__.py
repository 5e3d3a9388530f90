"""Benchmarks: latency, scale and the model (see docs/benchmarks.md)."""

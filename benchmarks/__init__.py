"""Benchmarks: router overhead (this issue), simulator and live leagues (later issues)."""

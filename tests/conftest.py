"""Shared test settings: this project's CI machines are small and timing is noisy, so
hypothesis never enforces per-example deadlines (speed lives in benchmarks/)."""

from hypothesis import settings

settings.register_profile("kvroute", deadline=None, max_examples=100)
settings.load_profile("kvroute")

"""Live tests: a real local Ray cluster, real vLLM on CPU, the tiny local model.

Marked ``live``; every module skips (with the reason) when vLLM or Ray Serve is not
importable, so ``make test`` on a machine without them runs nothing here. Deselect them
with ``-m "not live"``; run only them with ``pytest tests/live``.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "live: needs real Ray Serve + vLLM (CPU is enough); minutes, not seconds")


@pytest.fixture(scope="session")
def tiny_model_path():
    from engines.tiny_model import build_tiny_model

    return build_tiny_model(os.environ.get("KVROUTE_TINY_MODEL") or None)

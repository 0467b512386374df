"""``benchmarks/gpu_profile.py``'s fit (the GPU runs themselves need a GPU: their results
are in benchmarks/results/gpu_profile_h100.json and the measured presets)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from benchmarks.gpu_profile import _nonneg_lstsq  # noqa: E402
from router.profile import PROFILES  # noqa: E402


def test_the_fit_recovers_known_step_constants_and_keeps_them_non_negative():
    overhead, per_seq, per_context = 7e-3, 2e-5, 4e-8
    points = [(s, c) for s in (1, 8, 32, 128) for c in (1024, 4096)]
    rows = [[1.0, s, s * c] for s, c in points]
    values = [overhead + per_seq * s + per_context * s * c for s, c in points]
    fit = _nonneg_lstsq(torch, rows, values)
    assert fit == pytest.approx([overhead, per_seq, per_context], rel=1e-6)
    # A column that would fit negative is dropped to 0, not kept negative.
    assert min(_nonneg_lstsq(torch, [[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]], [3.0, 2.0, 1.0])) >= 0


def test_the_measured_presets_are_shipped_beside_the_roofline_ones():
    for name in ("llama3-8b-h100-measured", "qwen2.5-32b-h100-measured"):
        assert PROFILES[name].source.startswith("measured: benchmarks/gpu_profile.py")
    assert PROFILES["llama3-8b-h100-measured"].prefill_s_per_token < PROFILES["llama3-8b-h100"].prefill_s_per_token

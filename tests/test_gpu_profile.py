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


def test_full_depth_times_every_layer_within_the_kv_budget(tmp_path):
    """``--full-depth`` on the toy shape (CPU): no extrapolation, decode points only where
    their KV fits the budget plus the ones that fill it, and the byte counts the memory
    check uses are the model's own."""
    import json

    from benchmarks.gpu_profile import SHAPES, Model, full_depth_decode_points, main, weight_bytes

    assert full_depth_decode_points(215_000)[-1] == (209, 1024)
    assert all(seqs * (context + 1) <= 215_000 for seqs, context in full_depth_decode_points(215_000))
    model = Model(torch, SHAPES["toy"], SHAPES["toy"]["layers"], "cpu", torch.bfloat16)
    tensors = [model.norm, model.lm_head] + [t for layer in model.layers for t in vars(layer).values()
                                             if isinstance(t, torch.Tensor)]
    assert weight_bytes(SHAPES["toy"], SHAPES["toy"]["layers"]) == sum(t.numel() * 2 for t in tensors)

    out = tmp_path / "full.json"
    main(["--shape", "toy", "--device", "cpu", "--full-depth", "--kv-tokens", "600", "--repeats", "2",
          "--json", str(out)])
    result = json.loads(out.read_text())["results"][0]
    assert result["full_depth"] and result["depths"] == [SHAPES["toy"]["layers"]] and result["kv_tokens"] == 600
    decode = [(r["seqs"], r["context"]) for r in result["rows"]["decode"]]
    assert decode == [(1, 32), (4, 32), (4, 128), (18, 32)]  # (18, 32) fills the 600 tokens
    assert all(r["step_s"] > 0 for kind in ("prefill", "decode") for r in result["rows"][kind])

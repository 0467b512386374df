"""kvroute calibrate's fit: samples drawn from a known profile give that profile back.
(The measurement against a live vLLM replica is tested in tests/live/.)"""

from __future__ import annotations

import random

import pytest

from router.errors import ConfigError
from router.profile import LatencyProfile, get_profile
from simulator.calibrate import Samples, fit_profile, write_profile

TRUE = LatencyProfile(name="truth", step_overhead_s=0.004, prefill_s_per_token=5e-5, decode_s_per_seq=3e-4,
                      attention_s_per_context_token=2e-7, prefill_attention_s_per_pair=4e-9)


def synthetic(noise: float, seed: int = 0) -> Samples:
    rng = random.Random(seed)
    s = Samples()
    for length in (32, 128, 512, 1024, 2048):
        for _ in range(3):
            t = 0.01 + TRUE.step_s(length, 0, 0, length * length // 2)
            s.prefill.append((length, t * (1 + rng.gauss(0, noise))))
    for n in (1, 2, 4, 8, 16):
        for ctx in (100.0, 400.0):
            t = TRUE.step_s(0, n, int(n * ctx))
            s.decode.append((n, ctx, t * (1 + rng.gauss(0, noise))))
    return s


def test_exact_samples_give_the_profile_back():
    profile, report = fit_profile(synthetic(0.0), name="fit", max_batched_tokens=2048, max_num_seqs=64,
                                  kv_capacity_tokens=50_000)
    for field in ("step_overhead_s", "prefill_s_per_token", "decode_s_per_seq", "attention_s_per_context_token",
                  "prefill_attention_s_per_pair"):
        assert getattr(profile, field) == pytest.approx(getattr(TRUE, field), rel=1e-6), field
    # The prefill intercept is the per-request overhead plus one step overhead.
    assert report["prefill_request_overhead_s"] == pytest.approx(0.01 + TRUE.step_overhead_s, rel=1e-6)
    # ... of which the 10 ms the samples add outside engine steps is the serving overhead.
    assert profile.request_overhead_s == pytest.approx(0.01, rel=1e-6)
    assert report["prefill_r2"] > 0.999999 and report["decode_r2"] > 0.999999


def test_noisy_samples_stay_close_and_coefficients_never_go_negative():
    profile, report = fit_profile(synthetic(0.03, seed=4), name="fit", max_batched_tokens=2048, max_num_seqs=64,
                                  kv_capacity_tokens=50_000)
    assert profile.prefill_s_per_token == pytest.approx(TRUE.prefill_s_per_token, rel=0.2)
    assert profile.decode_s_per_seq == pytest.approx(TRUE.decode_s_per_seq, rel=0.3)
    assert all(getattr(profile, f) >= 0 for f in ("step_overhead_s", "attention_s_per_context_token",
                                                   "prefill_attention_s_per_pair"))
    assert report["prefill_r2"] > 0.95


def test_the_written_profile_loads_by_path(tmp_path):
    profile, report = fit_profile(synthetic(0.0), name="tiny-cpu", max_batched_tokens=2048, max_num_seqs=64,
                                  kv_capacity_tokens=50_000)
    path = write_profile(profile, report, tmp_path / "tiny.json")
    loaded = get_profile(str(path))
    assert loaded.name == "tiny-cpu" and loaded.prefill_s_per_token == profile.prefill_s_per_token


def test_too_few_samples_is_a_clear_error():
    s = synthetic(0.0)
    s.prefill = s.prefill[:2]
    with pytest.raises(ConfigError, match="prefill samples"):
        fit_profile(s, name="x", max_batched_tokens=1, max_num_seqs=1, kv_capacity_tokens=1)


def test_a_bad_profile_file_names_the_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"step_overhead_s": -1, "prefill_s_per_token": 0, "decode_s_per_seq": 0, '
                   '"attention_s_per_context_token": 0}')
    with pytest.raises(ConfigError) as exc:
        get_profile(str(bad))
    assert exc.value.field == "profile.step_overhead_s"
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"prefil_s_per_token": 1}')
    with pytest.raises(ConfigError) as exc:
        get_profile(str(unknown))
    assert exc.value.field == "profile.prefil_s_per_token"


def test_the_request_overhead_shifts_every_simulated_ttft_and_nothing_else():
    import dataclasses

    from simulator.cluster import ClusterConfig
    from simulator.run import run_policy
    from simulator.workloads import make_workload

    requests = list(make_workload("chat", 80, seed=3, rate_per_s=4.0))
    rows = {}
    for overhead in (0.0, 0.25):
        profile = dataclasses.replace(TRUE, request_overhead_s=overhead)
        _, metrics, _ = run_policy(requests, ClusterConfig(replicas=2, kv_blocks=4000, profile=profile), "cache_aware")
        rows[overhead] = metrics
    base, shifted = rows[0.0], rows[0.25]
    # The overhead is outside the engines: the same cache hits, every TTFT exactly 0.25 s later.
    assert list(base.cached) == list(shifted.cached)
    assert [b + 0.25 for b in base.ttft] == pytest.approx(list(shifted.ttft), abs=1e-9)


def test_contention_slots_follow_processor_sharing():
    from simulator.calibrate import contention_slots

    # Engine part 100 ms alone, 200 ms with the other replica stepping: the host runs one
    # engine at full speed (two share it half and half).
    fit = contention_slots(alone_s=0.15, busy_s=0.25, outside_s=0.05, replicas=2)
    assert fit["slowdown"] == 2.0 and fit["host_slots"] == 1.0
    # No slowdown: as many slots as replicas (no effect); a partial one in between.
    assert contention_slots(0.15, 0.15, 0.05)["host_slots"] == 2.0
    assert contention_slots(0.15, 0.20, 0.05)["host_slots"] == pytest.approx(2 / 1.5, abs=1e-3)
    # Worse than full sharing (other processes too) is kept at 1; faster busy than alone is 2.
    assert contention_slots(0.15, 0.45, 0.05)["host_slots"] == 1.0
    assert contention_slots(0.15, 0.10, 0.05)["host_slots"] == 2.0
    assert contention_slots(0.15, 0.25, 0.05, replicas=1)["host_slots"] is None
    assert contention_slots(0.04, 0.25, 0.05)["host_slots"] is None  # prefill under the overhead

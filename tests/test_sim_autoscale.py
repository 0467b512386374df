"""Autoscaling in the simulator (``simulator.autoscale``: Ray Serve's default policy) and
time-varying arrival rates (``rate_profile``): the policy's arithmetic and delays against a
naive model, a load ramp scaling a cluster up and back down without losing a request, new
replicas getting traffic, and the command line."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import ConfigError
from simulator.autoscale import AutoscaleConfig, Autoscaler
from simulator.cluster import ClusterConfig
from simulator.run import run_policy
from simulator.workloads import SimRequest, WorkloadError, make_workload, rate_profile


def test_desired_replicas_is_mean_ongoing_over_target_clamped():
    scaler = Autoscaler(AutoscaleConfig(min_replicas=1, max_replicas=5, target_ongoing_requests=4,
                                        look_back_period_s=30, metrics_interval_s=10))
    assert scaler.desired() == 1  # nothing sampled: the minimum
    for t, n in ((0, 8), (10, 12), (20, 16)):
        scaler.observe(t, n)
    assert scaler.desired() == 3  # mean 12 / 4
    scaler.observe(40, 100)  # the 30 s window keeps t >= 10: mean(12, 16, 100) / 4 -> 11, clamped to 5
    assert scaler.desired() == 5
    for t in (80, 90, 100, 110):
        scaler.observe(t, 0)
    assert scaler.desired() == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 20.0), st.integers(0, 60)), min_size=1, max_size=60),
       st.integers(1, 3), st.integers(0, 4), st.floats(0.0, 40.0), st.floats(0.0, 90.0))
def test_decisions_match_a_naive_model_of_serves_delay_logic(steps, low, extra, up_delay, down_delay):
    """Against a model that keeps every sample and recomputes: the target moves only to the
    clamped desired count, and only once the same direction has been wanted continuously
    for its delay."""
    cfg = AutoscaleConfig(min_replicas=low, max_replicas=low + extra, target_ongoing_requests=3.0,
                          upscale_delay_s=up_delay, downscale_delay_s=down_delay, look_back_period_s=25.0)
    scaler = Autoscaler(cfg)
    samples: list[tuple[float, int]] = []
    target, now = low, 0.0
    wish, since = 0, None
    for dt, ongoing in steps:
        now += dt
        scaler.observe(now, ongoing)
        samples.append((now, ongoing))
        window = [n for t, n in samples if t >= now - 25.0]
        desired = max(low, min(low + extra, math.ceil(sum(window) / len(window) / 3.0 - 1e-9)))
        direction = (desired > target) - (desired < target)
        expected = target
        if direction == 0:
            wish, since = 0, None
        else:
            if direction != wish:
                wish, since = direction, now
            if now - since + 1e-9 >= (up_delay if direction > 0 else down_delay):
                expected, wish, since = desired, 0, None
        got = scaler.decide(now, target)
        assert got == expected
        assert low <= got <= low + extra
        target = got


def test_bad_autoscale_configuration_fails_naming_the_field():
    for kwargs, field in (({"min_replicas": 0}, "autoscale.min_replicas"),
                          ({"min_replicas": 3, "max_replicas": 2}, "autoscale.max_replicas"),
                          ({"target_ongoing_requests": 0}, "autoscale.target_ongoing_requests"),
                          ({"upscale_delay_s": -1}, "autoscale.upscale_delay_s"),
                          ({"startup_s": math.inf}, "autoscale.startup_s")):
        with pytest.raises(ConfigError) as info:
            AutoscaleConfig(**kwargs)
        assert info.value.field == field
    with pytest.raises(ConfigError, match="^replicas"):
        ClusterConfig(replicas=5, autoscale=AutoscaleConfig(min_replicas=1, max_replicas=4))


def test_rate_profile_warps_arrivals_phase_by_phase():
    requests = [SimRequest(i, float(i), 10, 1, ((i, 10),)) for i in range(10)]  # one a second
    out = list(rate_profile(requests, [(2, 1.0), (2, 2.0), (1, 0.5)]))
    # 2 s at 1x (t 0, 1), 2 s at 2x (original 2..5 at 2, 2.5, 3, 3.5), then 0.5x.
    assert [r.arrival_s for r in out] == [0.0, 1.0, 2.0, 2.5, 3.0, 3.5, 4.0, 6.0, 8.0, 10.0]
    assert [r.request_id for r in out] == list(range(10))
    for bad in ([], [(1, 0)], [(-1, 1)], [(1, math.nan)]):
        with pytest.raises(WorkloadError):
            list(rate_profile(requests, bad))


@pytest.fixture(scope="module")
def ramp():
    """A chat workload at 10/s for 100 s, 40/s for 100 s, then 5/s."""
    requests = list(make_workload("chat", 5000, seed=2, rate_per_s=10.0))
    return list(rate_profile(requests, [(100, 1.0), (100, 4.0), (300, 0.5)]))


@pytest.mark.parametrize("policy", ["cache_aware", "pow2", "ray_prefix"])
def test_a_ramp_scales_up_and_back_down_losing_no_request(ramp, policy):
    auto = AutoscaleConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=8, upscale_delay_s=10,
                           downscale_delay_s=60, startup_s=20)
    row, metrics, cluster = run_policy(ramp, ClusterConfig(replicas=1, autoscale=auto), policy)
    assert row["completed"] == row["requests"] == len(ramp)
    assert cluster.in_flight == 0
    a = row["autoscale"]
    counts = [n for _, n in a["timeline"]]
    assert a["max_replicas"] == 4 and counts[0] == 1 and counts[-1] < 4 and a["drained"] >= 1
    assert a["started"] == 3
    # Every replica started by the autoscaler was routed requests: none idles after scale-up.
    for name in ("auto-1", "auto-2", "auto-3"):
        assert metrics.routed_requests[metrics.replica_index(name)] > 0, (policy, name)
    # A scale-up happens only after the load rose (the ramp starts at 100 s), plus startup.
    assert a["timeline"][1][0] >= 100 + auto.startup_s


def test_cli_simulate_autoscale_reports_replicas_over_time(tmp_path, capsys):
    from router.cli import main

    out = tmp_path / "auto.json"
    assert main(["simulate", "--workload", "chat", "--requests", "1500", "--rate", "10", "--rate-profile",
                 "40:1,40:4,200:0.5", "--replicas", "1", "--autoscale", "1:3", "--target-ongoing-requests", "4",
                 "--upscale-delay", "5", "--downscale-delay", "30", "--startup", "10", "--policy", "cache_aware",
                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["completed"] == 1500 and row["autoscale"]["max_replicas"] >= 2
    assert "replicas over time" in capsys.readouterr().out
    for argv, field in ((["--autoscale", "3"], "autoscale"), (["--autoscale", "2:4"], "replicas"),
                        (["--rate-profile", "10"], "rate_profile")):
        assert main(["simulate", "--requests", "10", *argv]) == 2
        assert field in capsys.readouterr().err

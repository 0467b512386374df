"""Mixed fleets in the simulator: replicas of different speeds (``ClusterConfig.replica_speeds``,
``LatencyProfile.slowed``)."""

from __future__ import annotations

import pytest

from router.errors import ConfigError
from router.profile import DEFAULT_PROFILE
from simulator.cluster import ClusterConfig
from simulator.run import run_policy
from simulator.workloads import SimRequest, make_workload


def test_a_slowed_profile_scales_every_step_constant_and_nothing_else():
    slow = DEFAULT_PROFILE.slowed(2.0)
    assert slow.step_s(1000, 8, 5000, 10_000) == pytest.approx(2 * DEFAULT_PROFILE.step_s(1000, 8, 5000, 10_000))
    assert (slow.kv_capacity_tokens, slow.max_batched_tokens, slow.request_overhead_s) == (
        DEFAULT_PROFILE.kv_capacity_tokens, DEFAULT_PROFILE.max_batched_tokens, DEFAULT_PROFILE.request_overhead_s)
    assert DEFAULT_PROFILE.slowed(1) is DEFAULT_PROFILE
    with pytest.raises(ConfigError, match="slowdown"):
        DEFAULT_PROFILE.slowed(0)


def test_a_half_speed_replica_takes_twice_as_long():
    request = [SimRequest(0, 0.0, 3000, 8, ((1, 3000),))]
    ttft = {}
    for speeds in ((1.0,), (0.5,)):
        _, metrics, _ = run_policy(request, ClusterConfig(replicas=1, replica_speeds=speeds), "round_robin")
        ttft[speeds[0]] = metrics.ttft[0]
    assert ttft[0.5] == pytest.approx(2 * ttft[1.0])


def test_replica_speeds_are_checked():
    with pytest.raises(ConfigError, match="replica_speeds"):
        ClusterConfig(replicas=3, replica_speeds=(1.0, 0.5))
    with pytest.raises(ConfigError, match="replica_speeds"):
        ClusterConfig(replicas=2, replica_speeds=(1.0, 0.0))


def test_on_a_mixed_fleet_cache_aware_gives_the_slow_half_less_and_beats_round_robin():
    requests = list(make_workload("mixed", 3000, seed=1, rate_per_s=200.0))
    config = ClusterConfig(replicas=8, replica_speeds=(1.0,) * 4 + (0.5,) * 4)
    rows = {}
    for policy in ("cache_aware", "round_robin"):
        row, metrics, _ = run_policy(requests, config, policy)
        assert row["completed"] == 3000
        share = row["replica_token_share"]
        rows[policy] = (row, sum(share[f"replica-{i}"] for i in range(4, 8)))
    (aware, slow_share), (rr, rr_slow_share) = rows["cache_aware"], rows["round_robin"]
    assert rr_slow_share == pytest.approx(0.5, abs=0.05)
    assert slow_share < 0.45  # the slow replicas' queues are longer: they get less of the work
    assert aware["ttft_p99_s"] < rr["ttft_p99_s"]


def test_told_the_speeds_cache_aware_moves_work_off_the_slow_half():
    """``router_knows_speeds`` (the default) sets each router's replica speeds
    (``RoutingCore.set_speeds``); ``cache_aware`` divides a replica's time to first token
    by it, so the slow half gets less of the work than when the router is not told."""
    requests = list(make_workload("mixed", 3000, seed=1, rate_per_s=200.0))
    slow_share = {}
    for told in (True, False):
        config = ClusterConfig(replicas=8, replica_speeds=(1.0,) * 4 + (0.5,) * 4, router_knows_speeds=told)
        row, _, cluster = run_policy(requests, config, "cache_aware")
        assert row["completed"] == 3000
        speeds = {r: load.speed for r, load in cluster.routers[0].load.loads.items()}
        assert speeds == {f"replica-{i}": (1.0 if i < 4 else 0.5) if told else 1.0 for i in range(8)}
        slow_share[told] = sum(row["replica_token_share"][f"replica-{i}"] for i in range(4, 8))
    assert slow_share[True] < slow_share[False] - 0.05

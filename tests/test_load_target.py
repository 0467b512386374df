"""The autoscaler's load target reaches ``cache_aware``'s bounded-load rule: an engine
replica reports its deployment's ``target_ongoing_requests`` (``kvroute_target_ongoing``),
the router hands it to the policy, and a replica past ``ceil(load_factor * target)`` in
flight spills new work to the others, so the replicas Serve adds get traffic. The live
figures are ``kvroute bench autoscale``'s (README, "Autoscaling, live")."""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import SimpleNamespace

import pytest

from engines.serve_replica import autoscaling_target
from router.core import RoutingCore
from router.errors import ConfigError
from router.service import RoutingService

PREFIX = "a system prompt and a long shared history that every request repeats " * 40


def _in_flight_per_replica(core: RoutingCore, requests: int = 6) -> Counter:
    """Route ``requests`` requests sharing one long prefix, none completing, over three
    replicas; how many each replica got."""
    core.on_replicas_changed(["a", "b", "c"], now=0.0)
    picks = Counter()
    for i in range(requests):
        request = core.make_request(PREFIX + f"question {i}", request_id=i)
        picks[core.route(request, now=0.01 * i).replica] += 1
    return picks


@pytest.mark.parametrize("native", [True, False], ids=["C", "python"])
def test_a_replica_past_the_autoscalers_target_spills_to_the_others(native):
    def core(target, **options):
        c = RoutingCore.from_options("cache_aware", policy_options=options, seed=3)
        if not native:
            c.policy._speedups = None
        c.set_load_target(target)
        return c

    # Not autoscaled: the bound starts at 16 in flight, so the holder of the prefix takes all.
    assert max(_in_flight_per_replica(core(None)).values()) == 6
    # Target 1 (load_factor 1.25): the floor is 2, the bound max(2, ceil(1.25 * (in
    # flight + 1) / 3)): the second request already spills.
    spread = _in_flight_per_replica(core(1))
    assert len(spread) >= 2 and max(spread.values()) <= 3, spread
    assert len(_in_flight_per_replica(core(1), requests=3)) == 2
    # Target 4: the floor is 5.
    assert max(_in_flight_per_replica(core(4)).values()) == 5
    # The operator can keep the configured floor.
    assert max(_in_flight_per_replica(core(1, follow_autoscaler=False)).values()) == 6


def test_the_floor_follows_the_target_and_back():
    core = RoutingCore.from_options("cache_aware", policy_options={"bound_floor": 8, "load_factor": 1.5})
    policy = core.policy
    assert policy.bound_floor() == 8
    core.set_load_target(1)
    assert (policy.bound_floor(), core.load_target) == (2, 1.0)
    core.set_load_target(0.5)
    assert policy.bound_floor() == 1
    core.set_load_target(None)  # redeployed without autoscaling
    assert policy.bound_floor() == 8
    # The C ranker's constants follow (it is reinstalled on every change).
    core.set_load_target(2)
    assert policy._native_params()[12] == 3.0


def test_a_bad_target_names_the_field_and_changes_nothing():
    core = RoutingCore.from_options("cache_aware")
    core.set_load_target(2)
    for bad in (0, -1, float("nan"), float("inf"), "2", True):
        with pytest.raises(ConfigError) as exc:
            core.set_load_target(bad)
        assert exc.value.field == "target_ongoing_requests"
    assert core.load_target == 2.0
    with pytest.raises(ConfigError) as exc:
        RoutingCore.from_options("cache_aware", policy_options={"follow_autoscaler": "yes"})
    assert exc.value.field == "cache_aware.follow_autoscaler"


def test_engines_report_the_target_and_a_wrong_one_is_ignored():
    service = RoutingService({"policy": "cache_aware"})
    service.set_replicas(["r1", "r2"])
    service.engine_report("r1", {"kvroute_target_ongoing": 2, "running": 0})
    assert service.core.load_target == 2.0 and service.core.policy.bound_floor() == 3
    for wrong in (0, "two", True, float("nan")):
        service.engine_report("r2", {"kvroute_target_ongoing": wrong})
        assert service.core.load_target == 2.0
    service.engine_report("r2", {"running": 0})  # an older engine that does not report it
    assert service.core.load_target == 2.0
    service.engine_report("r1", {"kvroute_target_ongoing": None})  # not autoscaled any more
    assert service.core.load_target is None and service.core.policy.bound_floor() == 16


def test_an_engine_reads_the_target_from_its_replica_context():
    def context(autoscaling):
        return SimpleNamespace(_deployment_config=SimpleNamespace(autoscaling_config=autoscaling))

    assert autoscaling_target(context(SimpleNamespace(target_ongoing_requests=2))) == 2.0
    assert autoscaling_target(context(None)) is None  # a fixed replica count
    assert autoscaling_target(SimpleNamespace()) is None  # a Serve without that attribute
    assert autoscaling_target(context(SimpleNamespace(target_ongoing_requests=0))) is None
    assert autoscaling_target() is None  # not inside a Serve replica


def test_the_simulators_autoscaled_replicas_get_traffic_under_cache_aware():
    """The simulated ramp of ``kvroute bench autoscale`` (Serve's autoscaler, 1-3 replicas,
    target 1): following the target gives the added replicas more of the requests than the
    fixed floor, at no cost in hit rate."""
    from benchmarks import autoscale_bench
    from engines.routers import profile_options
    from router.profile import get_profile
    from simulator.autoscale import AutoscaleConfig
    from simulator.cluster import ClusterConfig
    from simulator.run import run_policy

    requests = autoscale_bench.ramp_requests(base_rate=2.0, ramp=autoscale_bench.DEFAULT_RAMP, seed=0)
    fields = {f.name for f in dataclasses.fields(AutoscaleConfig)}
    scale = AutoscaleConfig(**{k: v for k, v in autoscale_bench.DEFAULT_AUTOSCALING.items() if k in fields},
                            startup_s=60.0)
    config = ClusterConfig(replicas=1, block_size=32, kv_blocks=256, profile=get_profile("tiny-llama-cpu"),
                           max_num_seqs=16, max_num_batched_tokens=2048, host_slots=2.0, autoscale=scale)
    rows = {}
    for follow in (True, False):
        options = {**profile_options("cache_aware", "tiny-llama-cpu"), "follow_autoscaler": follow}
        row, _, _ = run_policy(requests, config, "cache_aware", options)
        rows[follow] = row
    added = {follow: sum(share for name, share in row["replica_share"].items() if name.startswith("auto-"))
             for follow, row in rows.items()}
    assert added[True] > added[False] + 0.03, added
    assert rows[True]["hit_rate"] >= rows[False]["hit_rate"] - 0.01

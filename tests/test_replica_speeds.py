"""Mixed fleets: each replica's speed relative to the policy's latency profile reaches the
router (configured, or reported by the engine) and ``cache_aware`` prices it. The cost
formula's scaling is tested in tests/test_cache_aware.py, the gateway's ``speed=`` option
in tests/test_gateway.py."""

from __future__ import annotations

import pytest

from router.core import RoutingCore
from router.errors import ConfigError
from router.service import RoutingService


def test_speeds_are_kept_for_replicas_that_join_later_and_bad_ones_name_the_field():
    core = RoutingCore.from_options("cache_aware")
    core.set_speeds({"b": 0.5})
    core.on_replicas_changed(["a"], now=0.0)
    assert core.load.loads["a"].speed == 1.0
    core.on_replicas_changed(["a", "b"], now=1.0)
    assert core.load.loads["b"].speed == 0.5
    core.on_replicas_changed(["a"], now=2.0)
    core.on_replicas_changed(["a", "b"], now=3.0)  # back after a restart: the same hardware
    assert core.load.loads["b"].speed == 0.5
    for bad in (0, -1.0, float("nan"), float("inf"), "fast", True):
        with pytest.raises(ConfigError) as exc:
            core.set_speeds({"a": 0.25, "b": bad})
        assert exc.value.field == "speed"
        assert core.load.loads["a"].speed == 1.0  # all or nothing


def test_an_engine_reports_its_speed_and_a_wrong_one_is_ignored():
    service = RoutingService({"policy": "cache_aware"})
    service.set_replicas(["r1", "r2"])
    service.engine_report("r1", {"kvroute_speed": 0.5, "running": 0, "waiting": 0})
    assert service.core.load.loads["r1"].speed == 0.5
    for wrong in (0, -2, "slow", None, True, float("nan")):
        service.engine_report("r2", {"kvroute_speed": wrong})
        assert service.core.load.loads["r2"].speed == 1.0
    service.engine_report("gone", {"kvroute_speed": 0.5})  # not a replica: nothing to set
    assert "gone" not in service.core.load.loads


def test_the_router_sends_new_work_to_the_faster_of_two_idle_replicas():
    core = RoutingCore.from_options("cache_aware", seed=1)
    core.on_replicas_changed(["slow", "fast"], now=0.0)
    core.set_speeds({"slow": 0.5})
    picks = set()
    for i in range(20):
        request = core.make_request(f"an unrelated prompt number {i} " * 20, request_id=i)
        picks.add(core.route(request, now=float(i)).replica)
        core.on_completed(i, now=float(i) + 0.5)
    assert picks == {"fast"}

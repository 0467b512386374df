"""The router's metrics (router/metrics.py) and the Grafana dashboard that charts them.

``RouterMetrics`` is tested here with a recording factory in place of ``ray.util.metrics``
(its own accumulation logic); the export through a real Ray metrics endpoint is tested in
tests/test_serve_router.py and tests/live/test_cache_aware_live.py.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from router.metrics import (MAX_LATENCY_SAMPLES, METRICS, OUTCOMES, ReplicaSnapshot, RouterMetrics, RouterSnapshot,
                            all_prometheus_series, prometheus_series)

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "kvroute.json"


class Recorded:
    """What one metric object was asked to do: (method, value, tags) in order."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.calls: list[tuple[str, float, dict]] = []

    def inc(self, value=1.0, tags=None):
        assert value > 0  # ray.util.metrics.Counter rejects anything else
        self.calls.append(("inc", value, dict(tags or {})))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, dict(tags or {})))

    def set(self, value, tags=None):
        self.calls.append(("set", value, dict(tags or {})))

    def total(self, **tags) -> float:
        return sum(v for m, v, t in self.calls if m == "inc" and all(t.get(k) == w for k, w in tags.items()))

    def last(self, **tags) -> float | None:
        values = [v for m, v, t in self.calls if m == "set" and all(t.get(k) == w for k, w in tags.items())]
        return values[-1] if values else None


@pytest.fixture
def recorder():
    made: dict[str, Recorded] = {}

    def factory(spec):
        made[spec.name] = Recorded(spec)
        return made[spec.name]

    return made, factory


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def test_every_dashboard_query_names_an_exported_series():
    exported = all_prometheus_series()
    used = {name for expr in _dashboard_exprs() for name in re.findall(r"\bray_kvroute_\w+", expr)}
    assert used, "no kvroute series in the dashboard"
    assert used <= exported, sorted(used - exported)


def test_the_dashboard_charts_every_metric():
    exprs = "\n".join(_dashboard_exprs())
    missing = [spec.name for spec in METRICS if not any(s in exprs for s in prometheus_series(spec))]
    assert not missing


def test_series_names_follow_rays_prometheus_naming():
    # Ray prefixes "ray_", exports a counter as <name>_total and a histogram as three series.
    by_kind = {spec.kind: prometheus_series(spec) for spec in METRICS}
    assert all(s.startswith("ray_kvroute_") for s in all_prometheus_series())
    assert by_kind["counter"][0].endswith("_total")
    assert {s.rsplit("_", 1)[1] for s in by_kind["histogram"]} == {"bucket", "sum", "count"}


def test_decisions_are_counted_by_outcome_and_pushed_only_on_flush(recorder):
    made, factory = recorder
    metrics = RouterMetrics("cache_aware", factory)
    plan = {"prefix_hit": 7, "spill": 2, "miss": 3, "session": 5, "fallback": 1}
    for outcome, count in plan.items():
        for _ in range(count):
            metrics.record_decision(outcome, None if outcome == "fallback" else 40e-6, 100, 60)
    assert made["kvroute_router_decisions"].calls == []  # nothing reaches Ray before a flush
    metrics.flush(RouterSnapshot())
    decisions = made["kvroute_router_decisions"]
    for outcome, count in plan.items():
        assert decisions.total(policy="cache_aware", outcome=outcome) == count
    latencies = [v for m, v, _ in made["kvroute_router_decision_latency_us"].calls]
    assert latencies == [pytest.approx(40.0)] * (sum(plan.values()) - 1)  # fallback has no latency
    assert made["kvroute_router_prompt_tokens"].total() == 100 * sum(plan.values())
    assert made["kvroute_router_predicted_cached_tokens"].total() == 60 * sum(plan.values())
    metrics.flush(RouterSnapshot())  # a second flush with nothing new pushes nothing new
    assert decisions.total() == sum(plan.values())


def test_cumulative_sources_are_exported_as_increments_even_across_a_reset(recorder):
    made, factory = recorder
    metrics = RouterMetrics("p", factory)
    for evicted, gaps in ((5, 1), (8, 1), (3, 4)):  # the third: the source restarted from 0
        metrics.flush(RouterSnapshot(session_evictions=evicted, kv_events={"gaps": gaps, "events": 10}))
    assert [v for _, v, _ in made["kvroute_router_session_evictions"].calls] == [5, 3, 3]
    assert [v for _, v, _ in made["kvroute_kv_event_gaps"].calls] == [1, 3]  # 1 -> 1 -> 4


def test_achieved_hit_ratio_is_the_engines_ratio_over_its_last_interval(recorder):
    made, factory = recorder
    metrics = RouterMetrics("p", factory)
    reports = [(100, 40), (300, 190), (300, 190), (50, 10)]  # the last: the engine restarted
    expected = [40 / 100, (190 - 40) / (300 - 100), (190 - 40) / (300 - 100), 10 / 50]
    for (queries, hits), want in zip(reports, expected):
        metrics.flush(RouterSnapshot(replicas={"r1": ReplicaSnapshot(prefix_cache_queries=queries,
                                                                     prefix_cache_hits=hits)}))
        assert metrics.achieved_hit_ratio("r1") == pytest.approx(want)
        assert made["kvroute_router_achieved_hit_ratio"].last(replica="r1") == pytest.approx(want)


def test_a_replica_that_leaves_has_its_gauges_zeroed(recorder):
    made, factory = recorder
    metrics = RouterMetrics("p", factory)
    busy = ReplicaSnapshot(tree_blocks=12, in_flight=3, engine_kv_usage=0.5, prefix_cache_queries=10,
                           prefix_cache_hits=5)
    metrics.flush(RouterSnapshot(replicas={"a": busy, "b": busy}))
    metrics.flush(RouterSnapshot(replicas={"b": busy}))
    for name in ("kvroute_router_tree_blocks", "kvroute_router_in_flight", "kvroute_router_engine_kv_usage"):
        assert made[name].last(replica="a") == 0
        assert made[name].last(replica="b") > 0
    assert metrics.achieved_hit_ratio("a") is None


def test_latency_samples_are_bounded_between_flushes(recorder):
    made, factory = recorder
    metrics = RouterMetrics("p", factory)
    extra = 25
    for _ in range(MAX_LATENCY_SAMPLES + extra):
        metrics.record_decision("miss", 1e-5, 10, 0)
    metrics.flush(RouterSnapshot())
    assert len(made["kvroute_router_decision_latency_us"].calls) == MAX_LATENCY_SAMPLES
    assert made["kvroute_router_latency_samples_dropped"].total() == extra
    # every decision is still counted
    assert made["kvroute_router_decisions"].total(outcome="miss") == MAX_LATENCY_SAMPLES + extra


def test_label_values_stay_bounded_whatever_the_traffic(recorder):
    """No label takes a per-request or per-session value: after many distinct requests the
    label values are the policy, the five outcomes and the replicas, nothing else."""
    made, factory = recorder
    metrics = RouterMetrics("cache_aware", factory)
    replicas = {f"replica-{i}": ReplicaSnapshot(tree_blocks=i) for i in range(3)}
    for i in range(5000):
        metrics.record_decision(OUTCOMES[i % len(OUTCOMES)], 1e-5, 10 + i, i % 10)
        if i % 500 == 0:
            metrics.flush(RouterSnapshot(replicas=replicas, sessions=i))
    values = defaultdict(set)
    for recorded in made.values():
        for _, _, tags in recorded.calls:
            assert set(tags) <= set(recorded.spec.tags)  # only the declared label keys
            for key, value in tags.items():
                values[key].add(value)
    assert values["policy"] == {"cache_aware"}
    assert values["outcome"] == set(OUTCOMES)
    assert values["replica"] == set(replicas)


def test_a_sliced_flush_observes_every_sample_in_order_a_slice_at_a_time(recorder):
    """The router's periodic flush observes at most a slice of samples at once (a Ray
    histogram's observe costs microseconds on the routing loop) and the rest in later
    slices: none lost, none twice, oldest first, counters and gauges at once."""
    made, factory = recorder
    metrics = RouterMetrics("p", factory)
    for i in range(700):
        metrics.record_decision("prefix_hit", i * 1e-6, 100, 50)
        metrics.record_tokenize_wait(i * 1e-6)
    assert metrics.flush(RouterSnapshot(sessions=3), sample_limit=256) is True
    observed = lambda name: [v for m, v, _ in made[name].calls if m == "observe"]  # noqa: E731
    latency, wait = "kvroute_router_decision_latency_us", "kvroute_router_tokenize_wait_us"
    assert len(observed(latency)) == 256 and observed(wait) == []
    assert made["kvroute_router_decisions"].total(outcome="prefix_hit") == 700
    assert made["kvroute_router_sessions"].last() == 3
    # Decisions recorded while the slices drain go to the next flush, after these.
    metrics.record_decision("prefix_hit", 1.0, 100, 50)
    total = lambda: sum(len(observed(n)) for n in (latency, wait, "kvroute_router_predicted_hit_ratio"))  # noqa: E731
    calls, before = 0, total()
    while True:
        calls += 1
        more = metrics.observe_pending(256)
        assert total() - before <= 256
        before = total()
        if not more:
            break
    assert calls == 8  # 3 x 700 samples, 256 in the flush, 1,844 left: 8 slices of at most 256
    assert observed(latency) == pytest.approx([i for i in range(700)])
    assert observed(wait) == pytest.approx([i for i in range(700)])
    assert len(observed("kvroute_router_predicted_hit_ratio")) == 700
    assert metrics.observe_pending(256) is False
    assert metrics.flush(RouterSnapshot()) is False  # no limit: everything at once
    assert observed(latency)[-1] == pytest.approx(1e6)


def test_samples_a_slow_drain_leaves_pending_stay_bounded(recorder):
    made, factory = recorder
    metrics = RouterMetrics("p", factory)
    for _ in range(4):  # four flushes of full samples, never drained past one slice
        for _ in range(MAX_LATENCY_SAMPLES):
            metrics.record_decision("miss", 1e-5, 10, 0)
        metrics.flush(RouterSnapshot(), sample_limit=1)
    assert metrics._pending_count <= 3 * MAX_LATENCY_SAMPLES
    assert made["kvroute_router_latency_samples_dropped"].total() > 0
    assert made["kvroute_router_decisions"].total(outcome="miss") == 4 * MAX_LATENCY_SAMPLES


def _service_with_decisions(recorder, n: int):
    """A routing service over ``recorder``'s metrics with ``n`` decisions recorded, and
    its decision-latency histogram (which records each observe)."""
    from router.service import RoutingService

    made, factory = recorder
    service = RoutingService({"policy": "cache_aware"}, metrics_factory=factory)
    for _ in range(n):
        service.metrics.record_decision("miss", 1e-5)
    return service, made["kvroute_router_decision_latency_us"]


def test_the_services_periodic_flush_yields_the_loop_between_slices(recorder):
    """``RoutingService``'s periodic flush observes one slice, then the rest a slice per
    turn of the loop (other callbacks run in between), until none is left."""
    import asyncio

    from router.metrics import SAMPLES_PER_SLICE

    n = 3 * SAMPLES_PER_SLICE + 10
    service, latency = _service_with_decisions(recorder, n)

    async def flush_and_watch() -> list[int]:
        seen: list[int] = []
        loop = asyncio.get_running_loop()

        def watch() -> None:  # another callback of the loop, between the slices
            seen.append(len(latency.calls))
            if len(seen) < 10:
                loop.call_soon(watch)

        loop.call_soon(watch)
        service._flush_metrics_periodically()
        while len(seen) < 10:
            await asyncio.sleep(0)
        return seen

    try:
        seen = asyncio.run(flush_and_watch())
    finally:
        service.close()
    assert seen[0] == SAMPLES_PER_SLICE  # the flush itself: one slice
    assert sorted(seen) == seen and seen[-1] == n
    assert all(b - a <= SAMPLES_PER_SLICE for a, b in zip(seen, seen[1:]))
    assert len(set(seen)) >= 4  # the slices came one loop turn apart


def test_a_flush_while_slices_are_pending_starts_no_second_chain(recorder):
    """A periodic flush that finds the last one's samples still pending observes its own
    slice and leaves the running chain to drain the rest: still one slice per loop turn."""
    import asyncio

    from router.metrics import SAMPLES_PER_SLICE

    n = 8 * SAMPLES_PER_SLICE
    service, latency = _service_with_decisions(recorder, n)

    async def flush_twice_and_watch() -> list[int]:
        seen: list[int] = []
        loop = asyncio.get_running_loop()

        def watch() -> None:
            seen.append(len(latency.calls))
            if latency.calls and len(latency.calls) < n:
                loop.call_soon(watch)

        service._flush_metrics_periodically()  # one slice, a chain started
        service._flush_metrics_periodically()  # one more slice, no second chain
        loop.call_soon(watch)
        while len(latency.calls) < n:
            await asyncio.sleep(0)
        return seen

    try:
        seen = asyncio.run(flush_twice_and_watch())
    finally:
        service.close()
    assert seen[0] == 3 * SAMPLES_PER_SLICE  # the two flushes' slices, then the chain's first
    assert all(b - a <= SAMPLES_PER_SLICE for a, b in zip(seen, seen[1:])), seen
    assert len(latency.calls) == n

"""Peer policies: each one's documented behaviour, checked against its source algorithm.

Views are built by hand (``RoutingView`` with ``ReplicaLoad`` records and a seeded
``random.Random``); every expected pick below is worked out from the peer's published
algorithm and defaults (cited in each policy's docstring), not from running the code.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import policies.cache_aware  # noqa: F401
import policies.dynamo  # noqa: F401  (registers the policies under test)
import policies.least_load  # noqa: F401
import policies.llmd  # noqa: F401
import policies.pow2  # noqa: F401
import policies.preble  # noqa: F401
import policies.random_policy  # noqa: F401
import policies.ray_prefix  # noqa: F401
import policies.round_robin  # noqa: F401
import policies.session  # noqa: F401
import policies.sglang  # noqa: F401
import policies
from policies.base import RouteRequest, RoutingView, get, policy_class
from router.errors import ConfigError
from router.load import ReplicaLoad
from router.profile import DEFAULT_PROFILE

PEERS = ["round_robin", "random", "pow2", "least_load", "ray_prefix", "sglang", "dynamo",
         "llmd", "preble", "session"]
SEEDS = range(200)


# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------
def mkload(in_flight: int = 0, *, waiting: int = 0, waiting_prefill_tokens: int = 0,
           running: int = 0, kv_blocks: int = 0, context_tokens: int = 0,
           engine_waiting: int | None = None, engine_running: int | None = None,
           engine_kv_usage: float | None = None, report_time: float | None = None) -> ReplicaLoad:
    load = ReplicaLoad()
    load.in_flight = in_flight
    load.waiting = waiting
    load.waiting_prefill_tokens = waiting_prefill_tokens
    load.running = running
    load.kv_blocks = kv_blocks
    load.context_tokens = context_tokens
    load.engine_waiting = engine_waiting
    load.engine_running = engine_running
    load.engine_kv_usage = engine_kv_usage
    load.engine_report_time = report_time
    return load


def mkview(replicas, *, matched=None, loads=None, now: float = 0.0, seed: int = 0,
           cached=None, capacity=None, session_replica=None) -> RoutingView:
    matched = dict(matched or {})
    loads = dict(loads or {})
    cached = dict(cached or {})
    capacity = dict(capacity or {})
    return RoutingView(
        replicas=list(replicas),
        matched_blocks=matched,
        load={r: loads.get(r, mkload()) for r in replicas},
        now=now,
        rng=random.Random(seed),
        session_replica=session_replica,
        cached_blocks=lambda r: cached.get(r, 0),
        capacities=capacity, default_capacity=0,
    )


def mkreq(blocks: int, *, block_tokens: int = 16, prompt_tokens: int | None = None,
          session_id: str | None = None, output_tokens: int | None = None,
          keys=None) -> RouteRequest:
    if keys is None:
        keys = [1_000_003 * (i + 1) for i in range(blocks)]
    if prompt_tokens is None:
        prompt_tokens = blocks * block_tokens
    return RouteRequest(keys=keys, prompt_tokens=prompt_tokens, block_tokens=block_tokens,
                        session_id=session_id, output_tokens=output_tokens)


def first(tiers):
    return tiers[0][0]


def firsts(make_policy, request, make_view_for_seed, seeds=SEEDS) -> Counter:
    """How often each replica comes first over many rng seeds (fresh policy each time)."""
    out: Counter = Counter()
    for seed in seeds:
        out[first(make_policy().rank(request, make_view_for_seed(seed)))] += 1
    return out


def assert_valid(tiers, candidates) -> None:
    flat = [r for tier in tiers for r in tier]
    assert all(tier for tier in tiers), tiers
    assert len(flat) == len(set(flat)), tiers
    assert set(flat) <= set(candidates), (tiers, candidates)
    if candidates:
        assert tiers, "a non-empty candidate list must give at least one tier"
    else:
        assert tiers == []


# ---------------------------------------------------------------------------------------
# Registry, defaults, configuration
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PEERS)
def test_registered_and_empty_candidates(name):
    cls = policy_class(name)
    assert cls.name == name
    assert cls.__doc__ and "Source" in cls.__doc__
    assert get(name).rank(mkreq(3), mkview([])) == []


@pytest.mark.parametrize("name", PEERS)
def test_unknown_option_rejected(name):
    with pytest.raises(ConfigError) as err:
        get(name, no_such_option=1)
    assert err.value.field == f"{name}.no_such_option"


@pytest.mark.parametrize("name, defaults", [
    ("ray_prefix", {"imbalanced_threshold": math.inf, "match_rate_threshold": 0.1}),
    ("sglang", {"cache_threshold": 0.5, "balance_abs_threshold": 32, "balance_rel_threshold": 1.1}),
    ("dynamo", {"overlap_score_weight": 1.0, "router_temperature": 0.0}),
    ("llmd", {"prefix_weight": 2.0, "queue_weight": 1.0, "kv_cache_weight": 1.0}),
    ("preble", {"window_s": 180.0, "rebalance_threshold": 1.5, "rebalance_min_requests": 50,
                "enable_eviction": True, "default_output_tokens": 45,
                "profile": DEFAULT_PROFILE.name}),
    ("session", {"virtual_nodes": 100, "load_factor": 1.25}),
])
def test_source_defaults(name, defaults):
    config = get(name).config
    for field, value in defaults.items():
        assert getattr(config, field) == value, field


@pytest.mark.parametrize("name, field, bad", [
    ("ray_prefix", "match_rate_threshold", 1.5),
    ("ray_prefix", "match_rate_threshold", -0.1),
    ("ray_prefix", "imbalanced_threshold", -1.0),
    ("ray_prefix", "imbalanced_threshold", "high"),
    ("sglang", "cache_threshold", 1.01),
    ("sglang", "balance_abs_threshold", -1),
    ("sglang", "balance_abs_threshold", 2.5),
    ("sglang", "balance_rel_threshold", 0.99),
    ("sglang", "on_miss", "largest_tree"),
    ("dynamo", "overlap_score_weight", -0.5),
    ("dynamo", "router_temperature", -1.0),
    ("dynamo", "router_temperature", math.inf),
    ("llmd", "prefix_weight", -1.0),
    ("llmd", "queue_weight", math.inf),
    ("llmd", "kv_cache_weight", -2.0),
    ("preble", "window_s", 0.0),
    ("preble", "rebalance_threshold", 0.5),
    ("preble", "rebalance_min_requests", -1),
    ("preble", "default_output_tokens", 0),
    ("preble", "profile", "no-such-gpu"),
    ("preble", "max_history", 0),
    ("preble", "enable_eviction", 1),
    ("session", "virtual_nodes", 0),
    ("session", "load_factor", 0.9),
])
def test_bad_value_names_field(name, field, bad):
    with pytest.raises(ConfigError) as err:
        get(name, **{field: bad})
    assert err.value.field == f"{name}.{field}"


# ---------------------------------------------------------------------------------------
# Tier validity for arbitrary views (every policy)
# ---------------------------------------------------------------------------------------
@st.composite
def scenarios(draw):
    replicas = draw(st.lists(st.one_of(st.integers(0, 40), st.sampled_from(["a", "b", "c", "d"])),
                             max_size=7, unique=True))
    blocks = draw(st.integers(0, 12))
    block_tokens = draw(st.integers(1, 32))
    prompt = blocks * block_tokens + draw(st.integers(0, block_tokens - 1))
    session = draw(st.one_of(st.none(), st.text(max_size=6)))
    output = draw(st.one_of(st.none(), st.integers(1, 500)))
    now = draw(st.floats(0, 10_000, allow_nan=False))
    matched, loads, cached, capacity = {}, {}, {}, {}
    for r in replicas:
        matched[r] = draw(st.integers(0, blocks))
        fresh = draw(st.booleans())
        loads[r] = mkload(
            draw(st.integers(0, 80)), waiting=draw(st.integers(0, 40)),
            waiting_prefill_tokens=draw(st.integers(0, 5000)), running=draw(st.integers(0, 40)),
            kv_blocks=draw(st.integers(0, 3000)), context_tokens=draw(st.integers(0, 50_000)),
            engine_waiting=draw(st.one_of(st.none(), st.integers(0, 50))),
            engine_running=draw(st.one_of(st.none(), st.integers(0, 50))),
            engine_kv_usage=draw(st.one_of(st.none(), st.floats(0, 1))),
            report_time=(now if fresh else None))
        cached[r] = draw(st.integers(0, 3000))
        capacity[r] = draw(st.integers(0, 3000))
    request = mkreq(blocks, block_tokens=block_tokens, prompt_tokens=prompt, session_id=session,
                    output_tokens=output)
    seed = draw(st.integers(0, 2**32 - 1))
    return replicas, request, dict(matched=matched, loads=loads, cached=cached,
                                   capacity=capacity, now=now, seed=seed)


@pytest.mark.parametrize("name", policies.available())  # every registered policy, ours too
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=scenarios())
def test_tiers_valid_for_arbitrary_views(name, data):
    replicas, request, kwargs = data
    policy = get(name)
    for step in range(3):  # stateful policies: rank, observe, rank again later
        view = mkview(replicas, **{**kwargs, "now": kwargs["now"] + 100.0 * step})
        tiers = policy.rank(request, view)
        assert_valid(tiers, replicas)
        if tiers:
            policy.observe_routed(request, tiers[0][0], view.now)
    again = get(name).rank(request, mkview(replicas, **kwargs))
    assert again == get(name).rank(request, mkview(replicas, **kwargs)), "same seed, same tiers"


@pytest.mark.parametrize("name", policies.available())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=scenarios())
def test_rank_matched_is_rank_of_the_same_view(name, data):
    """The router calls ``rank_matched`` with the view's fields instead of building the
    view (cache_aware ranks from them directly): same tiers, same random draws, and the
    same state for the next decision."""
    replicas, request, kwargs = data
    by_view, by_fields = get(name), get(name)
    for step in range(3):
        args = {**kwargs, "now": kwargs["now"] + 100.0 * step}
        view = mkview(replicas, **args)
        fields = mkview(replicas, **args)
        tiers = by_view.rank(request, view)
        assert by_fields.rank_matched(request, fields.replicas, fields.matched_blocks, fields.load, fields.now,
                                      fields.rng, fields.session_replica, fields._cached_blocks, fields.capacities,
                                      fields.default_capacity) == tiers
        assert view.rng.getstate() == fields.rng.getstate()
        if tiers:
            by_view.observe_routed(request, tiers[0][0], view.now)
            by_fields.observe_routed(request, tiers[0][0], view.now)


def test_a_cache_aware_subclass_with_its_own_rank_is_ranked_through_it():
    class Reversed(policies.cache_aware.CacheAwarePolicy):
        def rank(self, request, view):
            return super().rank(request, view)[::-1]

    view = mkview(["a", "b", "c"], matched={"b": 3})
    expected = Reversed().rank(mkreq(4), mkview(["a", "b", "c"], matched={"b": 3}))
    assert Reversed().rank_matched(mkreq(4), view.replicas, view.matched_blocks, view.load, view.now, view.rng,
                                   None, view._cached_blocks, view.capacities, view.default_capacity) == expected
    assert expected[-1] == ["b"]


# ---------------------------------------------------------------------------------------
# round_robin, random, pow2, least_load
# ---------------------------------------------------------------------------------------
def test_round_robin_cycles_in_order_and_resets():
    policy = get("round_robin")
    view = mkview(["a", "b", "c"])
    tiers = [policy.rank(mkreq(1), view) for _ in range(6)]
    assert [first(t) for t in tiers] == ["a", "b", "c", "a", "b", "c"]
    assert tiers[1] == [["b"], ["c"], ["a"]]  # rotation: next in order after a full replica
    policy.replicas_changed(["a", "b", "c"])
    policy.rank(mkreq(1), view)
    assert first(policy.rank(mkreq(1), view)) == "b"  # counter restarted at 0


def test_random_first_pick_uniform_and_full_permutation():
    replicas = ["a", "b", "c"]
    counts = firsts(lambda: get("random"), mkreq(1), lambda s: mkview(replicas, seed=s), range(600))
    assert set(counts) == set(replicas)
    assert all(140 <= c <= 260 for c in counts.values()), counts
    tiers = get("random").rank(mkreq(1), mkview(replicas, seed=3))
    assert sorted(r for (r,) in tiers) == replicas


def test_pow2_one_tier_of_two_distinct():
    assert get("pow2").rank(mkreq(1), mkview(["solo"])) == [["solo"]]
    orders = {tuple(get("pow2").rank(mkreq(1), mkview(["a", "b"], seed=s))[0]) for s in SEEDS}
    assert orders == {("a", "b"), ("b", "a")}  # both, in random order
    pairs = set()
    for seed in range(600):
        tiers = get("pow2").rank(mkreq(1), mkview(["a", "b", "c", "d"], seed=seed))
        assert len(tiers) == 1 and len(tiers[0]) == 2 and tiers[0][0] != tiers[0][1]
        pairs.add(tuple(tiers[0]))
    assert len(pairs) == 12  # every ordered pair of distinct candidates occurs


def test_least_load_min_in_flight_random_ties():
    loads = {"a": mkload(3), "b": mkload(1), "c": mkload(1), "d": mkload(0)}
    tiers = get("least_load").rank(mkreq(1), mkview(list(loads), loads=loads))
    assert [r for (r,) in tiers][0] == "d"
    assert [loads[r].in_flight for (r,) in tiers] == [0, 1, 1, 3]
    loads["d"] = mkload(1)
    counts = firsts(lambda: get("least_load"), mkreq(1),
                    lambda s: mkview(list(loads), loads=loads, seed=s))
    assert set(counts) == {"b", "c", "d"}


# ---------------------------------------------------------------------------------------
# ray_prefix (Ray 2.60 PrefixCacheAffinityRouter)
# ---------------------------------------------------------------------------------------
RAY = ["a", "b", "c"]


def test_ray_match_rate_at_threshold_gives_all_deepest_holders():
    # 1 of 10 blocks = 0.1 >= 0.1: one tier with every holder of the deepest match
    view = mkview(RAY, matched={"a": 1, "b": 1, "c": 0}, cached={"a": 50, "b": 50, "c": 0})
    assert get("ray_prefix").rank(mkreq(10), view) == [["a", "b"]]


def test_ray_match_rate_below_threshold_gives_smallest_tenants():
    # 1 of 11 blocks = 0.0909 < 0.1: the candidates with the fewest cached blocks
    view = mkview(RAY, matched={"a": 1}, cached={"a": 5, "b": 3, "c": 3})
    assert get("ray_prefix").rank(mkreq(11), view) == [["b", "c"]]


def test_ray_deepest_match_only():
    view = mkview(RAY, matched={"a": 4, "b": 7, "c": 7}, cached={"a": 0, "b": 100, "c": 100})
    assert get("ray_prefix").rank(mkreq(10), view) == [["b", "c"]]


def test_ray_no_match_with_zero_threshold_gives_all_candidates():
    # Ray's prefix_match with no match returns every available tenant (they all own the root)
    view = mkview(RAY, cached={"a": 5, "b": 3, "c": 3})
    assert get("ray_prefix", match_rate_threshold=0.0).rank(mkreq(10), view) == [RAY]


def test_ray_empty_request_uses_smallest_tenants():
    view = mkview(RAY, cached={"a": 1, "b": 0, "c": 2})
    assert get("ray_prefix").rank(mkreq(0), view) == [["b"]]


def test_ray_imbalanced_falls_back_to_power_of_two():
    loads = {"a": mkload(0), "b": mkload(6), "c": mkload(3)}
    matched = {"a": 10}
    # 6 - 0 > 5: imbalanced -> one tier of two distinct random candidates
    seen = set()
    for seed in SEEDS:
        tiers = get("ray_prefix", imbalanced_threshold=5).rank(
            mkreq(10), mkview(RAY, matched=matched, loads=loads, seed=seed))
        assert len(tiers) == 1 and len(tiers[0]) == 2 and len(set(tiers[0])) == 2
        seen.update(tiers[0])
    assert seen == set(RAY)
    # 5 - 0 is not > 5: balanced -> the prefix holder
    loads["b"] = mkload(5)
    assert get("ray_prefix", imbalanced_threshold=5).rank(
        mkreq(10), mkview(RAY, matched=matched, loads=loads)) == [["a"]]


def test_ray_default_threshold_never_imbalanced():
    loads = {"a": mkload(10**6), "b": mkload(0), "c": mkload(0)}
    view = mkview(RAY, matched={"a": 10}, loads=loads)
    assert get("ray_prefix").rank(mkreq(10), view) == [["a"]]


def test_ray_queue_length_uses_fresh_engine_report():
    fresh = {"b": mkload(0, engine_waiting=10, engine_running=0, report_time=100.0)}
    view = mkview(RAY, matched={"a": 10}, loads=fresh, now=101.0)
    tiers = get("ray_prefix", imbalanced_threshold=5).rank(mkreq(10), view)
    assert len(tiers[0]) == 2  # queue 10 vs 0: imbalanced
    stale = {"b": mkload(0, engine_waiting=10, engine_running=0, report_time=0.0)}
    view = mkview(RAY, matched={"a": 10}, loads=stale, now=101.0)
    assert get("ray_prefix", imbalanced_threshold=5).rank(mkreq(10), view) == [["a"]]


# ---------------------------------------------------------------------------------------
# sglang (cache_aware)
# ---------------------------------------------------------------------------------------
SG = ["a", "b", "c"]
SG_CACHED = {"a": 10, "b": 2, "c": 5}


def test_sglang_match_above_threshold_goes_to_holder():
    view = mkview(SG, matched={"a": 6}, cached=SG_CACHED)
    assert first(get("sglang").rank(mkreq(10), view)) == "a"  # 0.6 > 0.5


def test_sglang_match_at_threshold_goes_to_smallest_tree():
    view = mkview(SG, matched={"a": 5}, cached=SG_CACHED)
    assert first(get("sglang").rank(mkreq(10), view)) == "b"  # 0.5 is not > 0.5


def test_sglang_on_miss_least_load_as_smg_does():
    """smg (and sgl-model-gateway) send a miss to the least loaded worker, not the smallest
    tree: the smallest tree ``b`` is the busiest here."""
    view = mkview(SG, matched={"a": 5}, cached=SG_CACHED, loads={"a": mkload(in_flight=3), "b": mkload(in_flight=5), "c": mkload(in_flight=1)})
    assert first(get("sglang", on_miss="least_load").rank(mkreq(10), view)) == "c"
    assert first(get("sglang").rank(mkreq(10), view)) == "b"


def test_sglang_several_holders_random_never_others():
    counts = firsts(lambda: get("sglang"), mkreq(10),
                    lambda s: mkview(SG, matched={"a": 8, "b": 8, "c": 3}, cached=SG_CACHED, seed=s))
    assert set(counts) == {"a", "b"}


def test_sglang_smallest_tree_ties_random():
    counts = firsts(lambda: get("sglang"), mkreq(10),
                    lambda s: mkview(SG, cached={"a": 9, "b": 4, "c": 4}, seed=s))
    assert set(counts) == {"b", "c"}


@pytest.mark.parametrize("load_a, load_b, imbalanced", [
    (32, 0, False),   # 32 - 0 is not > 32
    (33, 0, True),    # 33 > 32 and 33 > 1.1 * 0
    (440, 400, False),  # 40 > 32 but 440 is not > 1.1 * 400
    (441, 400, True),
])
def test_sglang_imbalance_needs_both_thresholds(load_a, load_b, imbalanced):
    # a holds the whole prompt; c is as loaded as a so b is the unique least loaded
    loads = {"a": mkload(load_a), "b": mkload(load_b), "c": mkload(load_a)}
    view = mkview(SG, matched={"a": 10}, loads=loads, cached=SG_CACHED)
    assert first(get("sglang").rank(mkreq(10), view)) == ("b" if imbalanced else "a")


def test_sglang_load_is_router_in_flight_not_engine_queue():
    loads = {"b": mkload(0, engine_waiting=1000, engine_running=0, report_time=0.0)}
    view = mkview(SG, matched={"a": 10}, loads=loads, now=0.0)
    assert first(get("sglang").rank(mkreq(10), view)) == "a"


def test_sglang_fallbacks_in_load_order():
    loads = {"a": mkload(5), "b": mkload(9), "c": mkload(1)}
    tiers = get("sglang").rank(mkreq(10), mkview(SG, matched={"b": 10}, loads=loads))
    assert tiers == [["b"], ["c"], ["a"]]


# ---------------------------------------------------------------------------------------
# dynamo (KV router)
# ---------------------------------------------------------------------------------------
def test_dynamo_argmin_of_prefill_plus_decode():
    # B = 16 tokens, 10 blocks. a: 8 cached, 20 active blocks -> 1*(32/16) + 20 (+10 new)
    # b: nothing cached, idle -> 1*(160/16) + 0 (+10 new). b is cheaper.
    loads = {"a": mkload(1, kv_blocks=20), "b": mkload(0)}
    view = mkview(["a", "b"], matched={"a": 8}, loads=loads)
    assert get("dynamo").rank(mkreq(10), view) == [["b"], ["a"]]
    # weight 3: a = 6 + 20, b = 30 + 0: a is cheaper
    assert first(get("dynamo", overlap_score_weight=3.0).rank(mkreq(10), view)) == "a"


def test_dynamo_counts_queued_prefill_tokens():
    loads = {"a": mkload(1, waiting=1, waiting_prefill_tokens=32), "b": mkload(0)}
    view = mkview(["a", "b"], loads=loads, cached={"a": 0, "b": 50})
    assert first(get("dynamo").rank(mkreq(10), view)) == "b"


def test_dynamo_ties_broken_by_smaller_tree_then_random():
    view = lambda s: mkview(["a", "b", "c"], cached={"a": 10, "b": 5, "c": 7}, seed=s)
    assert set(firsts(lambda: get("dynamo"), mkreq(4), view)) == {"b"}
    view = lambda s: mkview(["a", "b", "c"], cached={"a": 5, "b": 5, "c": 7}, seed=s)
    assert set(firsts(lambda: get("dynamo"), mkreq(4), view)) == {"a", "b"}


def test_dynamo_fallbacks_by_cost():
    loads = {"a": mkload(kv_blocks=30), "b": mkload(kv_blocks=10), "c": mkload(kv_blocks=20)}
    assert get("dynamo").rank(mkreq(4), mkview(["a", "b", "c"], loads=loads)) == [["b"], ["c"], ["a"]]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_dynamo_softmax_sampling(temperature):
    # a: cost 0 + 10, b: cost 10 + 10. p(a)/p(b) = exp(1 / T) after min-max normalisation.
    view = lambda s: mkview(["a", "b"], matched={"a": 10}, seed=s)
    n = 3000
    counts = firsts(lambda: get("dynamo", router_temperature=temperature), mkreq(10), view, range(n))
    expected = 1.0 / (1.0 + math.exp(-1.0 / temperature))
    assert abs(counts["a"] / n - expected) < 0.035, (counts, expected)


def test_dynamo_softmax_uniform_when_costs_equal():
    n = 2000
    counts = firsts(lambda: get("dynamo", router_temperature=2.0), mkreq(10),
                    lambda s: mkview(["a", "b"], seed=s), range(n))
    assert abs(counts["a"] / n - 0.5) < 0.04


# ---------------------------------------------------------------------------------------
# llmd (weighted scorers, max score)
# ---------------------------------------------------------------------------------------
def test_llmd_weighted_sum_prefers_prefix_at_weight_two():
    loads = {"a": mkload(10, kv_blocks=50), "b": mkload(0)}
    cap = {"a": 100, "b": 100}
    # a: 2*1 + 1*0 + 1*0.5 = 2.5 ; b: 0 + 1*1 + 1*1 = 2
    view = mkview(["a", "b"], matched={"a": 4}, loads=loads, capacity=cap)
    assert get("llmd").rank(mkreq(4), view) == [["a"], ["b"]]
    # half the prefix: a = 1 + 0 + 0.5 = 1.5 < 2
    view = mkview(["a", "b"], matched={"a": 2}, loads=loads, capacity=cap)
    assert first(get("llmd").rank(mkreq(4), view)) == "b"
    # weights are options: prefix weight 0 -> a = 0.5, b = 2
    view = mkview(["a", "b"], matched={"a": 4}, loads=loads, capacity=cap)
    assert first(get("llmd", prefix_weight=0.0).rank(mkreq(4), view)) == "b"


def test_llmd_equal_queues_score_neutral():
    loads = {"a": mkload(5, kv_blocks=20), "b": mkload(5, kv_blocks=40)}
    view = mkview(["a", "b"], loads=loads, capacity={"a": 100, "b": 100})
    assert first(get("llmd").rank(mkreq(4), view)) == "a"  # 0+1+0.8 vs 0+1+0.6


def test_llmd_queue_from_fresh_engine_report():
    loads = {"b": mkload(0, engine_waiting=5, engine_running=0, report_time=10.0)}
    view = mkview(["a", "b"], loads=loads, now=10.0)
    assert first(get("llmd").rank(mkreq(4), view)) == "a"  # queue 0 vs 5


def test_llmd_ties_random():
    counts = firsts(lambda: get("llmd"), mkreq(4), lambda s: mkview(["a", "b", "c"], seed=s))
    assert set(counts) == {"a", "b", "c"}


# ---------------------------------------------------------------------------------------
# preble (E2)
# ---------------------------------------------------------------------------------------
def heavy(n: int) -> ReplicaLoad:
    """n decoding requests of 100 context tokens each."""
    return mkload(n, running=n, context_tokens=100 * n)


def test_preble_exploit_when_match_longer_than_rest():
    # 100-token prompt (10 blocks of 10). a holds 6 blocks: 60 > 40 -> exploit a even though
    # a is busy decoding and idle b would cost less.
    view = mkview(["a", "b"], matched={"a": 6}, loads={"a": heavy(4)})
    assert first(get("preble").rank(mkreq(10, block_tokens=10), view)) == "a"


def test_preble_explore_when_match_not_longer():
    # 50 cached vs 50 remaining is not "longer": explore by cost; a's decode load dominates
    view = mkview(["a", "b"], matched={"a": 5}, loads={"a": heavy(4)})
    assert first(get("preble").rank(mkreq(10, block_tokens=10), view)) == "b"


def test_preble_exploit_least_loaded_holder():
    view = mkview(["a", "b", "c"], matched={"a": 8, "c": 8}, loads={"a": heavy(4), "c": heavy(1)})
    assert first(get("preble").rank(mkreq(10, block_tokens=10), view)) == "c"


def test_preble_rebalance_only_after_min_requests():
    view = mkview(["a", "b"], matched={"a": 6}, loads={"a": heavy(4)})
    request = mkreq(10, block_tokens=10)
    policy = get("preble", rebalance_min_requests=3)
    other = mkreq(1, block_tokens=10, keys=[7])
    for _ in range(2):
        policy.observe_routed(other, "c", 0.0)  # history on a third replica: a and b untouched
    assert first(policy.rank(request, view)) == "a"  # 2 routed < 3
    policy.observe_routed(other, "c", 0.0)
    assert first(policy.rank(request, view)) == "b"  # a's load >= 1.5 * b's (zero)


@pytest.mark.parametrize("b_decoding, moved", [(3, False), (2, True)])
def test_preble_rebalance_threshold(b_decoding, moved):
    # decode load = n * 45 tokens * step_s(0, n, 100 n): a (n=4) vs b (n=3: ratio 1.34 < 1.5;
    # n=2: ratio 2.02 >= 1.5)
    p = DEFAULT_PROFILE
    load = {n: n * 45 * p.step_s(0, n, 100 * n) for n in (2, 3, 4)}
    assert (load[4] >= 1.5 * load[b_decoding]) == moved
    view = mkview(["a", "b"], matched={"a": 6}, loads={"a": heavy(4), "b": heavy(b_decoding)})
    pick = first(get("preble", rebalance_min_requests=0).rank(mkreq(10, block_tokens=10), view))
    assert pick == ("b" if moved else "a")


def test_preble_windowed_prefill_history_expires():
    policy = get("preble")
    request = mkreq(10, block_tokens=10)  # 100 tokens
    burst = mkreq(10, block_tokens=10, keys=[9] * 10)
    for _ in range(5):
        policy.observe_routed(burst, "a", 0.0)  # 500 uncached tokens on a at t=0
    assert policy.windowed_prefill_tokens("a") == 500
    # explore: a costs (500 + 90) tokens of prefill, b 100
    at = lambda t: mkview(["a", "b"], matched={"a": 1}, now=t)
    assert first(policy.rank(request, at(10.0))) == "b"
    assert first(policy.rank(request, at(180.0))) == "b"  # t=0 is not older than 180-180
    assert first(policy.rank(request, at(180.5))) == "a"  # expired: 90 < 100
    assert policy.history_len == 0


def test_preble_history_records_uncached_tokens_and_is_bounded():
    policy = get("preble", max_history=10)
    request = mkreq(10, block_tokens=10)
    view = mkview(["a", "b"], matched={"a": 6})
    assert first(policy.rank(request, view)) == "a"
    policy.observe_routed(request, "a", 0.0, matched_blocks=6)  # 100 tokens, 60 cached
    assert policy.windowed_prefill_tokens("a") == 40
    for i in range(25):
        policy.observe_routed(request, "b", 1.0 + i)
    assert policy.history_len == 10
    assert policy.windowed_prefill_tokens("a") == 0  # pushed out by the bound


def test_preble_eviction_cost():
    # both idle, no match: a's cache is nearly full (95 of 100 blocks), so 10 new blocks
    # evict 5 that must be prefilled again; b has room.
    kwargs = dict(cached={"a": 95, "b": 0}, capacity={"a": 100, "b": 100})
    request = mkreq(10, block_tokens=10)
    counts = firsts(lambda: get("preble"), request, lambda s: mkview(["a", "b"], seed=s, **kwargs))
    assert set(counts) == {"b"}
    counts = firsts(lambda: get("preble", enable_eviction=False), request,
                    lambda s: mkview(["a", "b"], seed=s, **kwargs))
    assert set(counts) == {"a", "b"}  # without the eviction term they tie


# ---------------------------------------------------------------------------------------
# session (consistent hashing, bounded loads)
# ---------------------------------------------------------------------------------------
FIVE = ["r0", "r1", "r2", "r3", "r4"]


def home(policy, session_id, replicas=FIVE, loads=None, seed=0):
    view = mkview(replicas, loads=loads, seed=seed)
    return first(policy.rank(mkreq(2, session_id=session_id), view))


def test_session_sticky_and_independent_of_rng():
    policy = get("session")
    picks = {home(policy, "user-42", seed=s) for s in range(20)}
    assert len(picks) == 1
    assert home(get("session"), "user-42") in picks  # a fresh instance agrees (stable hash)


def test_session_consistent_when_a_replica_leaves():
    policy = get("session")
    before = {f"s{i}": home(policy, f"s{i}") for i in range(300)}
    assert len(set(before.values())) == 5
    remaining = [r for r in FIVE if r != "r2"]
    for sid, replica in before.items():
        after = home(policy, sid, remaining)
        if replica != "r2":
            assert after == replica, sid


def test_session_spread_over_replicas():
    policy = get("session")
    counts = Counter(home(policy, f"sess-{i}", FIVE[:4]) for i in range(2000))
    assert all(300 <= c <= 700 for c in counts.values()), counts


def test_session_bounded_load_moves_off_full_home():
    policy = get("session")
    target = home(policy, "s-1", ["a", "b"])
    other = "b" if target == "a" else "a"
    # total 1: capacity = ceil(1.25 * 2 / 2) = 2 -> home (1) still has room
    loads = {target: mkload(1)}
    assert home(policy, "s-1", ["a", "b"], loads) == target
    # total 2: capacity = ceil(1.25 * 3 / 2) = 2 -> home (2) is full
    loads = {target: mkload(2)}
    assert home(policy, "s-1", ["a", "b"], loads) == other


def test_session_bounded_load_next_on_ring_is_under_capacity():
    policy = get("session")
    target = home(policy, "s-9")
    loads = {target: mkload(5), FIVE[0] if target != FIVE[0] else FIVE[1]: mkload(2)}
    cap = math.ceil(1.25 * (sum(l.in_flight for l in loads.values()) + 1) / 5)  # = 2
    tiers = policy.rank(mkreq(2, session_id="s-9"), mkview(FIVE, loads=loads))
    pick = first(tiers)
    assert pick != target and loads.get(pick, mkload()).in_flight < cap
    assert sorted(r for (r,) in tiers) == FIVE


def test_session_without_id_hashes_first_block():
    policy = get("session")
    a = mkreq(3, keys=[11, 12, 13])
    b = mkreq(2, keys=[11, 99])
    picks = {first(policy.rank(r, mkview(FIVE, seed=s))) for r in (a, b) for s in range(5)}
    assert len(picks) == 1
    spread = {first(policy.rank(mkreq(1, keys=[k]), mkview(FIVE))) for k in range(200)}
    assert len(spread) == 5


def test_session_without_id_or_keys_least_loaded():
    loads = {"r0": mkload(4), "r1": mkload(0), "r2": mkload(2), "r3": mkload(1), "r4": mkload(3)}
    tiers = get("session").rank(mkreq(0), mkview(FIVE, loads=loads))
    assert [r for (r,) in tiers] == ["r1", "r3", "r2", "r4", "r0"]


def test_session_ring_rebuilt_only_when_candidates_change():
    policy = get("session")
    for i in range(20):
        home(policy, f"s{i}")
    assert policy.ring_builds == 1
    home(policy, "s0", FIVE[:3])
    assert policy.ring_builds == 2
    home(policy, "s1", FIVE)
    assert policy.ring_builds == 2  # cached

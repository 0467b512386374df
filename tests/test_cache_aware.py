"""cache_aware: the cost model's documented behaviour, scenario by scenario.

Expected picks follow from the formulas in policies/cache_aware.py's docstring and the
profile's constants, computed here independently where a number is needed.
"""

from __future__ import annotations

import pytest

import policies
from router.errors import ConfigError
from router.profile import DEFAULT_PROFILE as P
from tests.helpers import load, request, view


def rank(v, req, **config):
    return [tier[0] for tier in policies.get("cache_aware", **config).rank(req, v)]


def test_prefers_the_replica_holding_the_prefix_when_idle():
    req = request(100)
    v = view(["a", "b", "c"], matched={"b": 80})
    assert rank(v, req)[0] == "b"


def test_every_candidate_is_ranked_once_as_its_own_tier():
    req = request(10)
    v = view(["a", "b", "c", "d"], matched={"c": 5})
    tiers = policies.get("cache_aware").rank(req, v)
    assert all(len(t) == 1 for t in tiers)
    assert sorted(t[0] for t in tiers) == ["a", "b", "c", "d"]


def test_queued_work_outweighs_a_small_cache_saving():
    # b holds 10 blocks (160 tokens) but has 20,000 uncached tokens waiting: at ~3.2e-5 s
    # per token that queue costs ~0.64 s, far more than prefilling 160 tokens (~5 ms) on a.
    req = request(100)
    v = view(["a", "b"], matched={"b": 10}, loads={"b": load(waiting=4, in_flight=4, waiting_prefill_tokens=20_000)})
    assert rank(v, req)[0] == "a"


def test_a_large_cache_saving_outweighs_a_small_queue():
    # b holds 1,000 of 1,000 blocks (16,000 tokens, ~0.5 s of prefill) and has 500 tokens
    # queued (~16 ms): b wins.
    req = request(1000)
    v = view(["a", "b"], matched={"b": 1000}, loads={"b": load(waiting=1, in_flight=1, waiting_prefill_tokens=500)})
    assert rank(v, req)[0] == "b"


def test_cost_is_seconds_to_first_token_from_the_profile():
    req = request(50)  # 800 prompt tokens, nothing cached, idle replica
    policy = policies.get("cache_aware", kv_barrier_s=0.0)
    cost = policy.costs(req, view(["a"]))["a"]
    step = P.step_overhead_s
    ttft = 800 * (P.prefill_s_per_token + step / P.max_batched_tokens) + step
    ttft += P.prefill_attention_s_per_pair * 800 * 800 / 2  # every token attends to those before it
    work = 2.0 * 800 * P.prefill_s_per_token  # the default work_weight times the prefill compute
    assert cost == pytest.approx(ttft + work)
    # Without the work term the cost is the TTFT estimate alone.
    assert policies.get("cache_aware", kv_barrier_s=0.0, work_weight=0.0).costs(req, view(["a"]))["a"] == pytest.approx(ttft)


def test_work_weight_keeps_a_long_prompt_on_its_cache_holder_behind_a_short_queue():
    # b holds 500 of 600 blocks (8,000 of 9,600 tokens) behind 12,000 queued tokens; a is
    # idle. TTFT alone: a ~0.31 s + attention ~0.05 s vs b ~0.44 s -> a (the copy). Counting
    # the 8,000 tokens a would recompute twice more (~0.51 s) keeps it on b.
    req = request(600)
    v = view(["a", "b"], matched={"b": 500}, loads={"b": load(waiting=2, in_flight=2, waiting_prefill_tokens=12_000)})
    assert rank(v, req, work_weight=0.0)[0] == "a"
    assert rank(v, req)[0] == "b"


def test_kv_barrier_steers_away_from_a_nearly_full_replica():
    # a holds the whole prefix but this router's requests in flight there add 970 of its
    # 1,000 KV blocks (their uncached prompts and outputs).
    req = request(100)
    # (b carries as many requests, so neither is over its fair share: only KV differs.)
    loads = {"a": load(kv_blocks=1200, kv_added_blocks=970, running=3, in_flight=3),
             "b": load(running=3, in_flight=3)}
    v = view(["a", "b"], matched={"a": 100}, loads=loads, capacity={"a": 1000, "b": 1000})
    assert rank(v, req)[0] == "b"
    # Without the barrier the cached prefix wins.
    assert rank(v, req, kv_barrier_s=0.0)[0] == "a"


def test_barrier_rises_steeply_with_usage():
    policy = policies.get("cache_aware")
    req = request(1)
    costs = []
    for used in (500, 850, 900, 950, 990):
        v = view(["a"], loads={"a": load(kv_blocks=used, kv_added_blocks=used)}, capacity={"a": 1000})
        costs.append(policy.costs(req, v)["a"])
    assert costs[0] < costs[1] < costs[2] < costs[3] < costs[4]
    assert costs[4] - costs[3] > 5 * (costs[2] - costs[1])  # convex, not linear


def test_barrier_counts_what_in_flight_requests_add_not_their_whole_prompts():
    # 40 requests in flight on a share one 3,600-token system prompt that a holds once:
    # in whole prompts + outputs they are 230 blocks each (9,200 of a's 10,000), but each
    # adds only its 16-token question and 64 output tokens (5 blocks: 200 in all).
    req = request(226, output_tokens=64)  # the same system prompt + one question block
    b = load(running=40, in_flight=40)
    added = load(kv_blocks=40 * 230, kv_added_blocks=40 * 5, running=40, in_flight=40)
    v = view(["a", "b"], matched={"a": 225}, loads={"a": added, "b": b}, capacity={"a": 10_000, "b": 10_000})
    policy = policies.get("cache_aware", bound_floor=64)
    bare = policies.get("cache_aware", kv_barrier_s=0.0, bound_floor=64)
    assert policy.costs(req, v)["a"] == pytest.approx(bare.costs(req, v)["a"])  # 2% used: no barrier
    assert rank(v, req, bound_floor=64)[0] == "a"
    # Counted whole, the shared prompt would fill a to 92% and push the request off its
    # cached prefix onto b, to prefill all 3,616 tokens there.
    whole = load(kv_blocks=40 * 230, kv_added_blocks=40 * 230, running=40, in_flight=40)
    v = view(["a", "b"], matched={"a": 225}, loads={"a": whole, "b": b}, capacity={"a": 10_000, "b": 10_000})
    assert rank(v, req, bound_floor=64)[0] == "b"


def test_barrier_ignores_the_engines_kv_usage_report():
    """The engine's KV usage report is one number every router gets at once and keeps for
    a report interval: a steep cost on it would make every router avoid (or crowd) the
    same replica together. The barrier counts this router's own in-flight KV only; the
    report's waiting/running counts still enter the queue term."""
    req = request(100)
    policy = policies.get("cache_aware")
    reported_full = load(engine_kv_usage=0.99, engine_report_time=0.0)
    v = view(["a", "b"], matched={"a": 100}, loads={"a": reported_full}, capacity={"a": 1000, "b": 1000})
    assert policy.costs(req, v) == policies.get("cache_aware", kv_barrier_s=0.0).costs(req, v)
    assert rank(v, req)[0] == "a"


def test_engine_report_counts_only_while_fresh():
    req = request(100)
    busy = load(engine_waiting=50, engine_running=10, engine_report_time=0.0)
    assert rank(view(["a", "b"], matched={"a": 20}, loads={"a": busy}, now=1.0), req)[0] == "b"
    # 60 s later the report is stale (default TTL 5 s): only this router's (empty) count is used.
    assert rank(view(["a", "b"], matched={"a": 20}, loads={"a": busy}, now=60.0), req)[0] == "a"


def test_over_bound_holder_spills_to_the_next_best():
    # 4 replicas, 40 in flight, all on a: bound = max(16, ceil(1.25 * 41 / 4) = 13) = 16.
    req = request(100)
    loads = {"a": load(in_flight=40, running=40)}
    v = view(["a", "b", "c", "d"], matched={"a": 100, "c": 40}, loads=loads)
    order = rank(v, req)
    assert order[0] == "c" and order[-1] == "a"


def test_the_bound_does_not_fire_below_its_floor():
    # 12 in flight on a: over the bare bounded-load rule (ceil(1.25 * 13 / 4) = 5) but
    # under the floor of 16, so the cheaper holder keeps the request.
    req = request(100)
    v = view(["a", "b", "c", "d"], matched={"a": 100, "c": 40}, loads={"a": load(in_flight=12, running=12)})
    assert rank(v, req)[0] == "a"
    assert rank(v, req, bound_floor=1)[0] == "c"


def test_session_replica_goes_first_within_slack_and_not_beyond():
    req = request(10)  # 160 tokens: the session costs ~5 ms more than a cached replica
    v = view(["a", "b"], matched={"a": 10}, session_replica="b")
    assert rank(v, req)[0] == "b"
    # With a 20,000-token queue on b (~0.64 s) the session is not worth it. (One request
    # in flight keeps b within its fair share, so only the slack decides.)
    v = view(["a", "b"], matched={"a": 10}, session_replica="b",
             loads={"b": load(waiting=1, in_flight=1, waiting_prefill_tokens=20_000)})
    assert rank(v, req)[0] == "a"
    assert rank(v, req, session_slack_s=10.0)[0] == "b"


def test_churn_sends_new_work_where_the_cache_turned_over_least():
    """Two idle replicas hold the same shared prefix; a's cache took 2,000 new blocks
    (twice its capacity) within the last instant, b's none. A new conversation's uncached
    tokens cost churn_weight (0.5) * prefill_s_per_token * uncached * churn / capacity more
    on a: written there, they push out prefixes used moments ago."""
    req = request(40)  # 640 tokens, the first 10 blocks shared
    churned = load(churn_blocks=2000.0, churn_at=5.0)
    v = view(["a", "b"], matched={"a": 10, "b": 10}, loads={"a": churned}, capacity={"a": 1000, "b": 1000}, now=5.0)
    costs = policies.get("cache_aware").costs(req, v)
    assert costs["a"] - costs["b"] == pytest.approx(0.5 * P.prefill_s_per_token * 480 * 2.0)
    assert rank(v, req)[0] == "b"
    assert policies.get("cache_aware", churn_weight=0.0).costs(req, v)["a"] == pytest.approx(costs["b"])
    # The churn fades with half-life CHURN_HALF_LIFE_S (60 s): two minutes later, a quarter.
    later = view(["a", "b"], matched={"a": 10, "b": 10}, loads={"a": churned}, capacity={"a": 1000, "b": 1000},
                 now=125.0)
    costs = policies.get("cache_aware").costs(req, later)
    assert costs["a"] - costs["b"] == pytest.approx(0.5 * P.prefill_s_per_token * 480 * 0.5)


def test_churn_does_not_pull_a_conversation_off_its_cached_history():
    # a holds 95 of the request's 100 blocks but turned over three times recently; only
    # the 80 uncached tokens pay the churn term there, against 1,600 to recompute on b.
    req = request(100)
    v = view(["a", "b"], matched={"a": 95}, loads={"a": load(churn_blocks=3000.0, churn_at=0.0)},
             capacity={"a": 1000, "b": 1000})
    assert rank(v, req)[0] == "a"


def test_a_slower_replica_takes_proportionally_longer_to_the_first_token():
    """Its time to first token is divided by its speed; the copy-work term (what a copy
    does to the cache, not how long this request takes) and the KV barrier are not."""
    req = request(100)
    loads = {"slow": load(speed=0.5, running=2, in_flight=2), "fast": load(running=2, in_flight=2)}
    v = view(["slow", "fast"], loads=loads)
    costs = policies.get("cache_aware").costs(req, v)
    copy_work = 2.0 * 1600 * P.prefill_s_per_token  # work_weight * uncached * prefill_s_per_token
    assert costs["slow"] - copy_work == pytest.approx(2 * (costs["fast"] - copy_work))
    assert rank(v, req)[0] == "fast"
    # The KV barrier counts blocks, not seconds: the same on either.
    full = {"slow": load(speed=0.5, kv_blocks=990, kv_added_blocks=990), "fast": load(kv_blocks=990, kv_added_blocks=990)}
    v = view(["slow", "fast"], loads=full, capacity={"slow": 1000, "fast": 1000})
    bare = policies.get("cache_aware", kv_barrier_s=0.0).costs(req, v)
    barred = policies.get("cache_aware").costs(req, v)
    assert barred["slow"] - bare["slow"] == pytest.approx(barred["fast"] - bare["fast"])


def test_a_slow_replica_holding_a_long_prefix_still_beats_recomputing_it():
    # 1,600 cached tokens on a half-speed replica against a cold full-speed one.
    req = request(100)
    v = view(["slow", "fast"], matched={"slow": 100}, loads={"slow": load(speed=0.5)})
    assert rank(v, req)[0] == "slow"


def test_ties_are_broken_at_random():
    req = request(10)
    firsts = {rank(view(["a", "b", "c"], seed=seed), req)[0] for seed in range(60)}
    assert firsts == {"a", "b", "c"}


@pytest.mark.parametrize("option, value", [("load_factor", 0.5), ("kv_soft_limit", 1.0),
                                           ("kv_barrier_s", -1.0), ("session_slack_s", -0.1),
                                           ("profile", "no-such-gpu"), ("load_factor", "high"),
                                           ("work_weight", -1.0), ("bound_floor", 0),
                                           ("churn_weight", -0.5)])
def test_bad_config_names_the_field(option, value):
    with pytest.raises(ConfigError) as exc:
        policies.get("cache_aware", **{option: value})
    assert option in exc.value.field

"""cache_aware's churn term, end to end: the core counts what each routed request writes
into its replica's cache, and on a small-cache chat fleet at low load (where the queue
terms are zero and only the shared prefix differs) the term spreads new conversations
instead of piling them onto the replica that holds the shared prefix.

The cost formula itself is tested in tests/test_cache_aware.py; the decay against a
reference model in tests/test_sessions_load.py (LoadMachine)."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.live_bench import LiveConfig, load_requests
from benchmarks.live_workload import LiveShape
from engines.routers import profile_options
from router.core import RoutingCore
from router.load import CHURN_HALF_LIFE_S
from router.profile import get_profile
from simulator.cluster import ClusterConfig
from simulator.run import run_policy
from tests.helpers import request


@pytest.mark.parametrize("route", [True, False])
def test_the_core_counts_the_blocks_a_routed_request_writes(route):
    core = RoutingCore.from_options("cache_aware", kv_capacity_tokens=16 * 1000)
    core.on_replicas_changed(["a", "b"], now=0.0)
    first = request(10, output_tokens=40, request_id=1)  # 10 blocks + 40 output tokens: 13 blocks
    if route:
        replica = core.route(first, now=0.0).replica
    else:
        replica = "a"
        core.on_routed(first, "a", now=0.0)
    assert core.load.loads[replica].churn(0.0) == 13.0
    # The same prompt again, one half-life later: its 10 blocks are cached there, only the
    # 40 output tokens (3 blocks) are new.
    again = request(10, output_tokens=40, request_id=2)
    core.on_routed(again, replica, now=CHURN_HALF_LIFE_S)
    assert core.load.loads[replica].churn(CHURN_HALF_LIFE_S) == pytest.approx(13.0 / 2 + 3)


def league(churn_weight: float, workload: str = "chat", seeds=range(4)) -> tuple[float, float]:
    """Mean hit rate and max replica share of cache_aware on ``kvroute bench peers``'s
    geometry (3 replicas of 96 blocks of 32 tokens, the tiny model's CPU profile, 200
    requests of ``workload`` per seed; docs/simulator.md's churn table is this with seeds
    0-5)."""
    live = LiveConfig(replicas=3, kv_blocks=96)
    config = ClusterConfig(replicas=3, block_size=live.block_size, kv_blocks=96, profile=get_profile("tiny-llama-cpu"),
                           max_num_seqs=live.max_num_seqs, max_num_batched_tokens=live.max_num_batched_tokens,
                           host_slots=2.0)
    options = {**profile_options("cache_aware", "tiny-llama-cpu"), "churn_weight": churn_weight}
    hits, shares = [], []
    for seed in seeds:
        requests = load_requests(workload=workload, trace=None, count=200, rate=8.0, rate_scale=1.0, seed=seed,
                                 shape=LiveShape())
        row = run_policy(requests, dataclasses.replace(config, seed=seed), "cache_aware", options)[0]
        hits.append(row["hit_rate"])
        shares.append(row["max_replica_share"])
    return sum(hits) / len(hits), sum(shares) / len(shares)


def test_churn_spreads_new_conversations_on_a_small_cache_fleet():
    hit, share = league(0.5)  # the default
    bare_hit, bare_share = league(0.0)
    assert bare_share > 0.6  # without it, one replica takes most conversations
    assert share < bare_share - 0.05  # (0.60 against 0.68 when written)
    assert hit > bare_hit + 0.01  # (+1.6 points when written)


"""``kvroute bench peers``: its parts that need no engines (the run itself is
tests/live/test_peers_bench_live.py)."""

from __future__ import annotations

import pytest

from benchmarks.peers import PEERS, peer
from benchmarks.peers_bench import DEFAULT_ROUTERS, format_table, validate_routers
from router.errors import ConfigError


def test_router_names_are_checked_before_anything_starts():
    assert validate_routers(["kvroute:cache_aware", "smg", "ray:CacheAwareRouter"]) == \
        ["kvroute:cache_aware", "smg", "ray:CacheAwareRouter"]
    for bad, words in [(["kvroute:nope"], "unknown kvroute policy"), (["nginx"], "unknown router"),
                       (["smg", "smg"], "twice")]:
        with pytest.raises(ConfigError, match=words):
            validate_routers(bad)
    assert set(DEFAULT_ROUTERS) >= {"kvroute:cache_aware", "smg", "vllm-router", "sglang-router",
                                    "ray:PrefixCacheAffinityRouter", "ray:KVAwareRouter"}


def test_peers_are_pinned_and_launched_with_their_cache_aware_policy():
    assert {p.requirement for p in PEERS.values()} == {"smg==1.13.0", "vllm-router==0.1.17", "sglang-router==0.3.2"}
    command = peer("smg").command(workers=["http://127.0.0.1:1", "http://127.0.0.1:2"], host="127.0.0.1",
                                  port=9000, prometheus_port=9001)
    assert command[1:2] == ["launch"] and command[command.index("--worker-urls") + 1:][:2] == \
        ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert command[command.index("--policy") + 1] == "cache_aware"
    assert peer("vllm-router").command(workers=["u"], host="h", port=1, prometheus_port=2)[1] == "--host"
    with pytest.raises(ConfigError, match="unknown peer"):
        peer("nginx")


def test_the_table_shows_errors_and_rows():
    report = {"workload": {"requests": 4, "trace": None, "name": "chat", "span_s": 1.0, "prompt_tokens_mean": 10.0},
              "deployment": {"replicas": 2, "kv_blocks_per_replica": 64, "block_size": 32}, "ideal_hit_rate": 0.5,
              "results": [{"router": "smg", "front_door": "gateway", "completed": 4, "hit_rate": 0.4,
                           "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "e2e_p50_s": 0.3, "throughput_rps": 2.0,
                           "max_replica_share": 0.5, "gateway_cpu_s": 0.5, "gateway_peak_rss_mb": 30.0},
                          {"router": "ray:KVAwareRouter", "front_door": "ray-serve", "error": "not run"}]}
    table = format_table(report)
    assert "40.0%" in table and "error: not run" in table

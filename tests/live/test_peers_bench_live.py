"""Live: ``kvroute bench peers`` end to end with kvroute's gateway (one real ``vllm serve``
worker; the peer gateways and ``ray:KVAwareRouter``'s Dynamo runtime install from PyPI,
so their runs are the benchmark's, not CI's; tests/test_peers_bench.py checks the
``KVAwareRouter`` deployment's configuration)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("aiohttp")

from benchmarks.live_bench import LiveConfig  # noqa: E402
from benchmarks.live_workload import LiveShape  # noqa: E402
from benchmarks.peers_bench import format_table, run  # noqa: E402

pytestmark = pytest.mark.live


def test_bench_peers_runs_the_gateway_and_reads_the_engines_counters(tiny_model_path, tmp_path):
    report = run(routers=["kvroute:cache_aware"], workload="chat", requests=12, rate=4.0,
                 live=LiveConfig(replicas=1, model_path=str(tiny_model_path), kv_blocks=256),
                 shape=LiveShape(token_scale=0.25, max_prompt_tokens=512, max_output_tokens=8))
    (gateway,) = report["results"]
    assert gateway["router"] == "kvroute:cache_aware" and gateway["completed"] == 12, gateway
    # The engine's own counters: the chat workload's turns share prefixes.
    assert 0 < gateway["hit_rate"] <= report["ideal_hit_rate"] + 0.05, (gateway["hit_rate"], report["ideal_hit_rate"])
    assert gateway["gateway_cpu_s"] > 0 and gateway["gateway_peak_rss_mb"] > 10
    assert list(gateway["replica_share"].values()) == [1.0]
    # The client's TTFT split: vLLM's own histogram counts each request once, and the
    # client cannot see a first token sooner than the engine made it.
    assert 0 < gateway["engine_ttft_mean_s"] <= gateway["ttft_mean_s"], gateway
    assert gateway["outside_engine_ttft_mean_s"] > 0
    # The gateway's own share of each first byte, read from its histograms over the replay:
    # some, and never more than the client's whole TTFT.
    assert 0 < gateway["gateway_added_p50_ms"] <= gateway["gateway_added_p99_ms"], gateway
    assert gateway["gateway_added_p50_ms"] / 1e3 <= gateway["ttft_p50_s"], gateway
    assert gateway["gateway_loop_lag_p99_ms"] is not None
    assert len(gateway["ttft_percentiles_s"]) == 99
    assert "kvroute:cache_aware" in format_table(report)
    from benchmarks.peers_plots import SUMMARY, TTFT_CDF, plot

    assert [p.name for p in plot(report, tmp_path)] == [TTFT_CDF, SUMMARY]

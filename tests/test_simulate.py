"""The simulator end to end: the shared trace's known figures, the league, determinism,
conservation, replica changes, several routers, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import policies
from router.cli import main
from router.profile import DEFAULT_PROFILE
from simulator.cluster import ClusterConfig, ReplicaChange
from simulator.run import run_policy, simulate
from simulator.workloads import ideal_hit_rate, load_trace, make_workload, scale_rate

TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
needs_trace = pytest.mark.skipif(not TRACE.is_file(), reason="../shared/data trace not beside the repo")


@pytest.fixture(scope="module")
def trace():
    return load_trace(str(TRACE), "mooncake")


@pytest.fixture(scope="module")
def league(trace):
    """Every registered policy on the shared trace, 8 replicas of 2,000 512-token blocks
    (the configuration ../shared/DESIGN.md quotes figures for)."""
    doc = simulate(trace, trace="mooncake", replicas=8, policies_to_run=policies.available(), block_size=512,
                   kv_blocks=2000, profile=DEFAULT_PROFILE)
    return {row["policy"]: row for row in doc["results"]} | {"_doc": doc}


@needs_trace
def test_one_infinite_replica_reproduces_the_trace_ideal_hit_rate(trace):
    """The trace's README: one infinite prefix cache hits 65.1% of tokens. vLLM never reuses
    a prompt's last token, so the simulated engine may fall short by a hair, never exceed."""
    config = ClusterConfig(replicas=1, block_size=512, kv_blocks=200_000)
    row, _, _ = run_policy(trace, config, "round_robin")
    assert row["completed"] == len(trace) == 3993
    assert row["evictions"] == 0
    assert 0.648 <= row["hit_rate"] <= 0.651
    ideal = ideal_hit_rate(trace, 512)
    assert row["hit_rate"] <= ideal["tokens"] + 1e-9
    assert ideal["blocks"] == pytest.approx(0.6396, abs=5e-5)


@needs_trace
def test_round_robin_and_a_bounded_prefix_policy_land_on_the_trace_figures(league):
    """DESIGN.md (from the trace's own statistics): round robin about 11%, a bounded
    longest-prefix policy about 54%."""
    assert 0.09 <= league["round_robin"]["hit_rate"] <= 0.13
    for bounded_prefix in ("sglang", "ray_prefix"):
        assert 0.50 <= league[bounded_prefix]["hit_rate"] <= 0.57, bounded_prefix


@pytest.fixture(scope="module")
def league_x3(trace):
    """The same league with arrivals three times as fast, where queues form."""
    doc = simulate(list(scale_rate(trace, 3.0)), trace="mooncake", replicas=8,
                   policies_to_run=policies.available(), block_size=512, kv_blocks=2000, profile=DEFAULT_PROFILE)
    return {row["policy"]: row for row in doc["results"]}


@needs_trace
def test_cache_aware_beats_every_peer_on_ttft_p99_where_routing_decides(league_x3):
    """At three times the trace's rate the tail is queueing, which routing controls:
    cache_aware's p99 is clearly the best (docs/simulator.md: 3.6 s against 5.8 s for the
    next policy), with no replica above 1.5x its fair share."""
    ours = league_x3["cache_aware"]
    assert ours["max_share_of_fair"] <= 1.5
    for name in policies.available():
        if name != "cache_aware":
            assert ours["ttft_p99_s"] < 0.8 * league_x3[name]["ttft_p99_s"], name


@needs_trace
def test_at_the_traces_own_rate_cache_aware_has_the_best_mean_ttft_and_ties_the_tails(league):
    """At the trace's own rate the cluster is lightly loaded and the p99 is the prefill of
    the longest prompts nobody has cached, which no router avoids: the top policies land
    within a few percent of each other on p50 and p99 (cache_aware leads llmd's p50 by
    0.7-4% and dynamo's p99 by 0.3% at seed 0), and a change to the tie-breaking draws
    alone (one draw per decision instead of one per replica) put dynamo's p99 ahead at
    seed 0. What holds with a margin for every router seed checked (0-3): cache_aware has
    the best mean TTFT (3-8% ahead of the next), its p50 and p99 are within 3% of the
    best peer's, and no replica gets more than 1.5x its fair share."""
    ours = league["cache_aware"]
    assert ours["max_share_of_fair"] <= 1.5
    peers = [league[name] for name in policies.available() if name != "cache_aware"]
    assert ours["ttft_mean_s"] < min(peer["ttft_mean_s"] for peer in peers)
    for field in ("ttft_p50_s", "ttft_p99_s"):
        assert ours[field] <= 1.03 * min(peer[field] for peer in peers), field


@needs_trace
def test_the_league_conserves_requests_and_reports_the_ceiling(league, trace):
    doc = league["_doc"]
    assert doc["ideal_hit_rate"] == pytest.approx(ideal_hit_rate(trace, 512)["tokens"], abs=1e-6)
    for name in policies.available():
        row = league[name]
        assert row["completed"] + row["rejected"] + row["failed"] == row["requests"] == len(trace)
        assert row["hit_rate"] <= doc["ideal_hit_rate"] + 1e-9
        assert sum(row["replica_share"].values()) == pytest.approx(1.0, abs=1e-4)


def small(n=300, seed=1, name="mixed", rate=6.0):
    return list(make_workload(name, n, seed=seed, rate_per_s=rate))


def test_same_seed_same_bytes_other_seed_other_bytes():
    def run(seed):
        doc = simulate(small(seed=seed), trace="t", replicas=4, policies_to_run=["cache_aware", "pow2"],
                       block_size=16, kv_blocks=3000, profile=DEFAULT_PROFILE, seed=seed)
        for row in doc["results"]:
            row.pop("wall_s")
        return json.dumps(doc, sort_keys=True)

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_every_request_completes_once_and_tokens_out_equal_tokens_asked():
    requests = small(400, name="chat", rate=80.0)
    config = ClusterConfig(replicas=3, block_size=16, kv_blocks=300)  # small and busy: forces preemption
    row, metrics, cluster = run_policy(requests, config, "cache_aware")
    assert row["completed"] == len(requests) and row["rejected"] == row["failed"] == 0
    assert sum(metrics.output) == sum(r.output_tokens for r in requests)
    assert sum(metrics.prompt) == sum(r.prompt_tokens for r in requests)
    assert row["preemptions"] > 0
    assert cluster.in_flight == 0
    for engine in cluster.engines.values():
        assert engine.pool.num_free == engine.pool.num_blocks
        engine.pool.check_invariants()
    for router in cluster.routers:
        router.check_invariants()
        assert all(load.in_flight == 0 for load in router.load.loads.values())


def test_a_failed_replica_loses_its_requests_and_gets_no_more():
    requests = small(400, rate=10.0)
    last = requests[-1].arrival_s
    config = ClusterConfig(replicas=4, block_size=16, kv_blocks=4000,
                           changes=(ReplicaChange(last / 3, "fail", "replica-1"),
                                    ReplicaChange(last / 2, "add", "replica-9"),
                                    ReplicaChange(last / 2, "remove", "replica-2")))
    row, metrics, cluster = run_policy(requests, config, "cache_aware")
    assert row["failed"] > 0
    assert row["completed"] + row["failed"] + row["rejected"] == len(requests)
    late = [metrics.replica_names[i] for i, t in zip(metrics.replica, metrics.arrival) if t > last / 3 + 0.5]
    assert "replica-1" not in late
    assert "replica-9" in late
    assert "replica-1" not in cluster.routers[0].replicas


def test_several_routers_each_route_a_share_and_still_find_the_cache():
    requests = small(600, name="system-prompts", rate=8.0)
    config = ClusterConfig(replicas=4, routers=3, block_size=16, kv_blocks=4000)
    row, _, cluster = run_policy(requests, config, "cache_aware")
    assert [r.stats.routed for r in cluster.routers] == [200, 200, 200]
    rr, _, _ = run_policy(requests, config, "round_robin")
    assert row["hit_rate"] > rr["hit_rate"]


def test_cli_simulate_writes_the_documented_schema(tmp_path, capsys):
    out = tmp_path / "sim.json"
    code = main(["simulate", "--workload", "chat", "--requests", "150", "--replicas", "3",
                 "--policy", "round_robin", "--policy", "cache_aware", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    for key in ("trace", "replicas", "ideal_hit_rate", "results"):
        assert key in doc
    assert [r["policy"] for r in doc["results"]] == ["round_robin", "cache_aware"]
    for row in doc["results"]:
        for key in ("policy", "requests", "completed", "hit_rate", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s",
                    "tpot_p50_s", "e2e_p50_s", "throughput_tok_s", "max_replica_share", "preemptions", "wall_s"):
            assert key in row, key
        assert row["requests"] == row["completed"] == 150
        assert row["ttft_p50_s"] <= row["ttft_p99_s"]
    assert "cache_aware" in capsys.readouterr().out


@pytest.mark.parametrize("argv, field", [
    (["simulate", "--policy", "nope", "--requests", "10"], "nope"),
    (["simulate", "--trace", "/no/such/file.jsonl"], "trace"),
    (["simulate", "--workload", "nope"], "nope"),
    (["simulate", "--profile", "nope", "--requests", "10"], "profile"),
    (["simulate", "--rate-scale", "0", "--requests", "10"], "rate_scale"),
])
def test_cli_simulate_bad_input_fails_naming_it(argv, field, capsys):
    assert main(argv) == 2
    assert field in capsys.readouterr().err


def test_a_reset_replica_clears_its_cache_and_the_routers_forget_it():
    from simulator.cluster import Cluster
    from simulator.kernel import Kernel
    from simulator.workloads import block_keys

    requests = small(50, name="system-prompts")
    last = requests[-1].arrival_s
    config = ClusterConfig(replicas=2, block_size=16, kv_blocks=4000,
                           changes=(ReplicaChange(last + 60, "reset", "replica-0"),))
    kernel = Kernel()
    cluster = Cluster(kernel, config, "cache_aware")
    for r in requests:
        kernel.schedule(r.arrival_s, cluster.submit, r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens,
                        block_keys(r, 16), r.session_id)
    kernel.run(until=last + 30)
    router = cluster.routers[0]
    assert cluster.engines["replica-0"].pool.num_cached and router.tree.replica_blocks("replica-0") > 0
    cluster.finish()
    kernel.run()
    assert not cluster.engines["replica-0"].pool.num_cached
    assert router.tree.replica_blocks("replica-0") == 0
    assert router.tree.replica_blocks("replica-1") > 0


def test_cli_simulate_plots_a_ttft_cdf_and_per_replica_series(tmp_path):
    pytest.importorskip("matplotlib")
    code = main(["simulate", "--workload", "system-prompts", "--requests", "120", "--replicas", "2",
                 "--policy", "cache_aware", "--policy", "round_robin", "--plot", str(tmp_path)])
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["replicas_cache_aware.png", "replicas_round_robin.png", "ttft_cdf.png"]
    assert all((tmp_path / n).read_bytes()[:4] == b"\x89PNG" for n in names)

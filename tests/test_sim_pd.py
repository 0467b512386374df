"""Prefill-decode disaggregation in the simulator (``simulator.pd``): the timeline of a
disaggregated request, the KV link, the decode replica's cache, the conditional rule, the
plans' policies in each pool, conservation and determinism, and bad configuration."""

from __future__ import annotations

import json
import statistics

import pytest

from router.errors import ConfigError
from router.profile import DEFAULT_PROFILE
from simulator.cluster import ClusterConfig, ReplicaChange
from simulator.kernel import Kernel
from simulator.pd import PLANS, PDCluster, PDConfig, PDPlan, plan_named
from simulator.run import run_policy, simulate
from simulator.workloads import SimRequest, block_keys, make_workload

BLOCK = 16
ALWAYS = PDPlan("always", "cache_aware", "least_load", "always")


def _request(i, arrival, prompt, output=4, segment=1, session=None):
    return SimRequest(i, arrival, prompt, output, ((segment, prompt),), session)


def _run(requests, plan=ALWAYS, pd=PDConfig(prefill_replicas=2, decode_replicas=2), **config):
    cfg = ClusterConfig(replicas=pd.prefill_replicas + pd.decode_replicas, block_size=BLOCK,
                        profile=DEFAULT_PROFILE, **config)
    row, metrics, cluster = run_policy(requests, cfg, plan.name, pd=(pd, plan))
    return row, metrics, cluster


def test_a_disaggregated_request_waits_for_its_kv_to_cross_the_link():
    """One request, two link speeds: its TTFT differs by exactly the transfer time of its
    prompt's KV (the decode replica caches none of it), and the decode replica computes
    one prompt token, not the prompt."""
    prompt = 4096
    fast = PDConfig(prefill_replicas=1, decode_replicas=1, link_gbytes_per_s=100.0, transfer_latency_s=0.0)
    slow = PDConfig(prefill_replicas=1, decode_replicas=1, link_gbytes_per_s=1.0, transfer_latency_s=0.002)
    rows = {}
    for name, pd in (("fast", fast), ("slow", slow)):
        row, metrics, cluster = _run([_request(0, 0.0, prompt, output=1)], pd=pd)
        assert row["completed"] == 1 and row["pd"]["remote"] == 1 and row["pd"]["transfer_tokens"] == prompt
        rows[name] = metrics.ttft[0]
        # The decode replica's only prefill work was one token: its step took what a
        # one-token step over the prompt's context takes, far less than the prefill's.
        assert cluster.engines["decode-0"].busy_s < cluster.engines["prefill-0"].busy_s / 10
    expected = slow.transfer_s(prompt) + 0.002 - fast.transfer_s(prompt)
    assert rows["slow"] - rows["fast"] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_the_decode_replica_caches_what_arrived_and_moves_only_what_it_lacks():
    """The same prompt twice (one prefill, one decode replica): the second prefill hits the
    prefill replica's cache, and its transfer moves only the last partial block's worth
    that vLLM never caches, since the decode replica stored the first one's blocks."""
    prompt = 1000
    requests = [_request(0, 0.0, prompt), _request(1, 5.0, prompt)]
    row, metrics, cluster = _run(requests, pd=PDConfig(prefill_replicas=1, decode_replicas=1))
    assert row["completed"] == 2
    assert list(metrics.cached) == [0, (prompt - 1) // BLOCK * BLOCK]
    held = (prompt - 1) // BLOCK * BLOCK
    assert row["pd"]["decode_hit_tokens"] == held
    assert row["pd"]["transfer_tokens"] == prompt + (prompt - held)
    decode_pool = cluster.engines["decode-0"].pool
    assert len(decode_pool.longest_hit(block_keys(requests[0], BLOCK), 10_000)) == prompt // BLOCK


def test_the_conditional_rule_prefills_short_uncached_prompts_on_the_decode_replica():
    """A shared long prefix then short follow-ups: under ``conditional`` the follow-ups,
    whose uncached part on the decode replica is short, are prefilled there; the first,
    long and uncached, goes to the prefill pool."""
    plan = PDPlan("cond", "cache_aware", "cache_aware", "conditional", max_local_prefill_tokens=256)
    requests = [SimRequest(0, 0.0, 2000, 4, ((7, 2000),), "s")]
    requests += [SimRequest(i, i * 2.0, 2000 + 50 * i, 4, ((7, 2000), (100 + i, 50 * i)), "s") for i in range(1, 5)]
    row, _, _ = _run(requests, plan=plan, pd=PDConfig(prefill_replicas=1, decode_replicas=1))
    assert row["completed"] == 5
    assert row["pd"]["remote"] == 1 and row["pd"]["local"] == 4
    always, _, _ = _run(requests, pd=PDConfig(prefill_replicas=1, decode_replicas=1))
    assert always["pd"]["remote"] == 5 and always["pd"]["local"] == 0
    assert PDPlan("x", rule="always").local(100, 0) is False
    assert plan.local(2050, 1800) is True and plan.local(2100, 1800) is False


def test_the_cost_rule_prefills_locally_when_sooner_counting_the_decodes_it_delays():
    """A shared prefix, then follow-ups with long outputs (decodes running on the decode
    replica): the decode replica holds the prefix, so prefilling there is sooner than the
    prefill replica plus the transfer. Counting nothing for the decodes it delays, every
    request is prefilled locally; counting each decode's delay, fewer are; weighting it
    prohibitively, only those that find no decode running; and never past
    ``max_local_prefill_tokens`` uncached tokens (0: none, as every prompt has new text)."""
    requests = [SimRequest(0, 0.0, 2000, 200, ((7, 2000),), "s")]
    requests += [SimRequest(i, i * 0.05, 2000 + 40 * (i % 6 + 1), 200, ((7, 2000), (100 + i, 40 * (i % 6 + 1))), "s")
                 for i in range(1, 40)]
    local = {}
    for weight, cap in ((0.0, 2048), (1.0, 2048), (1e6, 2048), (0.0, 0)):
        plan = PDPlan("cost", "cache_aware", "cache_aware", "cost", max_local_prefill_tokens=cap,
                      interference_weight=weight)
        row, _, _ = _run(requests, plan=plan, pd=PDConfig(prefill_replicas=1, decode_replicas=1))
        assert row["completed"] == 40 and row["pd"]["local"] + row["pd"]["remote"] == 40
        local[weight, cap] = row["pd"]["local"]
    assert local[0.0, 2048] == 40
    assert 0 < local[1e6, 2048] < local[1.0, 2048] < 40
    assert local[0.0, 0] == 0


def test_each_pool_is_ranked_by_its_own_policy():
    """Round robin on the prefill pool spreads a repeated prompt over both prefill
    replicas (half its prefills miss); cache_aware keeps it on one (every later one
    hits). The decode pool's policy is the plan's own: round robin alternates it."""
    requests = [_request(i, i * 1.0, 800, output=2) for i in range(8)]
    rr = PDPlan("rr", "round_robin", "round_robin", "always")
    row_rr, metrics_rr, _ = _run(requests, plan=rr)
    row_ca, metrics_ca, _ = _run(requests, plan=PDPlan("ca", "cache_aware", "round_robin", "always"))
    assert row_rr["pd"]["prefill_max_share_of_fair"] == 1.0
    assert row_ca["pd"]["prefill_max_share_of_fair"] == 2.0
    assert row_rr["pd"]["decode_max_share_of_fair"] == row_ca["pd"]["decode_max_share_of_fair"] == 1.0
    assert sum(1 for c in metrics_ca.cached if c) == 7
    assert sum(1 for c in metrics_rr.cached if c) == 6


@pytest.mark.parametrize("plan", sorted(PLANS), ids=str)
def test_every_plan_completes_every_request_once(plan):
    requests = list(make_workload("mixed", 300, seed=3, rate_per_s=40.0))
    row, metrics, cluster = _run(requests, plan=plan_named(plan), pd=PDConfig(prefill_replicas=2, decode_replicas=3))
    assert row["completed"] + row["rejected"] == row["requests"] == 300
    assert row["pd"]["remote"] + row["pd"]["local"] == row["completed"]
    assert sum(metrics.output) == sum(r.output_tokens for r in requests)
    assert cluster.in_flight == 0
    for engine in cluster.engines.values():
        engine.pool.check_invariants()
        assert not engine.running and not engine.waiting


def test_same_seed_same_bytes():
    requests = list(make_workload("chat", 300, seed=1, rate_per_s=30.0))
    pd = PDConfig(prefill_replicas=2, decode_replicas=2)
    plans = [plan_named(name) for name in sorted(PLANS)]

    def doc():
        out = simulate(requests, trace="t", replicas=1, policies_to_run=[], block_size=BLOCK, kv_blocks=None,
                       profile=DEFAULT_PROFILE, pd=pd, pd_plans=plans)
        for row in out["results"]:
            row.pop("wall_s")
        return json.dumps(out, sort_keys=True)

    assert doc() == doc()


def test_bad_pd_configuration_fails_naming_the_field():
    with pytest.raises(ConfigError, match="pd.rule"):
        PDPlan("x", rule="sometimes")
    with pytest.raises(ConfigError, match="pd.max_local_prefill_tokens"):
        PDPlan("x", rule="conditional", max_local_prefill_tokens=-1)
    with pytest.raises(ConfigError, match="policy"):
        PDPlan("x", prefill="no-such-policy")
    with pytest.raises(ConfigError, match="pd.decode_replicas"):
        PDConfig(decode_replicas=0)
    with pytest.raises(ConfigError, match="pd.link_gbytes_per_s"):
        PDConfig(link_gbytes_per_s=0)
    with pytest.raises(ConfigError, match="pd.transfer_latency_s"):
        PDConfig(transfer_latency_s=-1)
    with pytest.raises(ConfigError, match="pd_plan"):
        plan_named("nope")
    with pytest.raises(ConfigError, match="pd.decode.*costs"):
        PDPlan("x", prefill="cache_aware", decode="round_robin", rule="cost")
    with pytest.raises(ConfigError, match="pd.interference_weight"):
        PDPlan("x", prefill="cache_aware", decode="cache_aware", rule="cost", interference_weight=-1)
    config = ClusterConfig(replicas=4, changes=(ReplicaChange(1.0, "remove", "replica-0"),))
    with pytest.raises(ConfigError, match="changes"):
        PDCluster(Kernel(), config, PDConfig(), ALWAYS)


def test_cli_simulate_pd_writes_the_plans_and_their_pd_figures(tmp_path, capsys):
    from router.cli import main

    out = tmp_path / "pd.json"
    code = main(["simulate", "--workload", "chat", "--requests", "120", "--prefill-replicas", "2",
                 "--decode-replicas", "3", "--pd-plan", "kvroute", "--pd-plan", "smg", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["replicas"] == 5 and doc["pd"]["prefill_replicas"] == 2 and doc["pd"]["decode_replicas"] == 3
    assert [r["policy"] for r in doc["results"]] == ["kvroute", "smg"]
    assert doc["pd_plans"]["smg"]["prefill"] == "sglang"
    for row in doc["results"]:
        assert row["completed"] == 120
        for key in ("remote", "local", "transfer_tokens", "transfer_wait_p99_s", "prefill_max_share_of_fair",
                    "decode_max_share_of_fair"):
            assert key in row["pd"], key
    text = capsys.readouterr().out
    assert "2 prefill + 3 decode replicas" in text and "(sglang, sglang; always)" in text


@pytest.mark.parametrize("argv, field", [
    (["--prefill-replicas", "2"], "decode_replicas"),
    (["--decode-replicas", "2"], "prefill_replicas"),
    (["--pd-plan", "smg"], "pd_plan"),
    (["--prefill-replicas", "2", "--decode-replicas", "2", "--pd-plan", "nope"], "pd_plan"),
    (["--prefill-replicas", "2", "--decode-replicas", "2", "--policy", "pow2"], "policy"),
    (["--prefill-replicas", "2", "--decode-replicas", "2", "--link-gbytes-per-s", "0"], "link_gbytes_per_s"),
])
def test_cli_simulate_pd_bad_flags_fail_naming_them(argv, field, capsys):
    from router.cli import main

    assert main(["simulate", "--requests", "10", *argv]) == 2
    assert field in capsys.readouterr().err


def test_bench_pd_runs_every_plan_per_seed_and_summarizes(monkeypatch):
    from benchmarks import pd_league

    monkeypatch.setattr(pd_league, "WORKLOADS", {"chat": (150, 40.0)})
    report = pd_league.run(workloads=["chat"], seeds=2, prefill=2, decode=2, plans=["kvroute", "smg"], jobs=1)
    assert [(r["workload"], r["seed"]) for r in report["runs"]] == [("chat", 0), ("chat", 1)]
    summary = report["summary"]["chat"]
    assert set(summary) == {"kvroute", "smg"}
    for row in summary.values():
        assert row["seeds"] == 2 and 0 <= row["best_p99"] <= 2 and 0 <= row["hit_within_half_point"] <= 2
        assert 0 < row["hit_rate"] <= 1 and row["ttft_p50_s"] <= row["ttft_p99_s"]
    assert sum(row["best_p99"] for row in summary.values()) >= 2  # each seed has a best (ties count twice)
    means = statistics.fmean(r["results"][0]["hit_rate"] for r in report["runs"])
    assert summary["kvroute"]["hit_rate"] == pytest.approx(means, abs=1e-6)
    assert "kvroute" in pd_league.format_table(report)
    with pytest.raises(ConfigError, match="workload"):
        pd_league.run(workloads=["nope"], plans=["kvroute"])
    later = pd_league.run(workloads=["chat"], seeds=1, first_seed=3, prefill=2, decode=2, plans=["kvroute"], jobs=1)
    assert [(r["workload"], r["seed"]) for r in later["runs"]] == [("chat", 3)]
    with pytest.raises(ConfigError, match="first_seed"):
        pd_league.run(workloads=["chat"], first_seed=-1, plans=["kvroute"])

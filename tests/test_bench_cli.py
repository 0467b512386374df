"""The router benchmark and the command line, run for real at a small size."""

from __future__ import annotations

import json

from benchmarks import router_bench
from router import cli


def test_router_benchmark_reports_the_required_fields_and_grows_the_tree():
    report = router_bench.run(replicas=[4], prompts=150, policy="cache_aware", tree_blocks=6000,
                              seed=1, with_ray=False)
    warm, grown = report["results"]
    for field in ("replicas", "decision_p50_us", "decision_p99_us", "decision_core_p50_us",
                  "decision_core_p99_us", "ray_prefix_tree_p50_us", "speedup_vs_ray_p50", "bytes_per_block"):
        assert field in report and field in warm
    assert warm["replicas"] == grown["replicas"] == 4
    assert grown["tree_blocks"] >= 6000 > warm["tree_blocks"] / 100
    assert warm["decisions"] == 150
    assert 0 < warm["decision_p50_us"] <= warm["decision_p99_us"]
    # route alone, timed inside the same decisions as keying + route
    for row in (warm, grown):
        assert 0 < row["decision_core_p50_us"] <= row["decision_core_p99_us"]
        assert row["decision_core_p50_us"] < row["decision_p50_us"]
    # A block entry costs at least its dict slot and at most a few hundred bytes.
    assert 20 < grown["bytes_per_block"] < 1000
    assert set(report["targets"]) == {"decision_p50_le_25us", "decision_p99_le_100us", "decision_core_p50_le_5us",
                                      "speedup_vs_ray_ge_8x", "bytes_per_block_le_200"}


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "router", "--replicas", "2", "--prompts", "50", "--tree-blocks", "0",
                     "--no-ray", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["results"][0]["replicas"] == 2
    assert data["command"].startswith("kvroute bench router")
    assert data["results"][0]["decision_core_p50_us"] > 0 and "decision_core_p50_le_5us" in data["targets"]
    out = capsys.readouterr().out
    assert "p50 us" in out and "core p50" in out


def test_cli_rejects_a_bad_policy_with_a_clear_message(capsys):
    code = cli.main(["bench", "router", "--replicas", "2", "--prompts", "10", "--tree-blocks", "0",
                     "--no-ray", "--policy", "nope"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown policy 'nope'" in err and "cache_aware" in err


def test_cli_lists_policies(capsys):
    assert cli.main(["policies"]) == 0
    out = capsys.readouterr().out
    assert "cache_aware" in out and "sglang" in out


def test_demo_rejects_a_bad_router_before_starting_anything(capsys):
    # Every router name is validated before Ray starts or any replica is deployed.
    code = cli.main(["demo", "--policy", "cache_aware", "--policy", "nope"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown policy 'nope'" in err


def test_simulator_benchmark_times_both_mooncake_block_sizes(tmp_path):
    """``kvroute bench simulator`` replays the Mooncake trace in its 512-token blocks and in
    vLLM's 16-token blocks with 1M-token caches (here a 60-request slice of it)."""
    from benchmarks import sim_bench

    trace = tmp_path / "trace.jsonl"
    with open(sim_bench.SHARED_TRACE) as source:
        trace.write_text("".join(next(source) for _ in range(60)))
    report = sim_bench.run(sizes=(300,), workload="system-prompts", trace=trace)
    (row,) = report["results"]
    assert row["requests"] == row["completed"] == 300 and row["requests_per_s"] > 0
    for key, block_size in (("mooncake_trace", 512), ("mooncake_trace_16", 16)):
        assert report[key]["block_size"] == block_size and report[key]["requests"] == 60
        assert report[key]["requests_per_s"] > 0 and 0 < report[key]["hit_rate"] < 1
    assert "16 tokens" in sim_bench.format_table(report)


def test_simulator_ab_finds_equal_results_at_one_commit(tmp_path):
    """benchmarks/sim_ab.py at the same checkout twice: every case's results are equal."""
    from pathlib import Path

    from benchmarks import sim_ab

    root = Path(__file__).resolve().parents[1]
    report = sim_ab.main([str(root), str(root), "--rounds", "1", "--requests", "150", "--trace", "",
                          "--json", str(tmp_path / "ab.json")])
    assert set(report["cases"]) == {"system-prompts", "mixed", "chat"}
    assert all(case["results_equal"] and case["after_requests_per_s"] > 0 for case in report["cases"].values())
    assert json.loads((tmp_path / "ab.json").read_text())["rounds"] == 1

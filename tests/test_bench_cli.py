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

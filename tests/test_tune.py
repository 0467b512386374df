"""``kvroute tune`` (``simulator/tune.py``): candidates, the split in time, the Pareto front,
and the command end to end on a recorded trace, its winner deployable as written."""

from __future__ import annotations

import json

import pytest

from router.cli import build_parser, main
from router.errors import ConfigError
from router.service import validate_options
from simulator.tune import SPACE, candidates, pareto, rank_key, ranking, split_in_time
from simulator.workloads import make_workload, save_jsonl


def test_candidates_cover_every_policy_then_draw_distinct_cache_aware_constants():
    plan = candidates(["cache_aware", "pow2", "ray_prefix"], [4, 8], budget=20, seed=1)
    assert len(plan) == 20
    defaults = [(c.policy, c.replicas) for c in plan if not c.options]
    assert sorted(defaults) == sorted((p, n) for p in ("cache_aware", "pow2", "ray_prefix") for n in (4, 8))
    drawn = [c for c in plan if c.options]
    assert all(c.policy == "cache_aware" for c in drawn)
    assert len({(c.options, c.replicas) for c in drawn}) == len(drawn)
    for c in drawn:
        options = dict(c.options)
        assert set(options) == set(SPACE) and all(options[k] in SPACE[k] for k in SPACE)
    # A budget under the policies' count still runs each policy once.
    assert len(candidates(["cache_aware", "pow2"], [4], budget=1)) == 2


def test_the_split_is_in_time_and_the_held_back_part_starts_at_zero():
    requests = list(make_workload("chat", 300, seed=0, rate_per_s=20))
    tuning, held = split_in_time(requests, 0.6)
    assert len(tuning) + len(held) == 300
    cut = requests[0].arrival_s + 0.6 * (requests[-1].arrival_s - requests[0].arrival_s)
    assert all(r.arrival_s < cut for r in tuning)
    assert held[0].arrival_s == 0 and [r.request_id for r in held] == list(range(len(held)))
    for bad in (0, 1, 1.5):
        with pytest.raises(ConfigError) as exc:
            split_in_time(requests, bad)
        assert exc.value.field == "split"


def test_the_pareto_front_keeps_exactly_the_undominated_rows():
    def row(hit, p50, p99, share, replicas):
        return {"tuning": {"hit_rate": hit, "ttft_p50_s": p50, "ttft_p99_s": p99, "max_share_of_fair": share},
                "replicas": replicas}

    best = row(0.8, 0.01, 0.05, 1.1, 4)
    rows = [best, row(0.7, 0.02, 0.06, 1.2, 4),  # dominated by the first
            row(0.9, 0.02, 0.08, 1.5, 4),  # more hits, slower: on the front
            row(0.8, 0.01, 0.05, 1.1, 8)]  # the same with more replicas: dominated
    assert pareto(rows) == [rows[0], rows[2]]


def test_a_tie_on_the_objective_is_broken_by_the_other_objectives():
    def result(p99, mean, hit):
        return {"ttft_p99_s": p99, "ttft_mean_s": mean, "hit_rate": hit}

    tied_slower, tied_faster, worse = result(3.4, 0.47, 0.25), result(3.4, 0.46, 0.20), result(3.5, 0.30, 0.9)
    ranked = sorted([tied_slower, worse, tied_faster], key=lambda r: rank_key(r, "ttft_p99"))
    assert ranked == [tied_faster, tied_slower, worse]  # the objective first, then the mean
    # Tied on p99 and the mean: the hit rate decides; on hit rate, p99 breaks a tie first.
    assert rank_key(result(3.4, 0.46, 0.3), "ttft_p99") < rank_key(result(3.4, 0.46, 0.2), "ttft_p99")
    assert rank_key(result(3.3, 0.5, 0.8), "hit_rate") < rank_key(result(3.4, 0.4, 0.8), "hit_rate")
    assert rank_key(result(None, 0.5, 0.8), "ttft_p99")[0] == float("inf")


def test_the_hit_rate_objective_ranks_a_tail_past_the_guard_last():
    def result(p99, mean, hit):
        return {"ttft_p99_s": p99, "ttft_mean_s": mean, "hit_rate": hit}

    overloaded, balanced, cautious, unknown = (result(39.6, 2.0, 0.80), result(0.043, 0.02, 0.79),
                                                result(0.040, 0.02, 0.75), result(None, None, 0.9))
    results = [overloaded, balanced, cautious, unknown]
    # Within 1.1x of the lowest p99 (0.040 s), by hits; then those past it, by hits.
    assert ranking(results, "hit_rate") == [1, 2, 3, 0]
    assert ranking(results, "hit_rate", p99_guard=1.05) == [2, 3, 0, 1]  # 0.043 > 1.05 * 0.040
    assert ranking(results, "hit_rate", p99_guard=1000) == [0, 1, 2, 3]  # in effect no guard: hits first
    # The TTFT objectives are not guarded (their own order already is the tail's).
    assert ranking(results, "ttft_p99") == [2, 1, 0, 3]


def test_tune_on_a_trace_writes_a_report_and_a_deployable_winner(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    save_jsonl(make_workload("chat", 600, seed=3, rate_per_s=40), trace)
    out = tmp_path / "tune"
    code = main(["tune", "--trace", str(trace), "--replicas", "2", "4", "--budget", "8", "--jobs", "2",
                 "--policy", "cache_aware", "--policy", "pow2", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "tune.json").read_text())
    assert report["requests"]["tuning"] + report["requests"]["held_back"] == 600
    assert len(report["runs"]) == 8 and {r["replicas"] for r in report["runs"]} == {2, 4}
    scores = [r["score"] for r in report["runs"]]
    winner = next(r for r in report["runs"] if r["label"] == report["winner"]["label"])
    assert winner["score"] == min(scores) and "held_back" in winner
    assert report["default"]["held_back"] is not None and "winner_beats_default_held_back" in report
    assert any(r.get("pareto") for r in report["runs"])
    # Every other policy's defaults are replayed held back too: what the winner is to beat.
    pow2 = [r for r in report["runs"] if r["policy"] == "pow2" and r["replicas"] == 4]
    assert len(pow2) == 1 and "held_back" in pow2[0]
    best = report["best_other_policy_held_back"]
    assert best["hit_rate"] == {"label": pow2[0]["label"], "value": pow2[0]["held_back"]["hit_rate"]}
    assert best["ttft_p99_s"]["label"] == pow2[0]["label"]
    # The winner as Serve config (validated) and as gateway flags the gateway parses.
    import yaml

    config = yaml.safe_load((out / "serve.yaml").read_text())["request_router_config"]
    assert config["request_router_class"] == "router:CacheAwareRouter"
    validate_options(config["request_router_kwargs"])
    flags = (out / "gateway-flags.txt").read_text().split()
    args = build_parser().parse_args(["gateway", "--worker", "http://127.0.0.1:1", *flags])
    assert args.policy == report["winner"]["policy"]
    assert "held back" in (out / "pareto.md").read_text()
    printed = capsys.readouterr().out
    assert "winner on the tuning part" in printed and "default cache_aware" in printed
    assert "against the other policies' best" in printed


def test_bad_tune_arguments_name_the_field(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    save_jsonl(make_workload("chat", 50, seed=0, rate_per_s=20), trace)
    for extra, field in ((["--split", "2"], "split"), (["--policy", "nope"], "policy"),
                         (["--p99-guard", "0.5"], "p99_guard")):
        assert main(["tune", "--trace", str(trace), *extra, "--out", str(tmp_path / "o")]) != 0
        assert f"error: {field}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

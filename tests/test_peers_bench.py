"""``kvroute bench peers``: its parts that need no engines (the run itself is
tests/live/test_peers_bench_live.py)."""

from __future__ import annotations

import pytest

from benchmarks.peers import PEERS, peer
from benchmarks.peers_bench import DEFAULT_ROUTERS, format_table, mean_over_seeds, run, seed_order, validate_routers
from router.errors import ConfigError


def test_router_names_are_checked_before_anything_starts():
    names = ["kvroute:cache_aware", "kvroute-chars:cache_aware", "kvroute:cache_aware,kv_events=false", "smg",
             "ray:CacheAwareRouter"]
    assert validate_routers(names) == names
    for bad, words in [(["kvroute:nope"], "unknown kvroute policy"), (["kvroute-chars:nope"], "unknown kvroute policy"),
                       (["kvroute:cache_aware,kv_events=maybe"], "kv_events"), (["nginx"], "unknown router"),
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


def _seeded_rows() -> list[dict]:
    def row(router, seed, hit, p99, share, **extra):
        return {"router": router, "front_door": "gateway", "seed": seed, "requests": 10, "completed": 10, "failed": 0,
                "hit_rate": hit, "client_hit_rate": None, "ttft_p50_s": 0.01, "ttft_p99_s": p99, "e2e_p50_s": 0.05,
                "throughput_rps": 5.0, "max_replica_share": max(share.values()), "replica_share": share,
                "gateway_cpu_s": 1.0, "gateway_peak_rss_mb": 100 + seed, **extra}

    return [row("kvroute:cache_aware", 0, 0.50, 0.020, {"a": 0.6, "b": 0.4}, ttft_percentiles_s=[0.01, 0.02]),
            row("smg", 0, 0.56, 0.030, {"a": 0.8, "b": 0.2}),
            row("kvroute:cache_aware", 1, 0.60, 0.040, {"a": 0.5, "b": 0.5}, ttft_percentiles_s=[0.03, 0.06]),
            {"router": "smg", "front_door": "gateway", "seed": 1, "error": "gateway died"},
            {"router": "vllm-router", "front_door": "gateway", "seed": 0, "error": "no wheel"},
            {"router": "vllm-router", "front_door": "gateway", "seed": 1, "error": "no wheel"}]


def _seeded_report(results: list[dict]) -> dict:
    return {"workload": {"requests": 10, "trace": None, "name": "agent", "span_s": 1.0, "prompt_tokens_mean": 10.0,
                         "seed": 0, "seeds": [0, 1]},
            "deployment": {"replicas": 2, "kv_blocks_per_replica": 96, "block_size": 32}, "ideal_hit_rate": 0.8,
            "results": results}


def test_several_seeds_are_averaged_per_router_and_kept_per_seed():
    kvroute, smg, vllm_router = mean_over_seeds(_seeded_rows())
    assert kvroute["router"] == "kvroute:cache_aware" and kvroute["seeds"] == [0, 1]
    assert kvroute["hit_rate"] == pytest.approx(0.55) and kvroute["ttft_p99_s"] == pytest.approx(0.03)
    assert kvroute["hit_rate_by_seed"] == [0.5, 0.6] and kvroute["ttft_p99_s_by_seed"] == [0.02, 0.04]
    assert kvroute["requests"] == kvroute["completed"] == 20 and kvroute["gateway_peak_rss_mb"] == 101
    assert kvroute["replica_share"] == {"a": 0.55, "b": 0.45} and kvroute["client_hit_rate"] is None
    assert kvroute["ttft_percentiles_s"] == [0.02, 0.04]  # percentile by percentile
    # A failed seed is left out of the figures and named.
    assert smg["seeds"] == [0] and smg["hit_rate"] == 0.56 and smg["errors_by_seed"] == {1: "gateway died"}
    assert smg["ttft_percentiles_s"] == []
    assert vllm_router["error"] == "no wheel" and vllm_router["errors_by_seed"] == {0: "no wheel", 1: "no wheel"}
    table = format_table(_seeded_report([kvroute, smg, vllm_router]))
    assert "seeds [0, 1]" in table and "50.0%, 60.0%" in table and "vllm-router" in table


def test_a_report_is_drawn_from_its_json(tmp_path):
    """``--plot``: the TTFT CDF and the summary, from the report alone (failed rows left
    out); a report without percentiles (written before they were kept) gets the summary."""
    import json

    from benchmarks.peers_plots import SUMMARY, TTFT_CDF, main, plot

    report = _seeded_report(mean_over_seeds(_seeded_rows()))
    report["results"][0].update(engine_ttft_mean_s=0.007, outside_engine_ttft_mean_s=0.004)
    written = plot(report, tmp_path / "plots")
    assert [p.name for p in written] == [TTFT_CDF, SUMMARY]
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    for row in report["results"]:
        row.pop("ttft_percentiles_s", None)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(report))
    assert main([str(path), str(tmp_path / "old")]) == 0
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [SUMMARY]


def test_plot_with_simulate_fails_before_anything_runs(capsys):
    from router.cli import main

    assert main(["bench", "peers", "--simulate", "--plot", "/nonexistent/dir"]) == 2
    assert "error: plot: --plot draws a live run's report" in capsys.readouterr().err


def test_a_bad_seed_count_fails_before_anything_starts():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="seeds"):
            run(routers=["smg"], seeds=bad)


def test_kv_aware_router_gets_the_league_geometry_and_ray_s_own_kv_event_ports(tmp_path):
    """``ray:KVAwareRouter``'s deployment (run by the benchmark, not CI: it installs Dynamo's
    runtime from PyPI and needs a HAProxy-mode cluster): the league's engine geometry on
    ``ray.serve.llm`` replicas, KVAwareRouter as the request router, and no KV-event
    publisher of ours (Ray sets its own from the port base)."""
    pytest.importorskip("ray.serve.llm")
    from benchmarks.peers_kv_aware import _llm_config
    from benchmarks.serve_path_kv_aware import KV_AWARE_CLASS
    from engines.tiny_model import build_tiny_model

    spec = {"model_path": str(build_tiny_model("/tmp/kvroute-tiny-v2")), "model_name": "tiny", "replicas": 3, "block_size": 32,
            "kv_blocks": 96, "max_model_len": 2048, "max_num_seqs": 16, "max_num_batched_tokens": 2048,
            "shim": str(tmp_path / "shim"), "dynamo": str(tmp_path / "dynamo")}
    config = _llm_config(spec, 31_000)
    deployment = config.deployment_config
    router = deployment["request_router_config"]
    assert deployment["num_replicas"] == 3
    assert (router["request_router_class"] if isinstance(router, dict) else router.request_router_class) \
        == KV_AWARE_CLASS
    kwargs = config.engine_kwargs
    assert "kv_events_config" not in kwargs and kwargs["enable_prefix_caching"]
    assert (kwargs["block_size"], kwargs["num_gpu_blocks_override"], kwargs["max_model_len"], kwargs["max_num_seqs"],
            kwargs["max_num_batched_tokens"]) == (32, 96, 2048, 16, 2048)
    assert config.experimental_configs["KV_EVENTS_PORT_BASE"] == 31_000
    assert config.experimental_configs["KV_TOKEN_PORT_BASE"] == 33_000
    env = config.runtime_env["env_vars"]
    assert env["RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"] == "1" and spec["dynamo"] in env["PYTHONPATH"]


def _gateway_commands(monkeypatch, tmp_path):
    """(the command lines ``GatewayRun`` launches, appended as it launches them; a worker
    to put them in front of): processes are not started, only their commands kept."""
    import benchmarks.peers_bench as peers_bench

    launched = []

    class Started:
        pid = 0

        def __init__(self, args, **kwargs):
            launched.append(list(args))

    monkeypatch.setattr(peers_bench.subprocess, "Popen", Started)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    worker = type("Worker", (), {"url": "http://127.0.0.1:1", "worker_arg": lambda self: "http://127.0.0.1:1"})()
    return launched, worker


def test_kvroute_gateways_get_the_latency_profile_the_ray_serve_rows_get(monkeypatch, tmp_path):
    """The league runs both front doors' ``cache_aware`` with the same latency profile
    (``kvroute bench`` picks ``tiny-llama-cpu`` for the tiny model): the gateway's command
    line carries it as a policy option; a policy without a profile gets none."""
    import benchmarks.peers_bench as peers_bench

    launched, worker = _gateway_commands(monkeypatch, tmp_path)
    peers_bench.GatewayRun("kvroute:cache_aware", [worker], "/model", 32, "tiny-llama-cpu").log.close()
    peers_bench.GatewayRun("kvroute:pow2", [worker], "/model", 32, "tiny-llama-cpu").log.close()
    peers_bench.GatewayRun("kvroute:cache_aware", [worker], "/model", 32, None).log.close()
    with_profile, pow2, without = launched
    assert with_profile[with_profile.index("--policy-option") + 1] == "profile=tiny-llama-cpu"
    assert "--policy-option" not in pow2 and "--policy-option" not in without


def test_the_league_in_the_simulator_runs_every_router_s_policy_on_the_same_requests():
    """``kvroute bench peers --simulate``: no engines; each router's simulated policy on the
    league's fitted requests and geometry, averaged over the seeds, deterministic."""
    from benchmarks.live_bench import LiveConfig
    from benchmarks.peers_bench import SIMULATED, format_simulated, simulate

    live = LiveConfig(replicas=3, kv_blocks=96, model_path="/unused")
    report = simulate(workload="agent", requests=40, seed=0, seeds=2, live=live, host_slots=2.0)
    rows = report["results"]
    assert [r["router"] for r in rows] == [name for name, _ in SIMULATED]
    assert all(0 < r["hit_rate"] <= report["ideal_hit_rate"] + 1e-9 and len(r["hit_rate_by_seed"]) == 2 for r in rows)
    assert report["deployment"]["profile"] == "tiny-llama-cpu" and report["deployment"]["host_slots"] == 2.0
    assert simulate(workload="agent", requests=40, seed=0, seeds=2, live=live, host_slots=2.0) == report
    assert "ray_prefix" in format_simulated(report)
    with pytest.raises(ConfigError, match="seeds"):
        simulate(workload="agent", requests=40, seeds=0, live=live)
    # Pinned servers are the profile measured on one pinned server; a profile given wins.
    pinned = simulate(workload="agent", requests=40, seed=0, live=live, host_slots=2.0, pin_engines=True)
    assert pinned["deployment"]["profile"] == "tiny-llama-cpu-pinned"
    assert pinned["results"][0]["ttft_p50_s"] < report["results"][0]["ttft_p50_s"]
    given = LiveConfig(replicas=3, kv_blocks=96, model_path="/unused", profile="tiny-llama-cpu")
    assert simulate(workload="agent", requests=40, live=given, host_slots=2.0,
                    pin_engines=True)["deployment"]["profile"] == "tiny-llama-cpu"


def test_the_simulated_league_replays_a_trace_window():
    """``--trace --trace-start``: the window later in the Mooncake trace, where its reuse
    has built up, separates the routers that the trace's first requests do not."""
    from pathlib import Path

    from benchmarks.live_bench import LiveConfig
    from benchmarks.live_workload import LiveShape
    from benchmarks.peers_bench import simulate

    trace = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake_synthetic_trace.jsonl")
    live = LiveConfig(replicas=3, kv_blocks=256, model_path="/unused")
    shape = LiveShape(token_scale=0.125)
    late = simulate(trace=trace, trace_start=3500, requests=120, rate_scale=0.5, live=live, shape=shape,
                    host_slots=2.0)
    early = simulate(trace=trace, requests=120, rate_scale=0.5, live=live, shape=shape, host_slots=2.0)
    assert late["workload"]["trace_start"] == 3500 and early["workload"]["trace_start"] == 0
    assert late["ideal_hit_rate"] > 3 * early["ideal_hit_rate"]


def test_a_pinned_server_and_what_it_starts_run_on_its_cpus_only(tmp_path):
    """``VLLMServer.cpus`` (``kvroute bench peers --pin-engines``) binds the process it
    launches before it runs, so everything that process starts inherits the set: a real
    child, standing in for ``vllm serve``, reports its own and its child's CPUs."""
    import os
    import sys
    import time

    from engines.vllm_server import VLLMServer

    cpu = sorted(os.sched_getaffinity(0))[-1]
    probe = ("import os, subprocess, sys; print(sorted(os.sched_getaffinity(0)), subprocess.run([sys.executable, '-c', "
             "'import os; print(sorted(os.sched_getaffinity(0)))'], capture_output=True, text=True).stdout.strip())")

    class Probe(VLLMServer):
        def command(self):
            return [sys.executable, "-c", probe]

    server = Probe(tmp_path, kv_events=False, cpus=frozenset({cpu})).start()
    try:
        server.process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while str([cpu]) not in server.log_tail() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.log_tail().strip() == f"[{cpu}] [{cpu}]"
        unpinned = Probe(tmp_path, kv_events=False).start()
        unpinned.process.wait(timeout=60)
        assert unpinned.log_tail().strip().startswith(str(sorted(os.sched_getaffinity(0))))
    finally:
        server.stop()


def test_a_server_whose_port_was_taken_meanwhile_starts_again_on_fresh_ports(tmp_path):
    """``free_port`` releases its probe before ``vllm serve`` binds: another process can
    take the port in between, and the server exits with "Address already in use" (seen in
    CI, on the KV-event replay port). ``wait_ready`` starts it again on fresh ports when it
    picked them, and reports any other exit (or a port the caller chose) as before. A real
    child stands in for ``vllm serve``: it fails the first time, then answers ``/health``
    on the port it was given."""
    import sys

    from engines.vllm_server import VLLMServer

    marker = tmp_path / "failed-once"
    stand_in = ("import http.server, pathlib, sys\n"
                "marker = pathlib.Path(sys.argv[1])\n"
                "if not marker.exists():\n"
                "    marker.write_text('x'); print(\"zmq.error.ZMQError: Address already in use\"); sys.exit(1)\n"
                "class H(http.server.BaseHTTPRequestHandler):\n"
                "    def do_GET(self):\n"
                "        self.send_response(200); self.end_headers()\n"
                "http.server.HTTPServer(('127.0.0.1', int(sys.argv[2])), H).serve_forever()\n")

    class StandIn(VLLMServer):
        def command(self):
            return [sys.executable, "-c", stand_in, str(marker), str(self.port)]

    server = StandIn(tmp_path).start()
    first = (server.port, server.kv_port, server.replay_port)
    try:
        server.wait_ready(60)
        assert server.healthy() and marker.exists()
        assert (server.port, server.kv_port, server.replay_port) != first and 0 not in first
    finally:
        server.stop()
    marker.unlink()
    given = StandIn(tmp_path, port=first[0], kv_port=first[1], replay_port=first[2]).start()  # chosen by the caller
    with pytest.raises(RuntimeError, match="Address already in use"):
        given.wait_ready(60)
    marker.unlink()
    once = StandIn(tmp_path, port_retries=0).start()
    with pytest.raises(RuntimeError, match="exited"):
        once.wait_ready(60)


def test_a_kvroute_router_name_may_carry_policy_options():
    """``kvroute:POLICY,NAME=VALUE...``: a tuned configuration beside the default in one
    run. Options are checked as the gateway checks them, before anything starts."""
    from benchmarks.peers_bench import kvroute_router

    assert kvroute_router("kvroute:cache_aware,load_factor=2,follow_autoscaler=false") == \
        ("cache_aware", {"load_factor": 2, "follow_autoscaler": False})
    assert kvroute_router("kvroute:cache_aware") == ("cache_aware", {})
    names = ["kvroute:cache_aware", "kvroute:cache_aware,churn_weight=2", "smg"]
    assert validate_routers(names) == names
    for bad, words in [("kvroute:cache_aware,load_factr=2", "load_factr: unknown option"),
                       ("kvroute:cache_aware,load_factor=0.5", "load_factor: must be >= 1"),
                       ("kvroute:cache_aware,2", "expected NAME=VALUE"),
                       ("kvroute:nope,load_factor=2", "unknown kvroute policy")]:
        with pytest.raises(ConfigError, match=words) as caught:
            validate_routers([bad])
        assert caught.value.field == "router" and bad in str(caught.value)


def test_a_kvroute_router_s_options_reach_the_gateway_and_the_simulated_policy(monkeypatch, tmp_path):
    import benchmarks.peers_bench as peers_bench
    from benchmarks.live_bench import LiveConfig

    launched, worker = _gateway_commands(monkeypatch, tmp_path)
    peers_bench.GatewayRun("kvroute:cache_aware,churn_weight=2,profile=llama3-8b-h100", [worker], "/model", 32,
                           "tiny-llama-cpu").log.close()
    (args,) = launched
    options = [args[i + 1] for i, arg in enumerate(args) if arg == "--policy-option"]
    assert options == ["profile=llama3-8b-h100", "churn_weight=2"]  # the name's profile wins
    assert args[args.index("--policy") + 1] == "cache_aware"

    live = LiveConfig(replicas=3, kv_blocks=96, model_path="/unused")
    sticky = "kvroute:cache_aware,work_weight=0,churn_weight=0"
    report = peers_bench.simulate(workload="agent", requests=60, seed=0, live=live, host_slots=2.0,
                                  routers=["kvroute:cache_aware", sticky, "smg"])
    rows = {row["router"]: row for row in report["results"]}
    assert list(rows)[:2] == ["kvroute:cache_aware", sticky] and "ray:PrefixCacheAffinityRouter" in rows
    fields = ("hit_rate", "ttft_p50_s", "ttft_p99_s", "max_replica_share")
    assert [rows[sticky][f] for f in fields] != [rows["kvroute:cache_aware"][f] for f in fields]


def test_the_command_simulates_pinned_servers_with_the_profile_measured_on_one(tmp_path, capsys):
    """``kvroute bench peers --simulate --pin-engines``: the pinned servers' profile, unless
    ``--profile`` names another."""
    import json

    from router.cli import main

    out = tmp_path / "pinned.json"
    base = ["bench", "peers", "--simulate", "--workload", "agent", "--requests", "30", "--kv-blocks", "96",
            "--replicas", "2", "--json", str(out)]
    for extra, profile in [(["--pin-engines"], "tiny-llama-cpu-pinned"),
                           (["--pin-engines", "--profile", "tiny-llama-cpu"], "tiny-llama-cpu"),
                           ([], "tiny-llama-cpu")]:
        assert main([*base, *extra]) == 0
        assert json.loads(out.read_text())["deployment"]["profile"] == profile
        assert profile + "," in capsys.readouterr().out


def test_a_kvroute_router_name_may_set_how_its_gateway_tokenizes(monkeypatch, tmp_path):
    """``kvroute:cache_aware,inline_tokenize_chars=4096``: a gateway option (checked as the
    gateway checks it), written to the gateway's configuration file, not a policy option;
    the simulator, which has no tokenizer, runs the policy alone."""
    import yaml

    import benchmarks.peers_bench as peers_bench
    from benchmarks.live_bench import LiveConfig

    name = "kvroute:cache_aware,inline_tokenize_chars=4096,churn_weight=1"
    assert validate_routers([name]) == [name]
    for bad, words in [("kvroute:cache_aware,inline_tokenize_chars=-1", "inline_tokenize_chars"),
                       ("kvroute:cache_aware,tokenizer_threads=0", "tokenizer_threads")]:
        with pytest.raises(ConfigError, match=words):
            validate_routers([bad])
    launched, worker = _gateway_commands(monkeypatch, tmp_path)
    peers_bench.GatewayRun(name, [worker], "/model", 32, "tiny-llama-cpu").log.close()
    (args,) = launched
    assert [args[i + 1] for i, arg in enumerate(args) if arg == "--policy-option"] == \
        ["profile=tiny-llama-cpu", "churn_weight=1"]
    with open(args[args.index("--config") + 1]) as f:
        assert yaml.safe_load(f) == {"inline_tokenize_chars": 4096}
    live = LiveConfig(replicas=2, kv_blocks=96, model_path="/unused")
    rows = peers_bench.simulate(workload="agent", requests=30, live=live, host_slots=2.0,
                                routers=[name, "kvroute:cache_aware,churn_weight=1"])["results"]
    assert {k: v for k, v in rows[0].items() if k != "router"} == {k: v for k, v in rows[1].items() if k != "router"}


def test_each_seed_starts_with_the_next_gateway():
    gateways = ["kvroute:cache_aware", "smg", "vllm-router"]
    orders = [seed_order(gateways, k) for k in range(4)]
    assert orders[0] == gateways and orders[3] == gateways
    assert [order[0] for order in orders[:3]] == gateways  # every gateway goes first once
    assert all(sorted(order) == sorted(gateways) for order in orders)
    assert seed_order([], 2) == []


def test_kvroute_chars_runs_without_a_tokenizer_and_kv_events_can_be_left_out(monkeypatch, tmp_path):
    """``kvroute-chars:POLICY`` launches the gateway without ``--tokenizer`` (character
    keys); ``kv_events=false`` goes to its configuration file (the events left out)."""
    import yaml

    import benchmarks.peers_bench as peers_bench

    launched, worker = _gateway_commands(monkeypatch, tmp_path)
    for name in ("kvroute-chars:cache_aware", "kvroute:cache_aware,kv_events=false", "kvroute:cache_aware"):
        peers_bench.GatewayRun(name, [worker], "/model", 32).log.close()
    chars, no_events, default = launched
    assert "--tokenizer" not in chars and "--config" not in chars
    assert no_events[no_events.index("--tokenizer") + 1] == "/model"
    with open(no_events[no_events.index("--config") + 1]) as f:
        assert yaml.safe_load(f) == {"kv_events": False}
    assert "--tokenizer" in default and "--config" not in default


def test_histogram_quantile_reads_what_was_observed_between_two_scrapes():
    from benchmarks.peers_bench import histogram_buckets, histogram_quantile

    page = ("# TYPE x_seconds histogram\n"
            'x_seconds_bucket{le="0.001"} 10.0\nx_seconds_bucket{le="0.002"} 60.0\n'
            'x_seconds_bucket{le="0.005"} 99.0\nx_seconds_bucket{le="+Inf"} 100.0\n'
            "x_seconds_count 100.0\nx_seconds_sum 0.2\n")
    after = histogram_buckets(page, "x_seconds")
    assert after == {0.001: 10.0, 0.002: 60.0, 0.005: 99.0, float("inf"): 100.0}
    assert histogram_quantile(after, {}, 0.5) == pytest.approx(0.0018)  # 40 of the 50 in (1, 2] ms
    assert histogram_quantile(after, {}, 0.99) == pytest.approx(0.005)
    assert histogram_quantile(after, {}, 1.0) == 0.005  # in +Inf: the highest finite bound
    before = {0.001: 10.0, 0.002: 10.0, 0.005: 10.0, float("inf"): 10.0}
    assert histogram_quantile(after, before, 0.5) == pytest.approx(0.0019)  # only the 90 since
    assert histogram_quantile(after, after, 0.5) is None
    assert histogram_buckets("", "x_seconds") == {}

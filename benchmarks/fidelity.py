"""``kvroute bench fidelity``: does the simulator predict what the live replicas do?

1. Calibrate (unless a profile is given): deploy the replicas once, measure prefill and
   decode step times through the HTTP ingress (``simulator.calibrate.measure``), fit a
   ``LatencyProfile`` (its ``request_overhead_s`` is the serving path outside the engine);
   measure how much slower a prefill runs while the other replicas decode
   (``simulator.calibrate.measure_contention``: CPU engines on one machine share its
   cores), which gives the simulated cluster's ``host_slots``; then replay other requests
   of the same workload at the same rate and add the median TTFT the fitted model misses
   there to ``request_overhead_s`` (see ``calibrate_live``); delete the deployment.
2. Live: ``kvroute bench live`` with each policy (kvroute policies use the calibrated
   profile), keeping every request's send time and outcome.
3. Simulated: the very requests, as the engine tokenized them (the rendered prompt's token
   ids, so both sides hold identical prefixes), arriving when they were actually sent, with
   the same output lengths, on a simulated cluster of the same replicas, block size, KV
   blocks, batch limits and shared compute, timed by the calibrated profile, routed by the
   same policy code (Ray's routers by their kvroute reimplementations: ``ray_prefix``,
   ``pow2``), once per seed (``SIM_SEEDS``): Serve's default router draws at random, so
   one simulated run against one live run compares two draws.
4. Per policy: the hit-rate difference in percentage points (target <= 2) and the TTFT p50
   difference relative to live (target <= 25%), both to the mean over the seeds; the
   seeds' spread and whether the live value lies inside it; p90/p99 and end-to-end p50 for
   information, and (with shared compute) what dedicated hardware would have predicted.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import live_bench
from benchmarks.live_workload import LiveShape
from engines.routers import profile_options
from router.profile import get_profile
from simulator.cluster import ClusterConfig
from simulator.run import run_policy
from simulator.workloads import SimRequest

DEFAULT_POLICIES = ("cache_aware", live_bench.RAY_PREFIX, live_bench.RAY_POW2)
HIT_RATE_TARGET_PP = 2.0
TTFT_P50_TARGET = 0.25
#: The kvroute reimplementation the simulator runs for each of Ray's routers.
SIM_POLICY = {live_bench.RAY_PREFIX: "ray_prefix", live_bench.RAY_POW2: "pow2"}


#: The operating-point replay of calibration: this many requests (at most), drawn with a
#: seed offset so they are never the requests the comparison replays.
LOAD_CALIBRATION_REQUESTS = 80
#: Simulated runs (seeds) per policy: the simulated side of a random policy is the mean
#: and spread over these.
SIM_SEEDS = 10
LOAD_CALIBRATION_SEED_OFFSET = 7919


@dataclasses.dataclass(frozen=True)
class LoadPoint:
    """Where the comparison will run (workload, rate, shape): calibration replays other
    requests of the same workload at the same rate there."""

    workload: str | None
    trace: str | None
    rate: float
    rate_scale: float
    seed: int
    shape: LiveShape
    requests: int = LOAD_CALIBRATION_REQUESTS


def calibrate_live(live: live_bench.LiveConfig, model_path: str, cluster: live_bench.Cluster, out: Path, *,
                   load_point: LoadPoint | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[str, dict]:
    """Deploy the replicas (Serve's default router), fit a profile through the HTTP
    ingress, write it to ``out``; returns (path, fit report).

    The step-time fit comes from isolated measurements (one prefill at a time, n decode
    streams). Under a real load the serving path (client, HTTP proxy, ingress, the other
    engine) shares the machine's cores with each engine, which the step model does not
    see; on a 2-vCPU machine that adds tens of milliseconds to every TTFT. With
    ``load_point``, calibration also replays requests of the comparison's workload at its
    rate (different requests: another seed) under Serve's default router, simulates them
    with the fitted profile and the same router, and adds the median TTFT shortfall to
    ``request_overhead_s``: the profile is then calibrated at the operating point it will
    be used at, and says so in its fit report (``load_calibration``)."""
    from ray import serve

    from simulator.calibrate import fit_profile, measure, measure_contention, write_profile

    app = f"{live_bench.APP_PREFIX}-calibrate"
    if progress:
        progress(f"calibrate: deploying {live.replicas} vLLM replicas")
    live_bench.deploy(live_bench.RAY_POW2, live, model_path, app)
    loaded: tuple[list[SimRequest], list[live_bench.Outcome], Any] | None = None
    kv_tokens = (live.kv_blocks or 32_768) * live.block_size
    try:
        if progress:
            progress("calibrate: measuring prefill and decode steps")
        samples = measure(cluster.url(), "", prefill_lengths=(32, 128, 256, 512, 1024), batch_sizes=(1, 2, 4, 8),
                          decode_context=128, decode_tokens=16, repeats=3, id_range=(5, 500))
        profile, report = fit_profile(samples, name="live-calibrated", max_batched_tokens=live.max_num_batched_tokens,
                                      max_num_seqs=live.max_num_seqs, kv_capacity_tokens=kv_tokens,
                                      source=f"kvroute bench fidelity: {live.replicas} vLLM CPU replicas of {model_path}")
        if live.replicas > 1:
            if progress:
                progress("calibrate: measuring a prefill while the other replicas decode (shared cores)")
            report["contention"] = measure_contention(cluster.url(), "", outside_s=profile.request_overhead_s,
                                                      replicas=live.replicas, id_range=(5, 500))
        report["host_slots"] = (report.get("contention") or {}).get("host_slots")
        if load_point is not None:
            loaded = _replay_at_load_point(load_point, live, model_path, cluster, progress)
    finally:
        serve.delete(app)
    if loaded is not None:
        profile, report["load_calibration"] = _fit_load_overhead(profile, live, model_path, *loaded,
                                                                 host_slots=report["host_slots"])
    write_profile(profile, report, out)
    return str(out), report


def _replay_at_load_point(point: LoadPoint, live: live_bench.LiveConfig, model_path: str,
                          cluster: live_bench.Cluster, progress: Callable[[str], None] | None):
    from transformers import AutoTokenizer

    from benchmarks.live_workload import TextRenderer, single_token_words

    requests = live_bench.load_requests(workload=point.workload, trace=point.trace, count=min(point.requests, LOAD_CALIBRATION_REQUESTS),
                                        rate=point.rate, rate_scale=point.rate_scale,
                                        seed=point.seed + LOAD_CALIBRATION_SEED_OFFSET, shape=point.shape)
    renderer = TextRenderer(single_token_words(AutoTokenizer.from_pretrained(model_path)))
    if progress:
        progress(f"calibrate: replaying {len(requests)} other requests of the workload at its rate")
    outcomes = live_bench.replay(cluster.url(), requests, renderer, timeout_s=live.timeout_s)
    return requests, outcomes, renderer


def _fit_load_overhead(profile, live: live_bench.LiveConfig, model_path: str, requests: list[SimRequest],
                       outcomes: list[live_bench.Outcome], renderer, *,
                       host_slots: float | None = None) -> tuple[Any, dict]:
    """The profile with the median live-minus-simulated TTFT of the calibration replay
    added to ``request_overhead_s`` (never below 0), and a report of it."""
    import statistics

    from transformers import AutoTokenizer

    live_ttfts = [o.ttft_s for o in outcomes if o.ok and o.ttft_s is not None]
    if len(live_ttfts) < 10:
        return profile, {"requests": len(live_ttfts), "applied": False, "reason": "too few answered requests"}
    sim_requests = simulated_requests(requests, outcomes, renderer, AutoTokenizer.from_pretrained(model_path))
    config = ClusterConfig(replicas=live.replicas, block_size=live.block_size,
                           kv_blocks=live.kv_blocks or max(1, profile.kv_capacity_tokens // live.block_size),
                           profile=profile, max_num_seqs=live.max_num_seqs,
                           max_num_batched_tokens=live.max_num_batched_tokens, host_slots=host_slots)
    # Serve's default router picks at random: the simulated p50 is the mean over seeds.
    sim_rows = simulate_seeds(sim_requests, config, SIM_POLICY[live_bench.RAY_POW2], {}, SIM_SEEDS)
    sim_p50 = statistics.fmean(r["ttft_p50_s"] for r in sim_rows)
    live_p50 = statistics.median(live_ttfts)
    shortfall = live_p50 - sim_p50
    overhead = max(0.0, profile.request_overhead_s + shortfall)
    return dataclasses.replace(profile, request_overhead_s=overhead), {
        "requests": len(live_ttfts), "applied": True, "router": live_bench.RAY_POW2,
        "live_ttft_p50_s": round(live_p50, 4), "sim_ttft_p50_s_before": round(sim_p50, 4), "sim_seeds": SIM_SEEDS,
        "request_overhead_s_isolated": round(profile.request_overhead_s, 4), "host_slots": host_slots,
        "request_overhead_s": round(overhead, 4)}


def simulated_requests(requests: Sequence[SimRequest], outcomes: Sequence[live_bench.Outcome], renderer,
                       tokenizer) -> list[SimRequest]:
    """The live requests as the simulator replays them: token-id content exactly as the
    engine encoded the prompt, arrival at the actual send time, the same output length.
    Requests that failed live are left out of both sides' figures."""
    out = []
    for r, o in zip(requests, outcomes):
        if not o.ok:
            continue
        prompt = renderer.prompt(r)
        ids = tuple(tokenizer.encode(prompt, add_special_tokens=True)) if isinstance(prompt, str) else tuple(prompt)
        out.append(SimRequest(len(out), o.sent_s, len(ids), max(1, o.output_tokens or r.output_tokens), ids,
                              r.session_id))
    out.sort(key=lambda q: q.arrival_s)
    return [dataclasses.replace(q, request_id=i) for i, q in enumerate(out)]


def _rel(sim: float | None, live: float | None) -> float | None:
    if sim is None or not live:
        return None
    return round((sim - live) / live, 4)


def simulate_seeds(sim_requests: Sequence[SimRequest], config: ClusterConfig, policy: str, options: dict,
                   seeds: int) -> list[dict[str, Any]]:
    """One simulated run per seed (``config.seed`` 0 .. seeds-1): a random policy (Serve's
    power of two choices, random tie-breaks) is a distribution, not one number."""
    return [run_policy(sim_requests, dataclasses.replace(config, seed=seed), policy, options)[0]
            for seed in range(seeds)]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, population standard deviation, min and max of ``values`` (rounded)."""
    import statistics

    return {"mean": round(statistics.fmean(values), 6), "sd": round(statistics.pstdev(values), 6),
            "min": round(min(values), 6), "max": round(max(values), 6), "n": len(values)}


def in_range(live: float | None, seeds: dict[str, float]) -> bool | None:
    """Whether a live figure lies within the simulated seeds' [min, max], allowing for the
    live figure's rounding to 4 decimals; None when the seeds agree exactly (a policy the
    simulator runs deterministically: then only the difference to the mean says anything)
    or the live figure is missing."""
    if live is None or seeds["max"] - seeds["min"] <= 1e-12:
        return None
    return seeds["min"] - 5e-5 <= live <= seeds["max"] + 5e-5


def compare(policy: str, live_row: dict, sim_rows: Sequence[dict], dedicated_rows: Sequence[dict] = ()) -> dict[str, Any]:
    """Live against the simulated distribution over seeds. The differences are taken to the
    seeds' mean (the simulator's prediction of what the policy does on average); whether
    the one live draw lies inside the seeds' range is reported beside them (a random
    policy's live run is a draw too). ``dedicated_rows``: the same seeds with every replica
    on its own hardware (no shared compute), for information."""
    hits = spread([r["hit_rate"] for r in sim_rows])
    p50s = spread([r["ttft_p50_s"] for r in sim_rows])
    mean = lambda key: round(sum(r[key] for r in sim_rows) / len(sim_rows), 6)  # noqa: E731
    live_hit = live_row["hit_rate"]
    hit_pp = round(abs(hits["mean"] - live_hit) * 100, 2)
    p50 = _rel(p50s["mean"], live_row["ttft_p50_s"])
    row = {
        "policy": policy, "sim_policy": SIM_POLICY.get(policy, policy), "sim_seeds": len(sim_rows),
        "live_hit_rate": live_hit, "sim_hit_rate": hits["mean"], "sim_hit_rate_seeds": hits,
        "hit_rate_diff_pp": hit_pp,
        "live_hit_in_sim_range": in_range(live_hit, hits),
        "live_ttft_p50_s": live_row["ttft_p50_s"], "sim_ttft_p50_s": p50s["mean"], "sim_ttft_p50_s_seeds": p50s,
        "ttft_p50_rel_diff": p50,
        "live_ttft_p50_in_sim_range": in_range(live_row["ttft_p50_s"], p50s),
        "live_ttft_p90_s": live_row["ttft_p90_s"], "sim_ttft_p90_s": mean("ttft_p90_s"),
        "live_ttft_p99_s": live_row["ttft_p99_s"], "sim_ttft_p99_s": mean("ttft_p99_s"),
        "ttft_p99_ratio_live_to_sim": (round(live_row["ttft_p99_s"] / mean("ttft_p99_s"), 2)
                                       if live_row["ttft_p99_s"] and mean("ttft_p99_s") else None),
        "live_e2e_p50_s": live_row.get("e2e_p50_s"), "sim_e2e_p50_s": mean("e2e_p50_s"),
        "live_max_replica_share": live_row.get("max_replica_share"),
        "sim_max_replica_share": (round(sum(r["max_replica_share"] for r in sim_rows) / len(sim_rows), 4)
                                  if all(r.get("max_replica_share") is not None for r in sim_rows) else None),
        "hit_rate_ok": hit_pp <= HIT_RATE_TARGET_PP,
        "ttft_p50_ok": p50 is not None and abs(p50) <= TTFT_P50_TARGET,
        "requests": live_row["completed"],
    }
    if dedicated_rows:
        row["sim_ttft_p50_s_dedicated"] = round(sum(r["ttft_p50_s"] for r in dedicated_rows) / len(dedicated_rows), 6)
        row["sim_ttft_p99_s_dedicated"] = round(sum(r["ttft_p99_s"] for r in dedicated_rows) / len(dedicated_rows), 6)
        row["sim_e2e_p50_s_dedicated"] = round(sum(r["e2e_p50_s"] for r in dedicated_rows) / len(dedicated_rows), 6)
    return row


def host_slots_of(profile: str | None) -> float | None:
    """The ``host_slots`` a calibrated profile file measured (its ``fit.host_slots``), or
    None (a built-in profile, or a file without it: every replica on its own hardware)."""
    if not profile or not Path(str(profile)).is_file():
        return None
    try:
        value = (json.loads(Path(profile).read_text()).get("fit") or {}).get("host_slots")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def run(*, policies: Sequence[str] = DEFAULT_POLICIES, workload: str | None = "chat", trace: str | None = None,
        requests: int = 200, rate: float = 8.0, rate_scale: float = 1.0, seed: int = 0,
        shape: LiveShape = LiveShape(), live: live_bench.LiveConfig = live_bench.LiveConfig(),
        calibrate: bool = True, profile_out: str | Path | None = None, sim_seeds: int | None = None,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The ``kvroute bench fidelity`` report (see the module doc). With ``calibrate`` False,
    ``live.profile`` must name the profile to use on both sides. ``sim_seeds``: simulated
    runs per policy (default ``SIM_SEEDS``)."""
    sim_seeds = SIM_SEEDS if sim_seeds is None else sim_seeds
    if not isinstance(sim_seeds, int) or isinstance(sim_seeds, bool) or sim_seeds <= 0:
        raise ValueError(f"sim_seeds: must be a positive integer, got {sim_seeds!r}")
    from transformers import AutoTokenizer

    from engines.tiny_model import build_tiny_model

    model_path = str(Path(live.model_path).expanduser().absolute()) if live.model_path else str(build_tiny_model())
    fit_report: dict | None = None
    if not calibrate and not live.profile:
        raise ValueError("fidelity without calibration needs live.profile")
    cluster = live_bench.Cluster(live.port)
    try:
        if calibrate:
            out = Path(profile_out) if profile_out else Path(tempfile.mkdtemp(prefix="kvroute-fidelity-")) / "live.json"
            point = LoadPoint(workload=workload, trace=trace, rate=rate, rate_scale=rate_scale, seed=seed, shape=shape,
                              requests=requests)
            profile_path, fit_report = calibrate_live(live, model_path, cluster, out, load_point=point,
                                                      progress=progress)
            live = dataclasses.replace(live, profile=profile_path)
        started = time.perf_counter()
        report = live_bench.run(policies=policies, workload=workload, trace=trace, requests=requests, rate=rate,
                                rate_scale=rate_scale, seed=seed, shape=shape, live=live, progress=progress,
                                keep_outcomes=True, cluster=cluster)
        live_wall = time.perf_counter() - started
    finally:
        cluster.close()
    profile = get_profile(live.profile)
    host_slots = fit_report.get("host_slots") if fit_report is not None else host_slots_of(live.profile)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = ClusterConfig(replicas=live.replicas, block_size=live.block_size,
                           kv_blocks=live.kv_blocks or max(1, profile.kv_capacity_tokens // live.block_size),
                           profile=profile, max_num_seqs=live.max_num_seqs,
                           max_num_batched_tokens=live.max_num_batched_tokens, host_slots=host_slots)
    rows, sims = [], []
    for live_row in report["results"]:
        policy = live_row["policy"]
        sim_requests = simulated_requests(report["requests"], report["outcomes"][policy], report["renderer"], tokenizer)
        sim_policy = SIM_POLICY.get(policy, policy)
        options = profile_options(sim_policy, live.profile)
        sim_rows = simulate_seeds(sim_requests, config, sim_policy, options, sim_seeds)
        dedicated = (simulate_seeds(sim_requests, dataclasses.replace(config, host_slots=None), sim_policy, options,
                                    sim_seeds) if host_slots is not None else ())
        sims.append(sim_rows[0])
        rows.append(compare(policy, live_row, sim_rows, dedicated))
    return {
        "benchmark": "fidelity",
        "targets": {"hit_rate_diff_pp": HIT_RATE_TARGET_PP, "ttft_p50_rel_diff": TTFT_P50_TARGET},
        "profile": json.loads(Path(live.profile).read_text()) if Path(str(live.profile)).is_file()
        else get_profile(live.profile).to_json(),
        "calibration_fit": fit_report, "host_slots": host_slots, "sim_seeds": sim_seeds,
        "workload": report["workload"], "deployment": report["deployment"], "machine": report["machine"],
        # "simulated": seed 0's full row per policy; "comparison" has the seeds' spread.
        "live": report["results"], "simulated": sims, "comparison": rows,
        "all_within_targets": all(r["hit_rate_ok"] and r["ttft_p50_ok"] for r in rows),
        # Per policy, per request: [sent_s, ttft_s, e2e_s, prompt_tokens, cached_tokens,
        # output_tokens, replica] (times None for a failed request), to re-examine the
        # comparison offline.
        "live_requests": {policy: [[round(o.sent_s, 4), None if o.ttft_s is None else round(o.ttft_s, 4),
                                    None if o.e2e_s is None else round(o.e2e_s, 4),
                                    o.prompt_tokens, o.cached_tokens, o.output_tokens, o.replica] for o in outs]
                          for policy, outs in report["outcomes"].items()},
        "live_wall_s": round(live_wall, 1),
    }


def format_table(report: dict[str, Any]) -> str:
    w = report["workload"]
    slots = report.get("host_slots")
    lines = [f"{w['requests']} requests of {w['trace'] or w['name']}; simulated: mean over "
             f"{report.get('sim_seeds', 1)} seeds, replicas "
             + (f"sharing the host's compute (host_slots {slots:g})" if slots else "on dedicated hardware")
             + f"; targets: hit rate within {HIT_RATE_TARGET_PP:g} pp, TTFT p50 within {TTFT_P50_TARGET:.0%}",
             f"{'policy':<36} {'hit live':>8} {'sim mean [min-max]':>21} {'diff':>7} {'p50 live':>9} {'sim':>6} "
             f"{'diff':>6} {'p99 live':>9} {'sim':>6}  ok"]

    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}ms"

    for r in report["comparison"]:
        rel = "-" if r["ttft_p50_rel_diff"] is None else f"{r['ttft_p50_rel_diff']:+.0%}"
        ok = "yes" if r["hit_rate_ok"] and r["ttft_p50_ok"] else "NO"
        seeds = r.get("sim_hit_rate_seeds") or {"min": r["sim_hit_rate"], "max": r["sim_hit_rate"]}
        inside = "*" if r.get("live_hit_in_sim_range") is False else ""
        sim_hit = f"{r['sim_hit_rate']:.1%} [{seeds['min']:.1%}-{seeds['max']:.1%}]{inside}"
        lines.append(f"{r['policy']:<36} {r['live_hit_rate']:>8.1%} {sim_hit:>21} "
                     f"{r['hit_rate_diff_pp']:>5.1f}pp {ms(r['live_ttft_p50_s']):>9} {ms(r['sim_ttft_p50_s']):>6} "
                     f"{rel:>6} {ms(r['live_ttft_p99_s']):>9} {ms(r['sim_ttft_p99_s']):>6}  {ok}")
    if any(r.get("live_hit_in_sim_range") is False for r in report["comparison"]):
        lines.append("* the live hit rate lies outside the simulated seeds' range")
    return "\n".join(lines)

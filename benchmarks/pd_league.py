"""``kvroute bench pd``: the PD plans of kvroute and the peers, in the simulator, on the
workloads where prefill-decode disaggregation is deployed.

Each workload runs on one PD deployment (``--prefill-replicas`` + ``--decode-replicas``
of the ``llama3-8b-h100`` profile, a 50 GB/s link into each decode replica) for every
plan of ``simulator.pd.PLANS``, once per seed (generated workloads draw new requests per
seed; the Mooncake trace is replayed as is, once). Seeds run in parallel processes
(``--jobs``). A tail percentile over a few thousand requests moves with the seed, so the
table reports each figure's mean over seeds, and how often each plan had the best TTFT
p99 and (within 0.5 points) the best hit rate among all plans. Deterministic: the same
arguments give the same JSON, ``wall_s`` aside.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from router.errors import ConfigError

#: workload -> (requests, arrivals per second): loads at which a 4 + 4 deployment queues
#: behind prefills (TTFT p99 several times p50) without diverging.
WORKLOADS: dict[str, tuple[int, float]] = {"chat": (3000, 100.0), "agent": (3000, 40.0),
                                           "system-prompts": (3000, 150.0), "mixed": (3000, 120.0)}
TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
MOONCAKE_KV_BLOCKS = 2000  # 512-token blocks per replica, as the flat league on this trace
FIGURES = ("hit_rate", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "e2e_p50_s")
PD_FIGURES = ("prefill_max_share_of_fair", "decode_max_share_of_fair", "local")


def _one(task: tuple[str, int, int, int, Sequence[str], str | None]) -> dict[str, Any]:
    """One workload and seed through every plan (in a worker process)."""
    from router.profile import get_profile
    from simulator import workloads
    from simulator.pd import PDConfig, plan_named
    from simulator.run import simulate

    workload, seed, prefill, decode, plans, trace = task
    kv_blocks = None
    if workload == "mooncake":
        requests = workloads.load_trace(trace, "mooncake")
        block, kv_blocks = 512, MOONCAKE_KV_BLOCKS
    else:
        count, rate = WORKLOADS[workload]
        requests = list(workloads.make_workload(workload, count, seed=seed, rate_per_s=rate))
        block = 16
    doc = simulate(requests, trace=workload, replicas=1, policies_to_run=[], block_size=block, kv_blocks=kv_blocks,
                   profile=get_profile("llama3-8b-h100"), seed=seed,
                   pd=PDConfig(prefill_replicas=prefill, decode_replicas=decode),
                   pd_plans=[plan_named(p) for p in plans])
    return {"workload": workload, "seed": seed, "ideal_hit_rate": doc["ideal_hit_rate"],
            "results": [{"plan": r["policy"], **{k: r[k] for k in FIGURES}, "pd": r["pd"], "wall_s": r["wall_s"]}
                        for r in doc["results"]]}


def run(*, workloads: Sequence[str] = (*WORKLOADS, "mooncake"), seeds: int = 3, prefill: int = 4, decode: int = 4,
        plans: Sequence[str] | None = None, jobs: int = 2, trace: str | None = None,
        progress: Callable[[str], None] | None = None, first_seed: int = 0) -> dict[str, Any]:
    """The league: every plan on each workload at seeds ``first_seed`` .. ``first_seed +
    seeds - 1`` (the Mooncake trace once: it has no seed). Other seeds than the default
    check a choice made on the default ones out of sample."""
    from simulator.pd import PLANS, plan_named

    plans = list(plans or PLANS)
    for name in plans:
        plan_named(name)
    for name in workloads:
        if name not in WORKLOADS and name != "mooncake":
            raise ConfigError("workload", f"unknown workload {name!r} (valid: {', '.join(WORKLOADS)}, mooncake)")
    trace = trace or str(TRACE)
    if "mooncake" in workloads and not Path(trace).is_file():
        raise ConfigError("trace", f"{trace} not found (the mooncake workload replays it)")
    if seeds < 1 or jobs < 1:
        raise ConfigError("seeds", "seeds and jobs must be >= 1")
    if isinstance(first_seed, bool) or not isinstance(first_seed, int) or first_seed < 0:
        raise ConfigError("first_seed", f"must be an integer >= 0, got {first_seed!r}")
    generated = range(first_seed, first_seed + seeds)
    tasks = [(w, s, prefill, decode, plans, trace) for w in workloads for s in (generated if w != "mooncake" else [0])]
    runs = []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for done in pool.map(_one, tasks):
            runs.append(done)
            if progress:
                progress(f"{done['workload']} seed {done['seed']}: done")
    return {"benchmark": "pd", "prefill_replicas": prefill, "decode_replicas": decode, "profile": "llama3-8b-h100",
            "link_gbytes_per_s": 50.0, "plans": {p: _plan_doc(plan_named(p)) for p in plans},
            "workloads": {w: {"requests": WORKLOADS[w][0], "rate_per_s": WORKLOADS[w][1]} if w in WORKLOADS else
                          {"trace": Path(trace).name, "kv_blocks": MOONCAKE_KV_BLOCKS} for w in workloads},
            "runs": runs, "summary": summarize(runs)}


def _plan_doc(plan) -> dict[str, Any]:
    return {"prefill": plan.prefill, "decode": plan.decode, "rule": plan.rule,
            "max_local_prefill_tokens": plan.max_local_prefill_tokens,
            "max_local_uncached_ratio": plan.max_local_uncached_ratio,
            "interference_weight": plan.interference_weight,
            "prefill_options": dict(plan.prefill_options), "decode_options": dict(plan.decode_options)}


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """workload -> plan -> mean of each figure over the seeds, and the number of seeds on
    which the plan had the best TTFT p99 and a hit rate within 0.5 points of the best."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    by_workload: dict[str, list[dict]] = {}
    for run_ in runs:
        by_workload.setdefault(run_["workload"], []).append(run_)
    for workload, group in by_workload.items():
        rows: dict[str, dict[str, Any]] = {}
        for run_ in group:
            best_p99 = min(r["ttft_p99_s"] for r in run_["results"])
            best_hit = max(r["hit_rate"] for r in run_["results"])
            for r in run_["results"]:
                row = rows.setdefault(r["plan"], {"values": [], "best_p99": 0, "hit_within_half_point": 0})
                row["values"].append(r)
                row["best_p99"] += r["ttft_p99_s"] == best_p99
                row["hit_within_half_point"] += r["hit_rate"] >= best_hit - 0.005
        out[workload] = {}
        for plan, row in rows.items():
            values = row.pop("values")
            means = {k: round(statistics.fmean(v[k] for v in values), 6) for k in FIGURES}
            means.update({k: round(statistics.fmean(v["pd"][k] for v in values), 4) for k in PD_FIGURES})
            out[workload][plan] = {**means, **row, "seeds": len(values)}
    return out


def format_table(report: dict[str, Any]) -> str:
    lines = [f"PD league (simulated): {report['prefill_replicas']} prefill + {report['decode_replicas']} decode "
             f"replicas, {report['profile']}, {report['link_gbytes_per_s']:g} GB/s KV link; means over seeds; "
             "'best p99' = seeds with the lowest TTFT p99, 'hit ok' = seeds within 0.5 points of the best hit rate"]
    for workload, plans in report["summary"].items():
        lines.append(f"-- {workload}")
        lines.append(f"{'plan':<20} {'hit %':>6} {'ttft p50':>9} {'p99 ms':>8} {'tpot ms':>8} {'local':>7} "
                     f"{'P max/fair':>10} {'D max/fair':>10} {'best p99':>9} {'hit ok':>7}")
        for plan, r in plans.items():
            lines.append(f"{plan:<20} {r['hit_rate'] * 100:>6.1f} {r['ttft_p50_s'] * 1e3:>9.0f} "
                         f"{r['ttft_p99_s'] * 1e3:>8.0f} {r['tpot_p50_s'] * 1e3:>8.1f} {r['local']:>7.0f} "
                         f"{r['prefill_max_share_of_fair']:>10.2f} {r['decode_max_share_of_fair']:>10.2f} "
                         f"{r['best_p99']:>5}/{r['seeds']:<3} {r['hit_within_half_point']:>3}/{r['seeds']:<3}")
    return "\n".join(lines)

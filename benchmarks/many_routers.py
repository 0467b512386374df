"""``kvroute bench routers``: does routing on several independent routers lose cache hits?

In Ray Serve every proxy routes on its own: each holds its own ``RoutingCore``. The
simulator's ``routers`` option models that (``simulator.cluster``): arrivals are spread
over the routers round-robin; each router learns what it routed itself (speculative tree
entries, session pins, in-flight load: all its own) and, like every other router, every
replica's KV events after ``kv_event_delay_s`` and load reports every
``report_interval_s``. The routers therefore agree on what the engines have *confirmed*
(the same events, applied in the same order, after the same delay) and differ in what each
learnt alone: a request routed by router A is invisible to router B's tree until the
engine stores its blocks (when the request is first scheduled, which can be seconds later
behind a queue) plus the event delay; B never sees A's in-flight count except through the
engines' reports; and a policy that keeps state (preble's prefill history) keeps one per
router.

This module replays each workload with 1 and with N routers per policy and reports the
hit-rate difference (target: within ``TARGET_PP`` percentage points), then, to explain
any gap, sweeps the KV-event delay (and KV events off), the load-report interval, and
runs, for each policy that misses the target, diagnostic clusters that share what
independent routers cannot: every routing decision's speculative insert applied on every
router, one policy object (its internal state) shared by every router, or one load view
(every router's in-flight requests); then with load reports ten times as often, and for
cache_aware without its KV barrier.
A gap that closes when guesses are shared comes from the per-router speculative view; one
that closes with a shared policy from the policy's own per-router state; one that closes
with a shared load view from each router seeing only its own share of the load.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import policies
from router.profile import DEFAULT_PROFILE
from simulator.cluster import Cluster, ClusterConfig, replay
from simulator.kernel import Kernel
from simulator.metrics import RunMetrics
from simulator.run import DEFAULT_RATE, DEFAULT_REQUESTS, DEFAULT_WORKLOAD, KeyCache
from simulator.workloads import load_trace, make_workload

TARGET_PP = 2.0
DEFAULT_POLICIES = ("cache_aware", "sglang", "ray_prefix", "llmd", "dynamo", "preble")
SWEEP_POLICIES = ("cache_aware", "ray_prefix", "preble", "dynamo")
KV_EVENT_DELAYS = (0.0, 0.01, 0.1, 1.0, 10.0)
REPORT_INTERVALS = (0.1, 1.0, 5.0)
SHARED_TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake_synthetic_trace.jsonl"

#: What each run keeps of the simulator's result row.
ROW_FIELDS = ("hit_rate", "ttft_p50_s", "ttft_p99_s", "max_share_of_fair", "completed", "evictions")


@dataclass(frozen=True)
class WorkloadSpec:
    """One workload to compare on: a Mooncake trace, or a generated workload."""

    label: str
    trace: str | Path | None = None
    workload: str | None = None
    requests: int | None = None
    rate_per_s: float = DEFAULT_RATE
    replicas: int = 8
    block_size: int = 16
    kv_blocks: int | None = None

    def load(self, seed: int):
        if self.trace is not None:
            reqs = load_trace(str(self.trace), "mooncake")
            return reqs[:self.requests] if self.requests else reqs
        return list(make_workload(self.workload or DEFAULT_WORKLOAD, self.requests or DEFAULT_REQUESTS, seed=seed,
                                  rate_per_s=self.rate_per_s))

    def config(self, seed: int) -> ClusterConfig:
        return ClusterConfig(replicas=self.replicas, block_size=self.block_size, kv_blocks=self.kv_blocks,
                             profile=DEFAULT_PROFILE, seed=seed)


#: The shared trace (as the league runs it), ``kvroute simulate``'s default workload, and
#: the same mix on half the replicas with small caches, where queues form and caches evict.
STANDARD_WORKLOADS = (
    WorkloadSpec("mooncake_trace", trace=SHARED_TRACE, replicas=8, block_size=512, kv_blocks=2000),
    WorkloadSpec(f"workload:{DEFAULT_WORKLOAD} (simulate's default)", workload=DEFAULT_WORKLOAD,
                 requests=DEFAULT_REQUESTS, rate_per_s=DEFAULT_RATE, replicas=8),
    WorkloadSpec(f"workload:{DEFAULT_WORKLOAD}, tight caches", workload=DEFAULT_WORKLOAD, requests=1500,
                 rate_per_s=100.0, replicas=4, kv_blocks=2000),
)

#: Diagnostic runs for a policy that misses the target: (label, what the routers share
#: (``run_once`` switches: never how a deployment works), policy options per policy (the
#: diagnosis runs only for the policies named; None: every policy), cluster changes).
DIAGNOSES = (
    ("shared speculative inserts", {"share_speculative": True}, None, {}),
    ("shared policy state", {"share_policy": True}, None, {}),
    ("shared load view", {"share_load": True}, None, {}),
    ("load reports every 0.1 s", {}, None, {"report_interval_s": 0.1}),
    ("kv_barrier_s=0", {}, {"cache_aware": {"kv_barrier_s": 0.0}}, {}),
)


def run_once(requests, keys: KeyCache, config: ClusterConfig, policy: str, *,
             policy_options: dict[str, Any] | None = None, share_speculative: bool = False,
             share_policy: bool = False, share_load: bool = False) -> dict[str, Any]:
    """One policy on a fresh cluster; the ``share_`` switches are the diagnostics (never
    how a deployment works): every router applies every routing decision's speculative
    insert, every router uses router 0's policy object, or every router uses router 0's
    load view (so each sees every router's requests in flight)."""
    kernel = Kernel()
    metrics = RunMetrics()
    cluster = Cluster(kernel, config, policy, policy_options, metrics=metrics)
    routers = cluster.routers
    for router in routers[1:]:
        if share_policy:
            router.policy = routers[0].policy
        if share_load:
            router.load = routers[0].load
    if share_speculative and len(routers) > 1:
        for index, router in enumerate(routers):
            others = [r for i, r in enumerate(routers) if i != index]

            def route(request, now, candidates=None, _route=router.route, _others=others):
                decision = _route(request, now, candidates)
                if decision.replica is not None:
                    for other in _others:
                        other.tree.insert(decision.replica, request.keys, now)
                return decision
            router.route = route
    started = time.perf_counter()
    replay(cluster, requests, keys)
    row = {**metrics.summary(), **cluster.engine_totals()}
    out = {name: row[name] for name in ROW_FIELDS}
    out["wall_s"] = round(time.perf_counter() - started, 3)
    return out


def _pp(one: dict[str, Any], many: dict[str, Any]) -> float:
    return round((one["hit_rate"] - many["hit_rate"]) * 100, 2)


def compare(requests, keys: KeyCache, base: ClusterConfig, policy: str, routers: int, **options: Any) -> dict[str, Any]:
    """The same run with 1 and with ``routers`` routers: both rows and the drop in points
    (positive: fewer hits with more routers). ``options`` go to ``run_once``."""
    one = run_once(requests, keys, replace(base, routers=1), policy, **options)
    many = run_once(requests, keys, replace(base, routers=routers), policy, **options)
    drop = _pp(one, many)
    return {"policy": policy, "one_router": one, "many_routers": many, "hit_rate_drop_pp": drop,
            "within_target": abs(drop) <= TARGET_PP}


def run(*, policies_to_run: Sequence[str] = DEFAULT_POLICIES, routers: int = 4,
        workloads: Sequence[WorkloadSpec] = STANDARD_WORKLOADS, seed: int = 0, sweeps: bool = True,
        sweep_policies: Sequence[str] = SWEEP_POLICIES,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """1 vs ``routers`` routers per policy on each workload (a trace that is not found is
    skipped and listed). With ``sweeps``: on the first workload, the KV-event delay and
    load-report interval sweeps; on every workload, the diagnoses of each policy whose
    drop misses the target."""
    for name in list(policies_to_run) + list(sweep_policies if sweeps else ()):
        policies.policy_class(name)  # an unknown name fails before any run
    say = progress or (lambda message: None)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "many_routers", "routers": routers, "target_pp": TARGET_PP, "seed": seed,
        "python": sys.version.split()[0], "machine": platform.machine(), "workloads": [], "skipped": [],
    }
    loaded = []
    for spec in workloads:
        if spec.trace is not None and not Path(spec.trace).is_file():
            report["skipped"].append({"workload": spec.label, "reason": f"{spec.trace} not found"})
            continue
        reqs = spec.load(seed)
        config = spec.config(seed)
        loaded.append((spec, reqs, config, KeyCache(reqs, config.block_size)))
    for spec, reqs, config, keys in loaded:
        rows = []
        for policy in policies_to_run:
            say(f"{spec.label}: {policy}, 1 vs {routers} routers ...")
            rows.append(compare(reqs, keys, config, policy, routers))
        entry = {"workload": spec.label, "requests": len(reqs), "replicas": config.replicas,
                 "block_size": config.block_size, "kv_blocks": config.blocks_per_replica,
                 "kv_event_delay_s": config.kv_event_delay_s, "report_interval_s": config.report_interval_s,
                 "results": rows}
        if sweeps:
            entry["diagnosis"] = []
            for row in rows:
                if row["within_target"]:
                    continue
                policy = row["policy"]
                for mode, share, options, changes in DIAGNOSES:
                    if options is not None and policy not in options:
                        continue
                    say(f"{spec.label}: {policy}, {mode} ...")
                    diag = compare(reqs, keys, replace(config, **changes), policy, routers,
                                   policy_options=(options or {}).get(policy), **share)
                    entry["diagnosis"].append({"policy": policy, "mode": mode, **_brief(diag)})
        report["workloads"].append(entry)
    if sweeps and loaded:
        spec, reqs, config, keys = loaded[0]
        delay_rows = []
        for policy in sweep_policies:
            for delay in KV_EVENT_DELAYS:
                say(f"{spec.label}: {policy}, KV events after {delay:g} s ...")
                row = compare(reqs, keys, replace(config, kv_event_delay_s=delay), policy, routers)
                delay_rows.append({"policy": policy, "kv_events": True, "kv_event_delay_s": delay, **_brief(row)})
            say(f"{spec.label}: {policy}, no KV events ...")
            row = compare(reqs, keys, replace(config, kv_events=False), policy, routers)
            delay_rows.append({"policy": policy, "kv_events": False, "kv_event_delay_s": None, **_brief(row)})
        report_rows = []
        for policy in sweep_policies:
            for interval in REPORT_INTERVALS:
                say(f"{spec.label}: {policy}, load reports every {interval:g} s ...")
                row = compare(reqs, keys, replace(config, report_interval_s=interval), policy, routers)
                report_rows.append({"policy": policy, "report_interval_s": interval, **_brief(row)})
        report["sweeps_workload"] = spec.label
        report["kv_event_delay_sweep"] = delay_rows
        report["report_interval_sweep"] = report_rows
    report["within_target"] = {
        policy: {w["workload"]: next(r["within_target"] for r in w["results"] if r["policy"] == policy)
                 for w in report["workloads"]}
        for policy in policies_to_run}
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    one, many = row["one_router"], row["many_routers"]
    return {"hit_rate_1": one["hit_rate"], "hit_rate_n": many["hit_rate"], "hit_rate_drop_pp": row["hit_rate_drop_pp"],
            "ttft_p99_s_1": one["ttft_p99_s"], "ttft_p99_s_n": many["ttft_p99_s"],
            "max_share_of_fair_1": one["max_share_of_fair"], "max_share_of_fair_n": many["max_share_of_fair"]}


def format_table(report: dict[str, Any]) -> str:
    n = report["routers"]
    lines = [f"kvroute bench routers: 1 vs {n} routers, target within {report['target_pp']:g} points of hit rate"]
    for skipped in report.get("skipped", []):
        lines.append(f"skipped {skipped['workload']}: {skipped['reason']}")
    for w in report["workloads"]:
        lines.append(f"{w['workload']} ({w['requests']} requests, {w['replicas']} replicas x {w['kv_blocks']} blocks "
                     f"of {w['block_size']} tokens, KV events after {w['kv_event_delay_s']:g} s)")
        lines.append(f"  {'policy':<12} {'hit % 1':>8} {f'hit % {n}':>8} {'drop pp':>8} {'p99 ms 1':>9} "
                     f"{f'p99 ms {n}':>9} {'ok':>4}")
        for r in w["results"]:
            one, many = r["one_router"], r["many_routers"]
            lines.append(f"  {r['policy']:<12} {one['hit_rate'] * 100:>8.2f} {many['hit_rate'] * 100:>8.2f} "
                         f"{r['hit_rate_drop_pp']:>8.2f} {one['ttft_p99_s'] * 1000:>9.0f} "
                         f"{many['ttft_p99_s'] * 1000:>9.0f} {'yes' if r['within_target'] else 'NO':>4}")
        if w.get("diagnosis"):
            lines.append("  diagnosis of the misses (never a deployment): drop in points when routers share ...")
            for r in w["diagnosis"]:
                lines.append(f"    {r['policy']:<12} {r['mode']:<27} {r['hit_rate_1'] * 100:>6.2f} -> "
                             f"{r['hit_rate_n'] * 100:>6.2f} ({r['hit_rate_drop_pp']:+.2f})")
    if "kv_event_delay_sweep" in report:
        lines.append(f"KV-event delay sweep ({report['sweeps_workload']}): drop in points, 1 vs {n} routers")
        for r in report["kv_event_delay_sweep"]:
            what = f"after {r['kv_event_delay_s']:g} s" if r["kv_events"] else "no KV events"
            lines.append(f"  {r['policy']:<12} {what:<16} {r['hit_rate_1'] * 100:>6.2f} -> {r['hit_rate_n'] * 100:>6.2f} "
                         f"({r['hit_rate_drop_pp']:+.2f})")
        lines.append("load-report interval sweep: TTFT p99 1 -> n routers")
        for r in report["report_interval_sweep"]:
            lines.append(f"  {r['policy']:<12} every {r['report_interval_s']:<5g} s  {r['ttft_p99_s_1'] * 1000:>6.0f} -> "
                         f"{r['ttft_p99_s_n'] * 1000:>6.0f} ms, drop {r['hit_rate_drop_pp']:+.2f} pp")
    return "\n".join(lines)

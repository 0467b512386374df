"""Run the policy league: the same requests, the same cluster, one fresh run per policy.

``simulate(...)`` is what ``kvroute simulate`` calls; it returns the ``--json`` document
(see the README for the schema). Everything in it except the ``wall_s`` fields is a pure
function of the arguments: the same seed gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import policies
from router.errors import ConfigError
from router.keys import DEFAULT_SEED
from router.profile import LatencyProfile
from simulator.cluster import Cluster, ClusterConfig, replay
from simulator.kernel import Kernel
from simulator.metrics import RunMetrics
from simulator.pd import PDCluster, PDConfig, PDPlan
from simulator.workloads import SimRequest, block_keys, ideal_hit_rate

#: The embedded default of ``kvroute simulate`` with no arguments: the four generated
#: workloads interleaved, at a rate that keeps 8 replicas of the default profile busy
#: enough for routing to matter (queues form behind long prefills) but not overloaded.
DEFAULT_WORKLOAD = "mixed"
DEFAULT_REQUESTS = 4000
DEFAULT_RATE = 200.0


class KeyCache:
    """Block keys of each request at one block size, computed once and shared by every
    policy's run (a list indexed by request id; O(total blocks) memory)."""

    def __init__(self, requests: Sequence[SimRequest], block_size: int, seed: int = DEFAULT_SEED) -> None:
        self.keys = [block_keys(r, block_size, seed) for r in requests]

    def __call__(self, request: SimRequest) -> list[int]:
        return self.keys[request.request_id]


def run_policy(requests: Iterable[SimRequest], config: ClusterConfig, policy: str,
               policy_options: dict[str, Any] | None = None, *,
               keys_of: Callable[[SimRequest], Sequence[int]] | None = None,
               total: int | None = None, progress: Callable[[str, int, int], None] | None = None,
               pd: tuple[PDConfig, PDPlan] | None = None) -> tuple[dict[str, Any], RunMetrics, Cluster]:
    """One policy over ``requests`` on a fresh cluster; returns (result row, metrics, cluster).
    ``pd``: a prefill-decode deployment and the plan that routes it (``simulator.pd``;
    ``policy`` is then the plan's name, and the row gains a ``pd`` entry)."""
    kernel = Kernel()
    metrics = RunMetrics()
    if pd is not None:
        cluster = PDCluster(kernel, config, pd[0], pd[1], metrics)
    else:
        cluster = Cluster(kernel, config, policy, policy_options, metrics)
    if keys_of is None:
        def keys_of(request: SimRequest, size: int = config.block_size) -> list[int]:
            return block_keys(request, size)
    on_progress = (lambda done: progress(policy, done, total or 0)) if progress else None
    started = time.perf_counter()
    replay(cluster, requests, keys_of, on_progress)
    wall = time.perf_counter() - started
    row = {"policy": policy, **metrics.summary(), **cluster.engine_totals(),
           "simulated_s": round(kernel.now, 6), "events": kernel.events_run, "wall_s": round(wall, 3)}
    stats = [r.stats for r in cluster.routers]
    row["router"] = {
        "kv_events": sum(s.kv_events for s in stats),
        "kv_events_malformed": sum(s.kv_events_malformed for s in stats),
        "kv_events_unknown_replica": sum(s.kv_events_unknown_replica for s in stats),
        "invalid_tiers": sum(s.invalid_tiers for s in stats),
    }
    if getattr(cluster, "autoscaler", None) is not None:
        row["autoscale"] = cluster.autoscale_summary()
    if pd is not None:
        row["pd"] = cluster.pd_summary()
        # Each pool's own balance: the flat figure would divide by both pools' replicas.
        shares = [row["pd"][k] for k in ("prefill_max_share_of_fair", "decode_max_share_of_fair")
                  if row["pd"][k] is not None]
        row["max_share_of_fair"] = max(shares) if shares else None
    return row, metrics, cluster


def simulate(requests: Sequence[SimRequest], *, trace: str, replicas: int, policies_to_run: Sequence[str],
             block_size: int, kv_blocks: int | None, profile: LatencyProfile, routers: int = 1,
             seed: int = 0, policy_options: dict[str, dict[str, Any]] | None = None,
             cluster_options: dict[str, Any] | None = None,
             progress: Callable[[str, int, int], None] | None = None,
             keep_series: bool = False, pd: PDConfig | None = None,
             pd_plans: Sequence[PDPlan] = ()) -> dict[str, Any]:
    """The league on one list of requests: a result row per policy, plus the ceiling.
    With ``pd``, a prefill-decode deployment (``replicas`` is then ignored) and a row per
    plan of ``pd_plans`` instead of per policy."""
    if not requests:
        raise ConfigError("trace", "no requests to simulate")
    for name in policies_to_run:
        policies.policy_class(name)  # an unknown name fails here, before any run
    if pd is not None:
        if not pd_plans:
            raise ConfigError("pd_plan", "a PD deployment needs at least one plan")
        replicas = pd.prefill_replicas + pd.decode_replicas
        plans = {plan.name: plan for plan in pd_plans}
        policies_to_run = list(plans)
    config = ClusterConfig(replicas=replicas, routers=routers, block_size=block_size, kv_blocks=kv_blocks,
                           profile=profile, seed=seed, **(cluster_options or {}))
    keys = KeyCache(requests, block_size)
    ideal = ideal_hit_rate(requests, block_size)
    results = []
    series = {}
    for name in policies_to_run:
        row, metrics, _ = run_policy(requests, config, name, (policy_options or {}).get(name),
                                     keys_of=keys, total=len(requests), progress=progress,
                                     pd=(pd, plans[name]) if pd is not None else None)
        results.append(row)
        if keep_series:
            series[name] = {"series": metrics.time_series(), "ttft": sorted(metrics.ttft)}
    doc = {
        "trace": trace,
        "replicas": replicas,
        "routers": routers,
        "block_size": block_size,
        "kv_blocks": config.blocks_per_replica,
        "profile": profile.name,
        "seed": seed,
        "requests": len(requests),
        "ideal_hit_rate": round(ideal["tokens"], 6),
        "ideal_hit_rate_blocks": round(ideal["blocks"], 6),
        "results": results,
    }
    if pd is not None:
        doc["pd"] = dataclasses.asdict(pd)
        doc["pd_plans"] = {plan.name: {**dataclasses.asdict(plan), "prefill_options": dict(plan.prefill_options),
                                       "decode_options": dict(plan.decode_options)} for plan in pd_plans}
    if config.host_slots is not None:  # replicas sharing one machine's compute
        doc["host_slots"] = config.host_slots
        if config.replicas_per_host is not None:
            doc["replicas_per_host"] = config.replicas_per_host
    if keep_series:
        doc["_series"] = series  # for plots; removed before writing JSON
    return doc


def fair_share_ok(row: dict[str, Any], limit: float = 1.5) -> bool:
    """Whether no replica took more than ``limit`` times its fair share of requests."""
    share = row.get("max_share_of_fair")
    return share is not None and share <= limit + 1e-9 and not math.isnan(share)

"""``kvroute bench simulator``: simulated requests per second of wall time, by run size.

Generates 10k, 100k and 1M requests of a seeded workload (streamed: never held in memory at
once), replays each through 8 replicas with one policy, and reports wall time, simulated
requests per second and peak traced memory per size. Cost should grow linearly: the
``per_request_us`` column stays flat and ``growth_vs_smallest`` near 1. When the shared
Mooncake trace is found it also times two full replays of it through 8 replicas: in the
trace's own 512-token blocks (2,000 per replica), and in vLLM's 16-token engine blocks with
1M-token caches (62,500 blocks per replica), where every trace block is 32 engine blocks and
the simulator's per-block work (block pool, KV events, the routers' trees) dominates.
"""

from __future__ import annotations

import platform
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from router.profile import get_profile
from simulator.cluster import ClusterConfig
from simulator.run import run_policy
from simulator.workloads import load_trace, make_workload

SIZES = (10_000, 100_000, 1_000_000)
SHARED_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mooncake_synthetic_trace.jsonl"


def _one(count: int, *, workload: str, policy: str, rate: float, seed: int, replicas: int,
         memory: bool) -> dict[str, Any]:
    config = ClusterConfig(replicas=replicas, block_size=16, profile=get_profile("llama3-8b-h100"), seed=seed)
    requests = make_workload(workload, count, seed=seed, rate_per_s=rate)
    if memory:
        tracemalloc.start()
    started = time.perf_counter()
    row, metrics, _ = run_policy(requests, config, policy)
    wall = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] if memory else None
    if memory:
        tracemalloc.stop()
    return {"requests": count, "completed": row["completed"], "wall_s": round(wall, 3),
            "requests_per_s": round(count / wall, 1), "per_request_us": round(wall / count * 1e6, 2),
            "simulated_s": row["simulated_s"], "events": row["events"], "hit_rate": row["hit_rate"],
            "peak_traced_mib": round(peak / 2**20, 1) if peak is not None else None}


def run(*, sizes=SIZES, workload: str = "system-prompts", policy: str = "cache_aware", rate: float = 40.0,
        seed: int = 0, replicas: int = 8, memory: bool = False, trace: Path | None = SHARED_TRACE,
        progress=None) -> dict[str, Any]:
    rows = []
    for count in sizes:
        if progress:
            progress(f"{count:,} requests ...")
        rows.append(_one(count, workload=workload, policy=policy, rate=rate, seed=seed, replicas=replicas,
                         memory=memory))
    base = rows[0]["per_request_us"]
    for row in rows:
        row["growth_vs_smallest"] = round(row["per_request_us"] / base, 3)
    report: dict[str, Any] = {
        "benchmark": "simulator", "workload": workload, "policy": policy, "rate_per_s": rate,
        "replicas": replicas, "seed": seed, "python": sys.version.split()[0], "machine": platform.machine(),
        "results": rows,
    }
    if trace is not None and Path(trace).is_file():
        if progress:
            progress("Mooncake trace replay ...")
        requests = load_trace(str(trace), "mooncake")
        for key, block_size, kv_blocks in (("mooncake_trace", 512, 2000), ("mooncake_trace_16", 16, 62_500)):
            config = ClusterConfig(replicas=8, block_size=block_size, kv_blocks=kv_blocks, seed=seed)
            started = time.perf_counter()
            row, _, _ = run_policy(requests, config, policy)
            wall = time.perf_counter() - started
            report[key] = {"requests": len(requests), "replicas": 8, "kv_blocks": kv_blocks,
                           "block_size": block_size, "wall_s": round(wall, 3),
                           "requests_per_s": round(len(requests) / wall, 1),
                           "hit_rate": row["hit_rate"], "ttft_p99_s": row["ttft_p99_s"]}
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"kvroute bench simulator: workload {report['workload']}, policy {report['policy']}, "
             f"{report['replicas']} replicas, {report['rate_per_s']:g} req/s simulated",
             f"{'requests':>10} {'wall s':>8} {'req/s':>9} {'us/req':>8} {'growth':>7} {'events':>10} {'hit %':>6}"]
    for r in report["results"]:
        lines.append(f"{r['requests']:>10,} {r['wall_s']:>8.1f} {r['requests_per_s']:>9,.0f} {r['per_request_us']:>8.1f} "
                     f"{r['growth_vs_smallest']:>7.2f} {r['events']:>10,} {r['hit_rate'] * 100:>6.1f}")
    for key in ("mooncake_trace", "mooncake_trace_16"):
        trace = report.get(key)
        if trace:
            lines.append(f"Mooncake trace ({trace['requests']} requests, 8 replicas x {trace['kv_blocks']} blocks "
                         f"of {trace['block_size']} tokens): {trace['wall_s']:.2f} s wall "
                         f"({trace['requests'] / trace['wall_s']:,.0f} req/s), hit {trace['hit_rate'] * 100:.1f}%")
    return "\n".join(lines)

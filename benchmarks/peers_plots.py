"""Plots of a ``kvroute bench peers`` report (``--plot DIR``); needs ``kvroute[plot]``.

Drawn from the report's JSON alone, so a committed result can be drawn again::

    python -m benchmarks.peers_plots benchmarks/results/peers_chat_pinned_5seeds_defer.json DIR

* ``peers_ttft_cdf.png``: each router's TTFT distribution as the client saw it (its 99
  percentiles, ``ttft_percentiles_s``; over several seeds, their mean per percentile), on
  a log axis: where the routers differ, at the median or only in the tail.
* ``peers_summary.png``: per router, the engines' hit rate (bars: the mean over the seeds,
  dots: each seed; the dashed line: one infinite cache's ceiling), TTFT p50 and p99, the
  mean TTFT split into the engines' own and the rest (gateway, client, the servers' HTTP
  front ends; gateway rows only: vLLM's histogram is read on the servers the gateways
  front) and each replica's share of the requests.

Rows that failed are left out. O(routers x percentiles).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from simulator.plots import pyplot

TTFT_CDF = "peers_ttft_cdf.png"
SUMMARY = "peers_summary.png"


def _title(report: dict[str, Any]) -> str:
    w, d = report["workload"], report["deployment"]
    seeds = w.get("seeds") or [w.get("seed")]
    return (f"{w.get('trace') or w.get('name')}: {w['requests']} requests"
            + (f" x {len(seeds)} seeds" if len(seeds) > 1 else "")
            + f", {d['replicas']} vLLM workers, {d['kv_blocks_per_replica']} blocks of {d['block_size']}")


def _ttft_cdf(plt, report: dict[str, Any], curves: list[tuple[str, list[float]]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in curves:
        ax.plot([max(v, 1e-4) * 1e3 for v in points], [(i + 1) / 100 for i in range(len(points))],
                label=name, linewidth=1.3)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token, as the client saw it (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(_title(report), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path = out / TTFT_CDF
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(report: dict[str, Any], directory: str | Path) -> list[Path]:
    """Write ``peers_ttft_cdf.png`` (when the rows have TTFT percentiles) and
    ``peers_summary.png`` for ``report`` into ``directory`` (created); the paths written."""
    plt = pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in report["results"] if "error" not in r]
    written = []

    curves = [(row["router"], row["ttft_percentiles_s"]) for row in rows if row.get("ttft_percentiles_s")]
    if curves:  # (reports written before the percentiles were kept have none: no CDF)
        written.append(_ttft_cdf(plt, report, curves, out))

    names = [r["router"] for r in rows]
    x = list(range(len(rows)))
    fig, ((hit, ttft), (split, share)) = plt.subplots(2, 2, figsize=(12, 8))
    hit.bar(x, [100 * (r.get("hit_rate") or 0) for r in rows], color="tab:blue", alpha=0.7)
    for i, row in enumerate(rows):
        by_seed = [v for v in row.get("hit_rate_by_seed") or () if v is not None]
        hit.scatter([i] * len(by_seed), [100 * v for v in by_seed], color="black", s=12, zorder=3)
    if report.get("ideal_hit_rate") is not None:
        hit.axhline(100 * report["ideal_hit_rate"], color="grey", linestyle="--", linewidth=1,
                    label="one infinite cache")
        hit.legend(fontsize=8)
    hit.set_ylabel("engines' prefix-cache hit rate (%)")
    width = 0.4
    ttft.bar([i - width / 2 for i in x], [1e3 * (r.get("ttft_p50_s") or 0) for r in rows], width, label="p50")
    ttft.bar([i + width / 2 for i in x], [1e3 * (r.get("ttft_p99_s") or 0) for r in rows], width, label="p99")
    ttft.set_ylabel("TTFT (ms)")
    ttft.legend(fontsize=8)
    engine = [1e3 * (r.get("engine_ttft_mean_s") or 0) for r in rows]
    outside = [1e3 * (r.get("outside_engine_ttft_mean_s") or 0) for r in rows]
    split.bar(x, engine, label="in the engines (vLLM's own)")
    split.bar(x, outside, bottom=engine, label="outside them (gateway, client, HTTP front ends)")
    split.set_ylabel("mean TTFT (ms)")
    split.legend(fontsize=8)
    replicas = sorted({name for r in rows for name in r.get("replica_share") or {}})
    bottom = [0.0] * len(rows)
    for replica in replicas:
        values = [(r.get("replica_share") or {}).get(replica, 0.0) for r in rows]
        share.bar(x, values, bottom=bottom, label=replica)
        bottom = [b + v for b, v in zip(bottom, values)]
    share.set_ylabel("share of the requests")
    if len(replicas) <= 8:
        share.legend(fontsize=7)
    for ax in (hit, ttft, split, share):
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(_title(report), fontsize=10)
    fig.tight_layout()
    path = out / SUMMARY
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks.peers_plots REPORT.json DIR", file=sys.stderr)
        return 2
    for path in plot(json.loads(Path(argv[0]).read_text()), argv[1]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

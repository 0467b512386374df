"""Plots of a simulation (``kvroute simulate --plot DIR``); needs ``kvroute[plot]``.

* ``ttft_cdf.png``: TTFT CDF of every policy on one log-x axis.
* ``replicas_<policy>.png``: per replica, its hit rate and its share of requests over time
  (buckets of arrival time), the view that shows a hot prefix collapsing onto one replica.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from router.errors import ConfigError


def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no display); a ConfigError naming
    the extra to install when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plot", "plots need matplotlib: pip install 'kvroute[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plots(doc: dict[str, Any], series: dict[str, Any], directory: str) -> list[Path]:
    plt = pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, data in series.items():
        ttft = data["ttft"]
        if not ttft:
            continue
        n = len(ttft)
        ax.plot([max(t, 1e-4) for t in ttft], [(i + 1) / n for i in range(n)], label=name, linewidth=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT CDF: {doc['trace']}, {doc['replicas']} replicas")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    path = out / "ttft_cdf.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    for name, data in series.items():
        ts = data["series"]
        buckets = ts["buckets"]
        if not buckets:
            continue
        times = [b["t_s"] for b in buckets]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        for index, replica in enumerate(ts["replicas"]):
            top.plot(times, [b["hit_rate"][index] for b in buckets], label=replica, linewidth=1)
            bottom.plot(times, [b["share"][index] for b in buckets], label=replica, linewidth=1)
        bottom.axhline(1 / max(1, len(ts["replicas"])), color="black", linestyle="--", linewidth=0.8,
                       label="fair share")
        top.set_ylabel("hit rate (tokens)")
        bottom.set_ylabel("share of requests")
        bottom.set_xlabel(f"arrival time (s, buckets of {ts['bucket_s']:g} s)")
        top.set_title(f"{name}: per-replica hit rate and load share")
        bottom.legend(fontsize=7, ncol=4)
        path = out / f"replicas_{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written

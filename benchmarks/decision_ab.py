"""One decision's loop time at two commits, alternated: ``decision_phases`` A/B.

``kvroute bench serve-path`` ends with ``decision_phases`` (one decision at a time, in
process, by phase). On a shared 2-vCPU machine its medians move by 1.5x between runs an
hour apart, so comparing a change with the figures of an earlier run measures the
machine. This script runs ``decision_phases`` from two checkouts of kvroute (any commit
that has it, fe0923f or later) one after the other, ``--rounds`` times, in fresh
processes, on the same generated workloads, and prints the median over rounds of each
phase's p50 (and of the p99 total)::

    git worktree add /tmp/kvroute-base f0a5d60
    .venv/bin/python benchmarks/decision_ab.py /tmp/kvroute-base . --rounds 5 --json out.json

Each round runs both checkouts back to back (the order alternates), so a slow phase of
the machine hits both alike. The checkouts must have their C extensions built (copy
``router/*.so`` into a worktree, or ``pip install -e`` it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PHASES = ("parse_us_p50", "tokenized_us_p50", "key_us_p50", "rank_us_p50", "total_us_p50", "total_us_p99",
          "routed_us_p50")

#: Run in a fresh process with the checkout first on sys.path.
_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from benchmarks.serve_path import build_workload, decision_phases
from engines.bench_tokenizer import build_bench_tokenizer
tokenizer = str(build_bench_tokenizer("llama3"))
workloads = [build_workload(kind, int(size), requests=int(sys.argv[2])) for kind, size in
             (name.split(":") for name in sys.argv[3].split(","))]
print(json.dumps(decision_phases(tokenizer, workloads)))
"""


def run_once(root: Path, requests: int, workloads: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(root.absolute()), str(requests), workloads],
                         check=True, capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _commit(root: Path) -> str:
    """The checkout's commit (and whether it has changes), or its path when not a git
    checkout."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(root)
    return head + (" (with changes)" if dirty else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="checkout of the earlier commit")
    parser.add_argument("after", type=Path, help="checkout of the later commit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=576)
    parser.add_argument("--workloads", default="chat:100000,agent:100000",
                        help="KIND:SIZE,... (default chat:100000,agent:100000)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    runs: dict[str, list[list[dict]]] = {"before": [], "after": []}
    for i in range(args.rounds):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        for name in order:
            runs[name].append(run_once(getattr(args, name), args.requests, args.workloads))
            print(f"round {i + 1}/{args.rounds}: {name} done", file=sys.stderr)
    report: dict = {"before": _commit(args.before), "after": _commit(args.after), "rounds": args.rounds,
                    "requests": args.requests, "medians": {}}
    for name, rounds in runs.items():
        for w, first in enumerate(rounds[0]):
            report["medians"].setdefault(first["workload"], {})[name] = {
                phase: round(statistics.median(r[w][phase] for r in rounds), 1) for phase in PHASES
                if phase in first}  # ``routed`` is timed from commit b586921 on
    for workload, sides in report["medians"].items():
        for name, row in sides.items():
            print(f"{workload:12s} {name:6s} " + "  ".join(f"{p.replace('_us', '')} {v}" for p, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

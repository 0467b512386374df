"""The simulator's speed at two commits, alternated, and whether their results are equal.

On a shared 2-vCPU machine the same run's wall time moves by 1.5x between runs an hour
apart, so a speed-up is measured against the earlier commit in the same session, round
after round, in fresh processes (the order alternates). Each round replays, through 8
replicas under one policy:

* the shared Mooncake trace in vLLM's 16-token blocks with 1M-token caches (62,500 blocks
  per replica) and in its own 512-token blocks (2,000 blocks per replica);
* generated workloads (``system-prompts``, ``mixed``, ``chat``; 10,000 requests at 40/s).

Wall time covers ``run_policy`` (block keys included, as ``kvroute bench simulator``
times it). Every result row but its wall time and the kernel's event count (``events``:
how the run was computed, reported beside) must be equal at both commits: the script
says which rows differ::

    git worktree add /tmp/kvroute-base <commit>    # and build its C extensions there
    .venv/bin/python benchmarks/sim_ab.py /tmp/kvroute-base . --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.decision_ab import _commit

#: Run in a fresh process with the checkout first on sys.path; prints one JSON line.
_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from router.profile import get_profile
from simulator.cluster import ClusterConfig
from simulator.run import run_policy
from simulator.workloads import load_trace, make_workload
policy, requests, trace = sys.argv[2], int(sys.argv[3]), sys.argv[4]
cases = []
if trace:
    loaded = load_trace(trace, "mooncake")
    cases += [("mooncake-16", loaded, dict(block_size=16, kv_blocks=62500)),
              ("mooncake-512", loaded, dict(block_size=512, kv_blocks=2000))]
for name in ("system-prompts", "mixed", "chat"):
    cases.append((name, list(make_workload(name, requests, seed=0, rate_per_s=40.0)),
                  dict(block_size=16, profile=get_profile("llama3-8b-h100"))))
out = {}
for name, reqs, options in cases:
    started = time.perf_counter()
    row, _, _ = run_policy(reqs, ClusterConfig(replicas=8, seed=0, **options), policy)
    wall = time.perf_counter() - started
    row.pop("wall_s", None)
    out[name] = {"requests_per_s": round(len(reqs) / wall, 1), "row": row}
print(json.dumps(out))
"""

TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mooncake_synthetic_trace.jsonl"


def run_once(root: Path, policy: str, requests: int, trace: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(root.absolute()), policy, str(requests), trace],
                         check=True, capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="checkout of the earlier commit")
    parser.add_argument("after", type=Path, help="checkout of the later commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policy", default="cache_aware")
    parser.add_argument("--requests", type=int, default=10_000, help="requests per generated workload")
    parser.add_argument("--trace", default=str(TRACE) if TRACE.is_file() else "",
                        help="Mooncake trace (default: ../shared/data's, when present)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(args.rounds):
        for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
            runs[name].append(run_once(getattr(args, name), args.policy, args.requests, args.trace))
            print(f"round {i + 1}/{args.rounds}: {name} done", file=sys.stderr)
    report: dict = {"before": _commit(args.before), "after": _commit(args.after), "rounds": args.rounds,
                    "policy": args.policy, "requests": args.requests, "trace": args.trace, "cases": {}}
    for case in runs["before"][0]:
        before = statistics.median(r[case]["requests_per_s"] for r in runs["before"])
        after = statistics.median(r[case]["requests_per_s"] for r in runs["after"])
        # ``events`` counts the kernel's events: how the run was computed (a change that takes
        # several engine steps as one event lowers it), not what was simulated.
        rows = [{k: v for k, v in r[case]["row"].items() if k != "events"} for side in runs.values() for r in side]
        report["cases"][case] = {"before_requests_per_s": before, "after_requests_per_s": after,
                                 "speedup": round(after / before, 2),
                                 "results_equal": all(row == rows[0] for row in rows),
                                 "kernel_events": {side: runs[side][0][case]["row"].get("events") for side in runs}}
    print(f"{'case':<16} {'before req/s':>13} {'after req/s':>12} {'speed-up':>9}  results")
    for case, c in report["cases"].items():
        print(f"{case:<16} {c['before_requests_per_s']:>13,.0f} {c['after_requests_per_s']:>12,.0f} "
              f"{c['speedup']:>8.2f}x  {'equal' if c['results_equal'] else 'DIFFER'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

"""``kvroute bench soak``: memory stays bounded under endless, never-repeating traffic.

Drives one ``RoutingCore`` (the object Serve and the simulator drive) with N requests whose
prompts and session ids are all unique (a shared, Zipf-popular system prompt followed by
blocks no other request has), at a steady simulated rate. Around it, what an engine fleet
does: each request's first token and completion arrive ``in_flight`` requests later, one in
``lost_every`` never completes (a lost completion notice), the blocks of each request are
confirmed by a KV event then, except one request in ``unconfirmed_every`` (its speculative
entries must expire or be evicted), every replica reports its load every ``report_every``
requests, and every ``restart_every`` requests one replica dies and comes back (its tree
slot, sessions and load records purged and re-created).

Every ``sample_every`` requests it records the process RSS (``/proc/self/statm``) and the
size of every table that can grow with traffic, next to the bound that is meant to hold it:

  tree.blocks / tree.entries    distinct blocks / (block, replica) entries: the replicas'
                                capacities (``kv_capacity_tokens`` / block)
  tree.entries.<replica>        each replica's entries: its capacity
  tree.speculative              unconfirmed entries: within the entries' bound
  tree.members_memo             mask -> replicas memo: 4096 (``PrefixTree._members``)
  tree.slots / free_slots / bit_replica / capacities   per replica: the replica count
  sessions                      ``max_sessions``
  load.tracked_requests         ``max_tracked_requests``
  load.replicas                 the replica count
  core.outcomes                 the fixed outcome names
  policy.<attr>                 every mutable container the policy holds, found by
                                introspection: its declared bound (``POLICY_BOUNDS``) or,
                                when none is declared, one entry per replica

The report says, per table, its largest size, its bound, whether it held and when it
filled; whether memory is flat once the tables have filled: the median RSS of the second
half of the run within ``flat_limit`` of the median from the fill to the half (and the
least-squares slope in bytes per request), and the same for Python's count of allocated
memory blocks (``sys.getallocatedblocks``: live objects, blind to the allocator's
fragmentation, so held to ``blocks_flat_limit``); and the wall time. Only the wall time,
RSS and block counts depend on the machine.
"""

from __future__ import annotations

import os
import platform
import random
import resource
import statistics
import sys
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import policies
from router.core import OUTCOMES, RoutingCore
from router.events import BlocksStored

#: Declared bounds of policy-internal containers: (policy name, attribute) -> bound, given
#: the policy object and the replica count. A container not listed here is expected to hold
#: at most one entry per replica; anything larger is reported as over its bound.
POLICY_BOUNDS: dict[tuple[str, str], Callable[[Any, int], int]] = {
    ("preble", "_history"): lambda policy, replicas: policy.config.max_history,
    ("session", "_rings"): lambda policy, replicas: _session_ring_cache_size(),
}

#: The ``PrefixTree._members`` memo is cleared when it reaches this many masks.
MEMBERS_MEMO_BOUND = 4096


def _session_ring_cache_size() -> int:
    from policies import session
    return session._RING_CACHE_SIZE


@dataclass(frozen=True)
class SoakConfig:
    """One soak run: the traffic, the bounds under test and the sampling."""

    requests: int = 1_000_000
    policy: str = "cache_aware"
    policy_options: dict[str, Any] = field(default_factory=dict)
    replicas: int = 8
    block_tokens: int = 64
    capacity_blocks: int = 8192          # per replica: the tree's bound
    max_sessions: int = 50_000
    max_tracked_requests: int = 10_000
    speculative_ttl_s: float = 300.0
    session_ttl_s: float = 1800.0
    rate_per_s: float = 1000.0           # simulated arrivals per second
    system_prompts: int = 256            # shared prefixes, Zipf(1.1) popularity
    system_blocks: tuple[int, int] = (2, 12)
    unique_blocks: tuple[int, int] = (4, 20)
    output_tokens: int = 128
    in_flight: int = 64                  # completions lag arrivals by this many requests
    lost_every: int = 10                 # one request in this many never completes
    unconfirmed_every: int = 7           # one request in this many gets no KV event
    report_every: int = 1000             # engine load reports, in requests
    restart_every: int = 100_000         # a replica dies and comes back, in requests (0: never)
    sample_every: int = 10_000
    # Growth allowed over the second half. RSS: the allocator alone moves it by a few MiB
    # (one reallocated 50,000-entry table) on a ~60 MiB process; a leak of one small
    # object per request adds 25% or more. Python's allocated blocks are exact: 1%.
    flat_limit: float = 0.10
    blocks_flat_limit: float = 0.01
    seed: int = 0


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; elsewhere the
    peak from ``getrusage``, an upper bound)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _container_size(value: Any) -> int | None:
    if isinstance(value, (dict, list, set, deque, bytearray)):
        return len(value)
    return None


class Soak:
    """The core under test plus the traffic generator around it.

    Holds the ``RoutingCore``, the queue of requests awaiting completion (at most
    ``in_flight``), and the samples taken so far (``requests / sample_every`` of them).
    Each request costs one routing decision plus one KV event; a sample costs
    O(replicas + policy attributes).
    """

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.replicas = [f"replica-{i}" for i in range(config.replicas)]
        self.core = RoutingCore.from_options(
            config.policy, policy_options=config.policy_options,
            keys={"kind": "prehashed", "block_tokens": config.block_tokens},
            kv_capacity_tokens=config.capacity_blocks * config.block_tokens,
            speculative_ttl_s=config.speculative_ttl_s, session_ttl_s=config.session_ttl_s,
            max_sessions=config.max_sessions, max_tracked_requests=config.max_tracked_requests,
            seed=config.seed)
        self.core.on_replicas_changed(self.replicas, 0.0)
        self.rng = random.Random(config.seed)
        lo, hi = config.system_blocks
        # System prompts use block ids below 2**40; unique blocks count up from 2**40.
        self.systems = [[(s << 16) | b for b in range(self.rng.randint(lo, hi))]
                        for s in range(config.system_prompts)]
        weights = [1.0 / (rank + 1) ** 1.1 for rank in range(config.system_prompts)]
        total = sum(weights)
        self.cumulative = []
        acc = 0.0
        for w in weights:
            acc += w / total
            self.cumulative.append(acc)
        self.next_block = 1 << 40
        self.pending: deque[tuple[int, str, list[int]]] = deque()
        self.samples: list[dict[str, Any]] = []
        self._own_blocks = 0  # allocated blocks held by the samples and their bookkeeping
        self.maxima: dict[str, int] = {}
        self.bounds: dict[str, int] = {}
        self.restarts = 0

    # -- traffic -----------------------------------------------------------------------------
    def _prompt(self) -> list[int]:
        system = self.systems[min(len(self.systems) - 1, bisect_left(self.cumulative, self.rng.random()))]
        lo, hi = self.config.unique_blocks
        count = self.rng.randint(lo, hi)
        start = self.next_block
        self.next_block += count
        return system + list(range(start, start + count))

    def step(self, i: int) -> None:
        """Route request ``i`` and complete the one ``in_flight`` requests older."""
        cfg = self.config
        core = self.core
        now = i / cfg.rate_per_s
        content = self._prompt()
        request = core.make_request(content, prompt_tokens=len(content) * cfg.block_tokens,
                                    session_id=f"soak-session-{i}", output_tokens=cfg.output_tokens,
                                    request_id=i)
        decision = core.route(request, now)
        if decision.replica is not None:
            self.pending.append((i, decision.replica, request.keys))
        if len(self.pending) > cfg.in_flight:
            done, replica, keys = self.pending.popleft()
            core.on_first_token(done, now)
            # The engine stored the prompt's blocks whether or not its completion notice
            # reaches the router; a lost notice leaves a record only ``max_tracked_requests``
            # can bound.
            if cfg.unconfirmed_every <= 0 or done % cfg.unconfirmed_every:
                core.on_kv_event(replica, BlocksStored(tuple(keys)), now)
            if cfg.lost_every <= 0 or done % cfg.lost_every:
                core.on_completed(done, now)
        if cfg.report_every and i % cfg.report_every == 0:
            for replica in self.replicas:
                load = core.load.loads.get(replica)
                waiting = load.waiting if load is not None else 0
                running = load.running if load is not None else 0
                core.on_engine_report(replica, now, kv_usage=0.5, waiting=waiting, running=running)
        if cfg.restart_every and i and i % cfg.restart_every == 0:
            victim = self.replicas[self.restarts % len(self.replicas)]
            self.restarts += 1
            core.on_replica_died(victim, now)
            core.on_replicas_changed(self.replicas, now)

    # -- measurement -------------------------------------------------------------------------
    def tables(self) -> dict[str, tuple[int, int]]:
        """Every table that can grow with traffic: name -> (size now, its bound)."""
        core = self.core
        tree = core.tree
        n = len(self.replicas)
        capacity_total = sum(tree.capacity(r) for r in tree.replicas)
        out: dict[str, tuple[int, int]] = {
            "tree.blocks": (len(tree), capacity_total),
            "tree.entries": (tree.entries, capacity_total),
            "tree.speculative": (sum(tree.stats(r)["speculative"] for r in tree.replicas), capacity_total),
            "tree.members_memo": (len(tree._members_of), MEMBERS_MEMO_BOUND),
            "tree.slots": (len(tree._slot_replica), n),
            "tree.free_slots": (len(tree._free_slots), n),
            "tree.bit_replica": (len(tree._bit_replica), n),
            "tree.capacities": (len(tree.capacities), n),
            "sessions": (len(core.sessions), core.sessions.max_sessions),
            "load.tracked_requests": (core.load.tracked_requests, core.load.max_tracked_requests),
            "load.replicas": (len(core.load.loads), n),
            "core.outcomes": (len(core.stats.outcomes), len(OUTCOMES)),
        }
        for replica in tree.replicas:
            out[f"tree.entries.{replica}"] = (tree.replica_blocks(replica), tree.capacity(replica))
        policy = core.policy
        for attr, value in sorted(vars(policy).items()):
            size = _container_size(value)
            if size is None:
                continue
            bound_of = POLICY_BOUNDS.get((policy.name, attr))
            out[f"policy.{attr}"] = (size, bound_of(policy, n) if bound_of else n)
        return out

    def sample(self, requests: int) -> dict[str, Any]:
        # The samples themselves are memory this process keeps (a few dozen blocks each):
        # count what each one adds and leave it out of the allocated-blocks figure, so
        # the figure is the core's alone.
        before = sys.getallocatedblocks()
        tables = self.tables()
        for name, (size, bound) in tables.items():
            self.maxima[name] = max(self.maxima.get(name, 0), size)
            self.bounds[name] = bound
        row = {"requests": requests, "rss_mib": round(rss_bytes() / 2**20, 2),
               "allocated_blocks": before - self._own_blocks,
               "tables": {name: size for name, (size, _) in tables.items()}}
        self.samples.append(row)
        del tables
        self._own_blocks += sys.getallocatedblocks() - before
        return row

    def run(self, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        cfg = self.config
        every = max(1, cfg.sample_every)
        self.sample(0)
        started = time.perf_counter()
        for i in range(cfg.requests):
            self.step(i)
            if (i + 1) % every == 0 or i + 1 == cfg.requests:
                row = self.sample(i + 1)
                if progress and (i + 1) % (every * 10) == 0:
                    progress(f"{i + 1:,} requests, RSS {row['rss_mib']:.0f} MiB, "
                             f"{time.perf_counter() - started:.0f} s")
        wall = time.perf_counter() - started
        self.core.check_invariants()
        return self.report(wall)

    def report(self, wall_s: float) -> dict[str, Any]:
        cfg = self.config
        tables = {}
        for name, bound in self.bounds.items():
            largest = self.maxima[name]
            # "Filled": within 1% of its bound (a table at its bound sheds an entry as
            # soon as it takes one, so a sample often finds it one short).
            filled = next((s["requests"] for s in self.samples if s["tables"].get(name, 0) >= 0.99 * bound), None)
            tables[name] = {"max": largest, "bound": bound, "held": largest <= bound, "filled_at": filled}
        half = cfg.requests // 2
        # Once every table that fills has filled, memory should stop growing. Compare the
        # median RSS of the second half of the run with that of the samples from then to
        # the half: medians, because the allocator moves RSS by a few MiB either way when
        # a large table is reallocated (a resize of a 50,000-entry dict), which says
        # nothing about growth. The least-squares slope over the same samples, in bytes
        # per request, is the leak rate if there is one.
        settled = max((t["filled_at"] for t in tables.values() if t["filled_at"] is not None), default=0)
        before = [s["rss_mib"] for s in self.samples if settled <= s["requests"] <= half]
        after = [s["rss_mib"] for s in self.samples if s["requests"] > half]
        growth = statistics.median(after) / statistics.median(before) - 1 if before and after else None
        points = [(s["requests"], s["rss_mib"] * 2**20) for s in self.samples if s["requests"] >= settled]
        slope = _slope(points) if len(points) >= 2 else None
        blocks_before = [s["allocated_blocks"] for s in self.samples if settled <= s["requests"] <= half]
        blocks_after = [s["allocated_blocks"] for s in self.samples if s["requests"] > half]
        blocks_growth = (statistics.median(blocks_after) / statistics.median(blocks_before) - 1
                         if blocks_before and blocks_after else None)
        filled_late = sorted(n for n, t in tables.items() if t["filled_at"] is not None and t["filled_at"] > half)
        unbounded = sorted(n for n, t in tables.items() if not t["held"])
        end = self.samples[-1]
        stats = self.core.stats
        load = self.core.load
        return {
            "benchmark": "soak",
            "policy": cfg.policy,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "speedups": _speedups_active(),
            "wall_s": round(wall_s, 2),
            "per_request_us": round(wall_s / max(1, cfg.requests) * 1e6, 2),
            "rss_start_mib": self.samples[0]["rss_mib"],
            "tables_filled_by": settled,
            "rss_median_filled_to_half_mib": round(statistics.median(before), 2) if before else None,
            "rss_median_second_half_mib": round(statistics.median(after), 2) if after else None,
            "rss_end_mib": end["rss_mib"],
            "rss_peak_mib": max(s["rss_mib"] for s in self.samples),
            "rss_growth_second_half": round(growth, 4) if growth is not None else None,
            "rss_slope_bytes_per_request": round(slope, 3) if slope is not None else None,
            "allocated_blocks_growth_second_half": round(blocks_growth, 5) if blocks_growth is not None else None,
            "rss_flat": growth is not None and growth < cfg.flat_limit and not filled_late,
            "allocated_blocks_flat": (blocks_growth is not None and blocks_growth < cfg.blocks_flat_limit
                                      and not filled_late),
            "tables_filled_after_half": filled_late,
            "bounds_held": not unbounded,
            "over_bound": unbounded,
            "tables": tables,
            "counters": {
                "routed": stats.routed, "outcomes": dict(stats.outcomes), "no_replica": stats.no_replica,
                "invalid_tiers": stats.invalid_tiers, "kv_events": stats.kv_events,
                "kv_events_unknown_replica": stats.kv_events_unknown_replica,
                "forgotten_requests": load.forgotten_requests,
                "unknown_request_events": load.unknown_request_events,
                "sessions_evicted": self.core.sessions.evicted, "sessions_expired": self.core.sessions.expired,
                "tree_evicted": sum(self.core.tree.stats(r)["evicted"] for r in self.core.tree.replicas),
                "tree_expired": sum(self.core.tree.stats(r)["expired"] for r in self.core.tree.replicas),
                "replica_restarts": self.restarts,
            },
            "samples": [{"requests": s["requests"], "rss_mib": s["rss_mib"], "allocated_blocks": s["allocated_blocks"],
                         "tables": _headline(s["tables"])} for s in self.samples],
        }


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0


def _headline(tables: dict[str, int]) -> dict[str, int]:
    """The per-sample table sizes kept in the JSON (per-replica rows are summed already)."""
    return {k: v for k, v in tables.items() if not k.startswith("tree.entries.")}


def _speedups_active() -> bool:
    from router._fast import speedups
    return speedups is not None


def run(*, requests: int = 1_000_000, policy: str = "cache_aware", sample_every: int | None = None,
        progress: Callable[[str], None] | None = None, **options: Any) -> dict[str, Any]:
    """One soak run; ``options`` are other ``SoakConfig`` fields."""
    policies.policy_class(policy)  # an unknown name fails before the run
    every = sample_every or max(1, requests // 100)
    config = SoakConfig(requests=requests, policy=policy, sample_every=every, **options)
    return Soak(config).run(progress)


def format_table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [f"kvroute bench soak: {cfg['requests']:,} requests, policy {report['policy']}, "
             f"{cfg['replicas']} replicas x {cfg['capacity_blocks']} blocks, max_sessions {cfg['max_sessions']:,}, "
             f"max_tracked_requests {cfg['max_tracked_requests']:,}; {report['wall_s']:.1f} s "
             f"({report['per_request_us']:.1f} us/request)",
             f"{'requests':>10} {'RSS MiB':>8} {'tree entries':>13} {'sessions':>9} {'tracked':>8}"]
    samples = report["samples"]
    step = max(1, len(samples) // 10)
    for s in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        t = s["tables"]
        lines.append(f"{s['requests']:>10,} {s['rss_mib']:>8.1f} {t['tree.entries']:>13,} {t['sessions']:>9,} "
                     f"{t['load.tracked_requests']:>8,}")
    growth = report["rss_growth_second_half"]
    slope = report["rss_slope_bytes_per_request"]
    lines.append(f"tables full by {report['tables_filled_by']:,} requests; median RSS after the half vs before: "
                 + (f"{growth * 100:+.2f}%" if growth is not None else "-")
                 + (f", slope {slope:.2f} bytes/request" if slope is not None else "")
                 + f" ({'flat' if report['rss_flat'] else 'NOT flat'}); Python's allocated blocks "
                 + (f"{report['allocated_blocks_growth_second_half'] * 100:+.3f}%"
                    if report["allocated_blocks_growth_second_half"] is not None else "-")
                 + f" ({'flat' if report['allocated_blocks_flat'] else 'NOT flat'}); bounds "
                 + ("held for every table" if report["bounds_held"] else f"EXCEEDED: {', '.join(report['over_bound'])}"))
    if report["tables_filled_after_half"]:
        lines.append("filled after the half (flatness not shown for them): "
                     + ", ".join(report["tables_filled_after_half"]))
    return "\n".join(lines)

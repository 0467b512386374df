"""``kvroute bench peers``: kvroute's gateway against the gateways users would pick instead,
on the same ``vllm serve`` engines, and Ray Serve's routers on the same requests.

Gateways (``--router``): ``kvroute:POLICY`` (``kvroute gateway``, exact token keys and the
workers' KV events), ``kvroute-chars:POLICY`` (the same gateway keying characters: no
tokenizer, so no KV events either), ``smg``, ``vllm-router``, ``sglang-router`` (each installed from PyPI
into its own virtualenv, ``benchmarks.peers``; their ``cache_aware`` policy). The
benchmark starts ``--replicas`` ``vllm serve`` CPU servers of the tiny model once
(prefix caching and KV events on, loopback, ``VLLM_SERVER_DEV_MODE=1`` for
``/reset_prefix_cache``), then per gateway: starts it in front of all of them, sends a few
warm-up requests outside the workload until it answers, resets every server's prefix
cache (each gateway starts cold), replays the workload open loop (streaming, the client
measuring TTFT and end-to-end time), reads the servers' own counters (prefix-cache
queries and hits, requests finished) before and after, and stops the gateway. The
gateway's CPU seconds over the replay and its peak RSS come from ``/proc``.

Ray Serve's side (``ray:CacheAwareRouter`` for kvroute's plug-in, ``ray:PrefixCacheAffinityRouter``,
``ray:PowerOfTwoChoicesRequestRouter``, ``ray:ConsistentHashRouter``) runs the same
requests through ``kvroute bench live`` after the servers are stopped (kvroute's vLLM
engine deployment, the same engine geometry). ``ray:KVAwareRouter`` (Ray Serve LLM's own
KV-event router) needs a Serve LLM cluster of its own in HAProxy mode: it runs last, in a
child process, on ``ray.serve.llm`` replicas of the same geometry
(``benchmarks.peers_kv_aware``).

Everything is validated before any process starts.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.live_bench import (LiveConfig, Outcome, check_engine_geometry, load_requests, replay, summarize)
from benchmarks.live_workload import LiveShape, TextRenderer, single_token_words
from benchmarks.peers import PEERS, peer
from engines.routers import profile_options
from engines.vllm_server import VLLMServer, free_port
from router.errors import ConfigError
from router.gateway.vllm_metrics import engine_report
from simulator.workloads import ideal_hit_rate

RAY_ROUTERS = {"ray:CacheAwareRouter": "cache_aware", "ray:PrefixCacheAffinityRouter": "ray:PrefixCacheAffinityRouter",
               "ray:PowerOfTwoChoicesRequestRouter": "ray:PowerOfTwoChoicesRequestRouter",
               "ray:ConsistentHashRouter": "ray:ConsistentHashRouter"}
#: Ray Serve LLM's KV-event router: its own cluster, in a child process (benchmarks.peers_kv_aware).
RAY_KV_AWARE = "ray:KVAwareRouter"
#: The name the workers serve the model under (smg requires ``model`` in every body).
MODEL_NAME = "tiny"
DEFAULT_ROUTERS = ("kvroute:cache_aware", *PEERS, *RAY_ROUTERS, RAY_KV_AWARE)


#: Gateway options a ``kvroute:`` router name may set beside the policy's (how the gateway
#: tokenizes: ``kvroute:cache_aware,inline_tokenize_chars=4096`` beside the default in one
#: run; ``kv_events=false``: the workers' KV events left out). They go to the gateway's
#: configuration file; the simulator has no tokenizer and leaves them out.
GATEWAY_OPTIONS = ("inline_tokenize_chars", "tokenize_wait_ms", "tokenizer_threads", "chunk_chars",
                   "tokenizer_cache_bytes", "conversation_memo_bytes", "kv_events")


#: kvroute's gateway by router name: ``kvroute:POLICY`` keys exact token ids (the served
#: model's tokenizer), ``kvroute-chars:POLICY`` characters (no tokenizer).
KVROUTE_GATEWAYS = ("kvroute:", "kvroute-chars:")


def kvroute_router(name: str) -> tuple[str, dict[str, Any]]:
    """``kvroute:POLICY[,NAME=VALUE...]`` (or ``kvroute-chars:...``) -> the policy and the
    options given in the name, values read as YAML scalars as the gateway's
    ``--policy-option`` reads them: ``kvroute:cache_aware,load_factor=2`` runs the gateway
    with ``--policy-option load_factor=2`` (a tuned configuration beside the default in
    one run). Names in ``GATEWAY_OPTIONS`` are the gateway's own (``gateway_options``)."""
    from router.gateway.config import parse_policy_options

    policy, *pairs = name.split(":", 1)[1].split(",")
    try:
        return policy, parse_policy_options(pairs)
    except ConfigError as exc:
        raise ConfigError("router", f"{name!r}: {exc}") from None


def gateway_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ``kvroute:`` name's options split into the policy's and the gateway's own."""
    return ({k: v for k, v in options.items() if k not in GATEWAY_OPTIONS},
            {k: v for k, v in options.items() if k in GATEWAY_OPTIONS})


def kvroute_policy(name: str) -> tuple[str, dict[str, Any]]:
    """A ``kvroute:`` name's policy and its policy options (what the simulator runs)."""
    policy, options = kvroute_router(name)
    return policy, gateway_options(options)[0]


def validate_routers(names: Sequence[str]) -> list[str]:
    """The routers asked for, each checked (``ConfigError`` naming ``router``)."""
    import policies

    out = []
    for name in names:
        if name.startswith(KVROUTE_GATEWAYS):
            policy, options = kvroute_router(name)
            options, own = gateway_options(options)
            try:  # a registered name or a ``module:Class`` path, and its options, as the gateway checks them
                policies.get(policy, **options)
                if own:
                    from router.service import validate_options

                    validate_options({"policy": policy, "policy_options": options, **own})
            except policies.UnknownPolicyError:
                raise ConfigError("router", f"unknown kvroute policy {policy!r} in {name!r} "
                                            f"(policies: {', '.join(policies.available())})") from None
            except ConfigError as exc:
                raise ConfigError("router", f"{name!r}: {exc}") from None
        elif name not in PEERS and name not in RAY_ROUTERS and name != RAY_KV_AWARE:
            raise ConfigError("router", f"unknown router {name!r}; valid: kvroute:POLICY, kvroute-chars:POLICY, "
                                        f"{', '.join([*PEERS, *RAY_ROUTERS, RAY_KV_AWARE])}")
        if name in out:
            raise ConfigError("router", f"{name!r} is listed twice")
        out.append(name)
    return out


# -- the servers' own counters ---------------------------------------------------------------
def _metrics_text(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        return resp.read().decode()


def server_counters(servers: Sequence[VLLMServer]) -> dict[str, dict[str, float]]:
    """Per server: cumulative prefix-cache queries and hits (tokens), finished requests,
    and the sum and count of vLLM's own time-to-first-token histogram (from the request's
    arrival in the server, after its tokenization, to the first token out of the engine)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for server in servers:
        text = _metrics_text(server.url)
        report = engine_report(text)
        sums = {"finished": 0.0, "ttft_sum": 0.0, "ttft_count": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = _COUNTED_SAMPLES.get(sample.name)
                if name is not None:
                    sums[name] += sample.value
        out[server.url] = {"queries": int(report.get("prefix_cache_queries", 0)),
                           "hits": int(report.get("prefix_cache_hits", 0)), "finished": int(sums["finished"]),
                           "ttft_sum": sums["ttft_sum"], "ttft_count": int(sums["ttft_count"])}
    return out


#: The samples of vLLM's /metrics that ``server_counters`` adds up, by its name for them.
_COUNTED_SAMPLES = {"vllm:request_success_total": "finished", "vllm:request_success": "finished",
                    "vllm:time_to_first_token_seconds_sum": "ttft_sum",
                    "vllm:time_to_first_token_seconds_count": "ttft_count"}


def histogram_buckets(text: str, name: str) -> dict[float, float]:
    """A Prometheus histogram's cumulative bucket counts (upper bound -> count) from a
    ``/metrics`` page; empty when the page has no such histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    return {float(sample.labels["le"]): sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name + "_bucket"}


def histogram_quantile(after: dict[float, float], before: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of what a histogram observed between two scrapes (cumulative
    buckets, as ``histogram_buckets`` reads them), interpolated linearly inside the bucket
    as Prometheus's ``histogram_quantile`` does; the highest finite bound when it falls in
    the ``+Inf`` bucket; None when nothing was observed."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


#: kvroute's gateway's own histograms that a run reports (p50 and p99, in ms, of what
#: they observed during the replay), by the row's name for them.
GATEWAY_HISTOGRAMS = {"gateway_added": "kvroute_gateway_added_seconds",
                      "gateway_loop_lag": "kvroute_gateway_loop_lag_seconds"}


def gateway_histograms(url: str) -> dict[str, dict[float, float]]:
    """``GATEWAY_HISTOGRAMS``' buckets from kvroute's gateway at ``url``."""
    text = _metrics_text(url)
    return {key: histogram_buckets(text, name) for key, name in GATEWAY_HISTOGRAMS.items()}


def gateway_histogram_quantiles(after: dict[str, dict[float, float]],
                                before: dict[str, dict[float, float]]) -> dict[str, float | None]:
    """``gateway_added_p50_ms`` .. ``gateway_loop_lag_p99_ms``: what kvroute's gateway's
    histograms observed between two ``gateway_histograms`` readings."""
    out: dict[str, float | None] = {}
    for key, buckets in after.items():
        for q in (0.5, 0.99):
            value = histogram_quantile(buckets, before.get(key, {}), q)
            out[f"{key}_p{round(q * 100)}_ms"] = round(value * 1e3, 3) if value is not None else None
    return out


def _delta(after: dict, before: dict, key: str) -> dict[str, float]:
    return {url: row[key] - before[url][key] for url, row in after.items()}


def reset_caches(servers: Sequence[VLLMServer]) -> None:
    for server in servers:
        request = urllib.request.Request(server.url + "/reset_prefix_cache", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=60) as resp:
            resp.read()


def warm_engines(servers: Sequence[VLLMServer], max_model_len: int, slice_: Sequence = (),
                 renderer: TextRenderer | None = None, api: str = "completions", timeout_s: float = 120.0,
                 batch: int = 8) -> None:
    """Before the first gateway, straight to each server and outside any measurement:
    requests one at a time of lengths from short to near the context, then ``batch`` at
    once (mixed lengths, so batched prefill and decode steps run), then ``slice_`` (a few
    requests of the same kind of traffic, replayed open loop as a gateway's are), so that
    no gateway's replay pays the engines' first-use costs. Without them the first gateway
    measured did: in three runs its in-engine TTFT on the first seed was 1.5-3.9 ms above
    the second's."""
    lengths = (8, 64, 256, max(8, max_model_len // 8))

    def send(server: VLLMServer, words: int) -> None:
        body = {"model": MODEL_NAME, "prompt": " ".join(f"warm{i % 50}" for i in range(words)),
                "max_tokens": 16, "ignore_eos": True, "temperature": 0}
        request = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as resp:
            resp.read()

    for server in servers:
        for words in lengths:
            send(server, words)
    with ThreadPoolExecutor(max_workers=batch * len(servers)) as pool:
        # ``list``: a request that failed raises here.
        list(pool.map(lambda job: send(*job), [(server, lengths[i % 3] + i) for server in servers
                                               for i in range(batch)]))
    if slice_:
        for server in servers:
            replay(server.url + "/v1", slice_, renderer, timeout_s=timeout_s, api=api, model=MODEL_NAME)


#: The warm-up slice each server gets before the first gateway: this many requests, of the
#: workload generated with the seed plus this offset (never one that is measured).
WARM_REQUESTS = 40
WARM_SEED_OFFSET = 10_000


def seed_order(gateways: Sequence[str], k: int) -> list[str]:
    """The gateways' order for the ``k``-th seed: turned by ``k``, so that none is always
    the first after the servers start (a first-use cost left in the engines falls on it)
    or always the one after a given other."""
    turn = k % len(gateways) if gateways else 0
    return [*gateways[turn:], *gateways[:turn]]


# -- a gateway process -------------------------------------------------------------------------
class GatewayRun:
    """One gateway process in front of ``servers``: started, probed until it answers a
    request, then measured (CPU seconds, peak RSS) and stopped."""

    def __init__(self, name: str, servers: Sequence[Any], model_path: str, block_size: int,
                 profile: str | None = None, tree: str | None = None) -> None:
        # ``servers``: anything with ``url`` and ``worker_arg()`` (a ``VLLMServer``, or the
        # trivial worker of ``kvroute bench gateway``). ``profile``: the latency profile for
        # a kvroute policy that takes one (as the Ray Serve rows get it from ``LiveConfig``).
        # ``tree``: run a kvroute gateway from that checkout (``benchmarks.gateway_ab``)
        # instead of this one.
        self.name = name
        self.port = free_port()
        self.config_path: Path | None = None  # a configuration file written for the gateway, removed by stop()
        if name.startswith(KVROUTE_GATEWAYS):
            policy, options = kvroute_router(name)
            options, own = gateway_options(options)
            args = [sys.executable, "-m", "router.cli", "gateway", "--policy", policy,
                    "--block-size", str(block_size), "--port", str(self.port), "--admin-port", "0"]
            for option, value in {**profile_options(policy, profile), **options}.items():
                args += ["--policy-option", f"{option}={value}"]
            if own:  # the gateway's own options: a configuration file (flags win over it, none overlap)
                with tempfile.NamedTemporaryFile("w", prefix="kvroute-peers-", suffix=".yaml", delete=False) as f:
                    json.dump(own, f)  # JSON is YAML
                self.config_path = Path(f.name)
                args += ["--config", f.name]
            if name.startswith("kvroute:"):  # kvroute-chars: character keys, no tokenizer
                args += ["--tokenizer", model_path]
            for server in servers:
                args += ["--worker", server.worker_arg()]
        else:
            args = peer(name).command(workers=[s.url for s in servers], host="127.0.0.1", port=self.port,
                                      prometheus_port=free_port())
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"kvroute-peers-{name.replace(':', '-')}.log", "w")
        where = {} if tree is None else {"cwd": tree, "env": {**os.environ, "PYTHONPATH": os.path.abspath(tree)}}
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                        **where)
        self.url = f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        try:
            return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def wait_ready(self, body: dict, timeout: float = 180.0) -> None:
        """Until one request through the gateway is answered 200 (every peer has its own
        readiness; an answered request is the common one)."""
        deadline = time.monotonic() + timeout
        data = json.dumps(body).encode()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                request = urllib.request.Request(self.url + "/v1/completions", data=data,
                                                 headers={"content-type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as resp:
                    if resp.status == 200:
                        resp.read()
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} did not answer in {timeout:.0f} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU of the gateway process (all its threads), from /proc."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float | None:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        if self.config_path is not None:
            self.config_path.unlink(missing_ok=True)


def run_gateway(name: str, servers: Sequence[VLLMServer], requests, renderer: TextRenderer, model_path: str,
                live: LiveConfig, api: str, progress: Callable[[str], None] | None) -> tuple[dict, list[Outcome]]:
    gateway = GatewayRun(name, servers, model_path, live.block_size, live.profile)
    try:
        if progress:
            progress(f"{name}: starting in front of {len(servers)} vllm serve workers")
        for i in range(2 * len(servers)):  # outside the workload; engines warm, gateway answering
            gateway.wait_ready({"model": MODEL_NAME, "prompt": f"warm up number {i} {'z' * i}", "max_tokens": 2,
                                "temperature": 0})
        reset_caches(servers)
        before = server_counters(servers)
        own = name.startswith(KVROUTE_GATEWAYS)
        histograms_before = gateway_histograms(gateway.url) if own else {}
        cpu_before = gateway.cpu_seconds()
        if progress:
            progress(f"{name}: replaying {len(requests)} requests")
        started = time.perf_counter()
        step = (lambda d, n: progress(f"{name}: {d}/{n}")) if progress else None
        outcomes = replay(gateway.url + "/v1", requests, renderer, timeout_s=live.timeout_s, progress=step, api=api,
                          model=MODEL_NAME)
        wall = time.perf_counter() - started
        cpu = gateway.cpu_seconds() - cpu_before
        rss = gateway.peak_rss_mb()
        histograms = gateway_histograms(gateway.url) if own else {}
        answered = sum(1 for o in outcomes if o.ok)
        deadline = time.monotonic() + 15.0  # vLLM updates its counters each scheduler step
        after = server_counters(servers)
        while sum(_delta(after, before, "finished").values()) < answered and time.monotonic() < deadline:
            time.sleep(0.5)
            after = server_counters(servers)
    finally:
        gateway.stop()
    row = summarize(name, outcomes, wall)
    queries, hits = _delta(after, before, "queries"), _delta(after, before, "hits")
    finished = _delta(after, before, "finished")
    total = sum(finished.values())
    engine_ttfts = sum(_delta(after, before, "ttft_count").values())
    engine_ttft = sum(_delta(after, before, "ttft_sum").values()) / engine_ttfts if engine_ttfts else None
    # vLLM's server streams usage only when asked (stream_options), so the client's own
    # count of cached tokens is not there: the engines' counters are the hit rate.
    row.update({"router": name, "front_door": "gateway",
                "client_hit_rate": row["hit_rate"] if row["prompt_tokens"] else None,
                "hit_rate": round(sum(hits.values()) / sum(queries.values()), 4) if sum(queries.values()) else None,
                "replica_share": {url: round(n / total, 4) for url, n in finished.items()} if total else {},
                "max_replica_share": round(max(finished.values()) / total, 4) if total else None,
                "gateway_cpu_s": round(cpu, 2), "gateway_cpu_ms_per_request": round(cpu * 1e3 / max(1, answered), 3),
                "gateway_peak_rss_mb": rss,
                # The client's mean TTFT split: inside the servers (vLLM's own histogram),
                # and the rest (the client, the gateway both ways, the server's HTTP front
                # end): on the same servers, a gateway's cost is the difference in the rest.
                "engine_ttft_mean_s": round(engine_ttft, 5) if engine_ttft is not None else None,
                "outside_engine_ttft_mean_s": (round(row["ttft_mean_s"] - engine_ttft, 5)
                                               if engine_ttft is not None and row.get("ttft_mean_s") is not None
                                               else None)})
    # kvroute's gateway's own view (the peers export nothing comparable): its share of each
    # request's time to first byte, and its event loop's lateness.
    row.update(gateway_histogram_quantiles(histograms, histograms_before))
    return row, outcomes


def run(*, routers: Sequence[str] = DEFAULT_ROUTERS, workload: str | None = "chat", trace: str | None = None,
        trace_start: int = 0, requests: int = 200, rate: float = 8.0, rate_scale: float = 1.0, seed: int = 0,
        shape: LiveShape = LiveShape(), live: LiveConfig = LiveConfig(replicas=3), api: str = "completions",
        progress: Callable[[str], None] | None = None, pin_engines: bool = False, seeds: int = 1) -> dict[str, Any]:
    """The ``kvroute bench peers`` report (module docstring). ``pin_engines``: each vLLM
    server runs on one CPU of its own (round robin over this process's CPUs), as each
    replica has its own accelerator in a real fleet: one busy server then cannot borrow
    its neighbours' compute, which on a small machine rewards a router that piles every
    request onto one server. The gateway and the client run on any CPU.

    ``seeds``: the workload generated with seeds ``seed`` .. ``seed + seeds - 1``, each
    replayed to every router (seed by seed, every router within a seed, so a slower phase
    of the machine falls on all of them; the gateways' order turns by one each seed);
    ``results`` are then the means over the seeds
    (``mean_over_seeds``) and ``runs`` the rows of each seed. One seed of a few hundred
    requests decides a hit rate to a few points only: which sessions happen to overlap
    in time moves every router's figure, and not all in the same direction."""
    names = validate_routers(routers)
    check_engine_geometry(live.block_size, live.kv_blocks, live.max_model_len)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds <= 0:
        raise ConfigError("seeds", f"must be a positive integer, got {seeds!r}")
    from engines.tiny_model import build_tiny_model

    model_path = str(Path(live.model_path).expanduser().absolute()) if live.model_path else str(build_tiny_model())
    seed_list = list(range(seed, seed + seeds))
    per_seed = {s: load_requests(workload=workload, trace=trace, count=requests, rate=rate, rate_scale=rate_scale,
                                 seed=s, shape=shape, trace_start=trace_start) for s in seed_list}
    if not all(per_seed.values()):
        raise ConfigError("requests", "the workload is empty")
    workload_requests = per_seed[seed]
    for name in names:
        if name in PEERS:
            peer(name).install(log=progress or (lambda m: None))
    from transformers import AutoTokenizer

    renderer = TextRenderer(single_token_words(AutoTokenizer.from_pretrained(model_path)))
    rows: list[dict] = []
    engine_cpus = sorted(os.sched_getaffinity(0))
    gateways = [n for n in names if n.startswith(KVROUTE_GATEWAYS) or n in PEERS]
    if gateways:
        servers = [VLLMServer(model_path, served_name=MODEL_NAME, block_size=live.block_size,
                              max_model_len=live.max_model_len,
                              kv_blocks=live.kv_blocks, max_num_seqs=live.max_num_seqs,
                              env={"VLLM_SERVER_DEV_MODE": "1"},
                              extra_args=["--max-num-batched-tokens", str(live.max_num_batched_tokens)])
                   for _ in range(live.replicas)]
        if pin_engines:
            for i, server in enumerate(servers):
                server.cpus = frozenset({engine_cpus[i % len(engine_cpus)]})
        try:
            if progress:
                progress(f"starting {len(servers)} vllm serve CPU servers"
                         + (" (one CPU each)" if pin_engines else ""))
            for server in servers:
                server.start()
            for server in servers:
                server.wait_ready(900)
            # The warm-up slice: another seed, or the trace's requests after the replayed window.
            warm = load_requests(workload=workload, trace=trace, count=min(WARM_REQUESTS, requests), rate=rate,
                                 rate_scale=rate_scale, seed=seed + WARM_SEED_OFFSET, shape=shape,
                                 trace_start=trace_start + requests if trace else 0)
            warm_engines(servers, live.max_model_len, warm, renderer, api, live.timeout_s)
            for k, s in enumerate(seed_list):
                tell = progress if seeds == 1 or progress is None else (lambda m, s=s: progress(f"seed {s}: {m}"))
                for name in seed_order(gateways, k):
                    try:
                        row, _ = run_gateway(name, servers, per_seed[s], renderer, model_path, live, api, tell)
                    except (RuntimeError, TimeoutError, OSError) as exc:
                        row = {"router": name, "front_door": "gateway", "error": str(exc)[-1500:]}
                    rows.append({**row, "seed": s})
        finally:
            for server in servers:
                server.stop()
    ray_names = [n for n in names if n in RAY_ROUTERS]
    if ray_names:
        from benchmarks import live_bench

        for s in seed_list:
            report = live_bench.run(policies=[RAY_ROUTERS[n] for n in ray_names], workload=workload, trace=trace,
                                    trace_start=trace_start, requests=requests, rate=rate, rate_scale=rate_scale,
                                    seed=s, shape=shape, live=live, progress=progress, api=api)
            for name, row in zip(ray_names, report["results"]):
                row = dict(row)
                row.update({"router": name, "front_door": "ray-serve", "client_hit_rate": row["hit_rate"],
                            "hit_rate": row.get("engine_hit_rate"), "gateway_cpu_s": None,
                            "gateway_peak_rss_mb": None, "seed": s})
                rows.append(row)
    if RAY_KV_AWARE in names:
        from benchmarks import peers_kv_aware

        for s in seed_list:
            rows.append({**peers_kv_aware.run_subprocess(
                per_seed[s], model_path=model_path, model_name=MODEL_NAME, replicas=live.replicas,
                block_size=live.block_size, kv_blocks=live.kv_blocks, max_model_len=live.max_model_len,
                max_num_seqs=live.max_num_seqs, max_num_batched_tokens=live.max_num_batched_tokens,
                request_timeout_s=live.timeout_s, api=api, progress=progress), "seed": s})
    ceilings = [ideal_hit_rate(reqs, live.block_size)["full_block_tokens"] for reqs in per_seed.values()]
    every = [r for reqs in per_seed.values() for r in reqs]
    return {
        "benchmark": "peers",
        "workload": {"name": None if trace else (workload or "chat"), "trace": trace, "trace_start": trace_start,
                     "api": api, "requests": len(workload_requests), "rate_per_s": None if trace else rate,
                     "rate_scale": rate_scale, "seed": seed, "seeds": seed_list,
                     "span_s": round(workload_requests[-1].arrival_s, 2),
                     "prompt_tokens_mean": round(statistics.fmean(r.prompt_tokens for r in every), 1),
                     "sessions": len({r.session_id for r in workload_requests if r.session_id})},
        "ideal_hit_rate": round(statistics.fmean(ceilings), 4),
        "deployment": {"replicas": live.replicas, "model": model_path, "block_size": live.block_size,
                       "profile": live.profile,
                       "kv_blocks_per_replica": live.kv_blocks, "max_model_len": live.max_model_len,
                       "max_num_seqs": live.max_num_seqs,
                       "engine_cpus": [engine_cpus[i % len(engine_cpus)] for i in range(live.replicas)]
                       if pin_engines else None,
                       "peers": {name: PEERS[name].requirement for name in names if name in PEERS}},
        "results": rows if seeds == 1 else mean_over_seeds(rows),
        **({"runs": rows} if seeds > 1 else {}),
    }


#: Row figures ``mean_over_seeds`` averages (each over the seeds that have it).
_MEAN_FIELDS = ("hit_rate", "client_hit_rate", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_mean_s", "e2e_p50_s",
                "throughput_rps", "max_replica_share", "gateway_cpu_s", "gateway_cpu_ms_per_request",
                "engine_ttft_mean_s", "outside_engine_ttft_mean_s", "gateway_added_p50_ms", "gateway_added_p99_ms",
                "gateway_loop_lag_p50_ms", "gateway_loop_lag_p99_ms")
#: Row counts it adds up.
_SUM_FIELDS = ("requests", "completed", "failed")


def mean_over_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per router (in first-seen order) from its per-seed rows: the mean of each
    figure in ``_MEAN_FIELDS`` over the seeds that report it (``None`` where none does),
    the sum of the counts, the largest peak RSS, each replica's mean share, the mean
    of the seeds' TTFT percentiles (``ttft_percentiles_s``, percentile by percentile), and
    ``hit_rate_by_seed`` / ``ttft_p99_s_by_seed`` beside the means. A seed whose run
    failed (a row with ``error``) is left out of the figures and named in
    ``errors_by_seed``; a router that failed on every seed keeps its first error. O(rows)."""
    by_router: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_router.setdefault(row["router"], []).append(row)
    out = []
    for router, runs in by_router.items():
        ok = [r for r in runs if "error" not in r]
        errors = {r.get("seed"): r["error"] for r in runs if "error" in r}
        if not ok:
            out.append({**runs[0], "seeds": [r.get("seed") for r in runs], "errors_by_seed": errors})
            continue
        row: dict[str, Any] = {"router": router, "front_door": ok[0].get("front_door"),
                               "seeds": [r.get("seed") for r in ok]}
        for name in _MEAN_FIELDS:
            values = [r[name] for r in ok if r.get(name) is not None]
            row[name] = round(statistics.fmean(values), 4) if values else None
        for name in _SUM_FIELDS:
            row[name] = sum(r.get(name) or 0 for r in ok)
        rss = [r["gateway_peak_rss_mb"] for r in ok if r.get("gateway_peak_rss_mb") is not None]
        row["gateway_peak_rss_mb"] = max(rss) if rss else None
        replicas = sorted({name for r in ok for name in r.get("replica_share") or {}})
        row["replica_share"] = {name: round(statistics.fmean((r.get("replica_share") or {}).get(name, 0.0)
                                                             for r in ok), 4) for name in replicas}
        # The seeds' TTFT distributions averaged percentile by percentile (each seed's
        # shape kept, as a pooled sample would not be when one seed is slower overall).
        curves = [r["ttft_percentiles_s"] for r in ok if r.get("ttft_percentiles_s")]
        row["ttft_percentiles_s"] = [round(statistics.fmean(points), 5) for points in zip(*curves)] if curves else []
        row["hit_rate_by_seed"] = [r.get("hit_rate") for r in ok]
        row["ttft_p99_s_by_seed"] = [r.get("ttft_p99_s") for r in ok]
        if errors:
            row["errors_by_seed"] = errors
        out.append(row)
    return out


#: The league's routers by the simulator's version of their policy (``--simulate``):
#: smg and sglang-router run SGLang's cache_aware policy, vllm-router a copy of it.
SIMULATED = (("kvroute:cache_aware", "cache_aware"), ("smg / sglang-router / vllm-router", "sglang"),
             ("ray:PrefixCacheAffinityRouter", "ray_prefix"), ("ray:PowerOfTwoChoicesRequestRouter", "pow2"),
             ("ray:KVAwareRouter", "dynamo"))


def simulate(*, workload: str | None = "chat", trace: str | None = None, trace_start: int = 0, requests: int = 200,
             rate: float = 8.0, rate_scale: float = 1.0, seed: int = 0, seeds: int = 1, shape: LiveShape = LiveShape(),
             live: LiveConfig = LiveConfig(replicas=3), host_slots: float | None = None,
             routers: Sequence[str] = (), pin_engines: bool = False) -> dict[str, Any]:
    """The league's requests (the same fitted workload, seeds ``seed`` to ``seed + seeds -
    1``) through the simulator instead of engines, on the league's geometry (replicas, KV
    blocks, block size, batch limits, the latency profile), with the engines sharing this
    machine's ``host_slots`` cores (default: all of them) as the live ``vllm serve``
    servers do: the simulator's versions of the routers' policies (``SIMULATED``), each the
    mean over the seeds. ``routers``: the ``kvroute:POLICY[,NAME=VALUE...]`` rows instead
    of ``kvroute:cache_aware`` (other names are the peers' rows, always run).
    ``pin_engines``: the live league's ``--pin-engines`` setting, whose servers are the
    ``tiny-llama-cpu-pinned`` profile (measured on one pinned server) unless a profile is
    given; the shared one's are ``tiny-llama-cpu`` (measured through Serve, two replicas
    sharing two cores). Seconds, no engines: for reading the live table."""
    import dataclasses as _dataclasses

    from router.profile import get_profile
    from simulator.cluster import ClusterConfig
    from simulator.run import run_policy

    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds <= 0:
        raise ConfigError("seeds", f"must be a positive integer, got {seeds!r}")
    profile = get_profile(live.profile or ("tiny-llama-cpu-pinned" if pin_engines else "tiny-llama-cpu"))
    slots = host_slots if host_slots is not None else float(os.cpu_count() or 1)
    config = ClusterConfig(replicas=live.replicas, block_size=live.block_size, kv_blocks=live.kv_blocks,
                           profile=profile, max_num_seqs=live.max_num_seqs,
                           max_num_batched_tokens=live.max_num_batched_tokens, host_slots=slots)
    runs = [load_requests(workload=workload, trace=trace, count=requests, rate=rate, rate_scale=rate_scale,
                          seed=s, shape=shape, trace_start=trace_start) for s in range(seed, seed + seeds)]
    own = [name for name in validate_routers(routers) if name.startswith(KVROUTE_GATEWAYS)] or [SIMULATED[0][0]]
    rows = []
    for router, policy, given in [(name, *kvroute_policy(name)) for name in own] + \
            [(router, policy, {}) for router, policy in SIMULATED[1:]]:
        options = {**profile_options(policy, live.profile or profile.name), **given}
        per_seed = [run_policy(reqs, _dataclasses.replace(config, seed=s), policy, options)[0]
                    for s, reqs in zip(range(seed, seed + seeds), runs)]
        mean = lambda key: round(statistics.fmean(r[key] for r in per_seed), 4)  # noqa: E731
        rows.append({"router": router, "policy": policy, "hit_rate": mean("hit_rate"),
                     "hit_rate_by_seed": [round(r["hit_rate"], 4) for r in per_seed],
                     "ttft_p50_s": mean("ttft_p50_s"), "ttft_p99_s": mean("ttft_p99_s"),
                     "max_replica_share": mean("max_replica_share")})
    ceilings = [ideal_hit_rate(reqs, live.block_size)["full_block_tokens"] for reqs in runs]
    return {"benchmark": "peers-simulated",
            "workload": {"name": None if trace else (workload or "chat"), "trace": trace, "trace_start": trace_start,
                         "requests": requests, "rate_per_s": None if trace else rate,
                         "seeds": list(range(seed, seed + seeds))},
            "ideal_hit_rate": round(statistics.fmean(ceilings), 4),
            "deployment": {"replicas": live.replicas, "block_size": live.block_size,
                           "kv_blocks_per_replica": live.kv_blocks, "max_num_seqs": live.max_num_seqs,
                           "profile": profile.name, "host_slots": slots},
            "results": rows}


def format_simulated(report: dict[str, Any]) -> str:
    w, d = report["workload"], report["deployment"]
    lines = [f"simulated: {w['requests']} requests of {w['trace'] or w['name']}, seeds {w['seeds']} (ceiling "
             f"{report['ideal_hit_rate']:.1%}); {d['replicas']} replicas of {d['kv_blocks_per_replica']} blocks of "
             f"{d['block_size']}, {d['profile']}, sharing {d['host_slots']:g} cores",
             f"{'router':<36} {'policy':<12} {'hit':>7} {'TTFT p50':>9} {'p99':>8} {'max share':>9}"]
    for row in report["results"]:
        lines.append(f"{row['router']:<36} {row['policy']:<12} {row['hit_rate']:>7.1%} "
                     f"{row['ttft_p50_s'] * 1000:>7.0f}ms {row['ttft_p99_s'] * 1000:>6.0f}ms "
                     f"{row['max_replica_share']:>9.2f}")
    return "\n".join(lines)


def own_added_ms(row: dict[str, Any]) -> str:
    """kvroute's gateway's own added time to first byte, p50/p99 in ms ("-" for the peers)."""
    p50, p99 = row.get("gateway_added_p50_ms"), row.get("gateway_added_p99_ms")
    return "-" if p50 is None or p99 is None else f"{p50:.2f}/{p99:.2f}"


def format_table(report: dict[str, Any]) -> str:
    w, d = report["workload"], report["deployment"]
    seeds = w.get("seeds") or [w.get("seed")]
    lines = [f"{w['requests']} requests of {w['trace'] or w['name']} over {w['span_s']} s "
             + (f"per seed, seeds {seeds} (figures: means over the seeds) " if len(seeds) > 1 else "")
             + f"(prompt {w['prompt_tokens_mean']} tokens mean, ceiling {report['ideal_hit_rate']:.1%}); "
             f"{d['replicas']} vLLM CPU workers"
             + (f" (on CPUs {d['engine_cpus']})" if d.get("engine_cpus") else "")
             + f", {d['kv_blocks_per_replica']} blocks of {d['block_size']}",
             f"{'router':<36} {'door':<9} {'done':>5} {'hit':>7} {'TTFT p50':>9} {'p99':>8} {'e2e p50':>8} "
             f"{'req/s':>6} {'max share':>9} {'CPU s':>6} {'RSS MB':>7} {'TTFT mean':>9} {'in engine':>9} "
             f"{'own p50/p99':>11}"]

    def ms(v, digits=0):
        return "-" if v is None else f"{v * 1000:.{digits}f}ms"

    for row in report["results"]:
        if "error" in row:
            lines.append(f"{row['router']:<36} {row['front_door']:<9} error: {row['error'].splitlines()[0][:90]}")
            continue
        hit = "-" if row.get("hit_rate") is None else f"{row['hit_rate']:.1%}"
        share = "-" if row.get("max_replica_share") is None else f"{row['max_replica_share']:.2f}"
        cpu = "-" if row.get("gateway_cpu_s") is None else f"{row['gateway_cpu_s']:.1f}"
        rss = "-" if row.get("gateway_peak_rss_mb") is None else f"{row['gateway_peak_rss_mb']:.0f}"
        lines.append(f"{row['router']:<36} {row['front_door']:<9} {row['completed']:>5} {hit:>7} "
                     f"{ms(row['ttft_p50_s']):>9} {ms(row['ttft_p99_s']):>8} {ms(row['e2e_p50_s']):>8} "
                     f"{row['throughput_rps']:>6} {share:>9} {cpu:>6} {rss:>7} "
                     f"{ms(row.get('ttft_mean_s'), 1):>9} {ms(row.get('engine_ttft_mean_s'), 1):>9} "
                     f"{own_added_ms(row):>11}")
    if len(seeds) > 1:
        lines.append("hit rate by seed:")
        for row in report["results"]:
            by_seed = ", ".join("-" if v is None else f"{v:.1%}" for v in row.get("hit_rate_by_seed", ()))
            lines.append(f"  {row['router']:<34} {by_seed or 'error'}")
    return "\n".join(lines)

"""Prefill-decode (PD) disaggregation in the simulator: two pools and a KV link between them.

A PD deployment (vLLM with a KV connector, Ray Serve LLM's PD application, Dynamo, llm-d,
SGLang's PD mode) runs each request's prompt on a *prefill* replica, moves the prompt's KV
cache to a *decode* replica over the network, and generates the output there. What a PD
router decides:

1. the **decode** replica (its KV capacity holds the request while it generates);
2. whether to **disaggregate** at all: a short uncached prompt costs less to prefill on the
   decode replica itself than to queue on a prefill replica and move (Dynamo's
   conditional disaggregation, llm-d's PD decision);
3. the **prefill** replica, whose prefix cache saves compute exactly as in a flat pool.

**Policy API.** Each pool has its own ``RoutingCore`` (its own prefix tree, load view and
sessions) with an ordinary flat-pool ``Policy``: ``PDPlan.prefill`` ranks the prefill pool
and ``PDPlan.decode`` the decode pool, so every registered policy (built in or a third
party's) works in either role unchanged. The decision to disaggregate is a ``PDRule``:
``always``; ``conditional``: prefill on the decode replica when the prompt tokens it does
not already cache are at most ``max_local_prefill_tokens``; or ``cost`` (pools ranked by a
policy that estimates seconds, such as ``cache_aware``): prefill on the decode replica
when its estimated time to first token there, plus the delay that prefill imposes on the
replica's running decodes, is at most the best prefill replica's estimate plus the KV
transfer (and at most ``max_local_prefill_tokens`` uncached tokens). A plan names the three.

**Timeline of a disaggregated request** (``PDCluster``): at arrival the decode core routes
it (decode replica D, and D's cached prefix); the rule decides; the prefill core routes it
(replica P), which prefills it as a one-output-token request (its prefix-cache hit is the
request's hit, as in a flat pool). When P finishes, the prompt's KV not already cached on
D moves over D's inbound link (FIFO per decode replica: ``transfer_latency_s`` plus bytes
/ ``link_gbytes_per_s``); D then admits the request with the prompt's blocks allocated and
cached (KV events, as vLLM's connector does), computes only the last prompt token, and
decodes. The client's first token is D's first. A request prefilled locally runs on D as in
a flat pool. Both routers learn from their own pool's KV events and load reports.

Not modelled: the prefill replica keeping its blocks until the transfer ends (vLLM's
delayed free), link sharing between decode replicas, layer-by-layer overlap of transfer
and prefill, and replica changes (``ClusterConfig.changes`` and ``autoscale`` are refused
in PD mode).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from policies.base import RouteRequest
from router.core import RoutingCore
from router.errors import ConfigError
from router.events import BlocksRemoved, BlocksStored
from simulator.cluster import ClusterConfig, EventWire
from simulator.kernel import PRIORITY_ENGINE, PRIORITY_EVENTS, Kernel
from simulator.metrics import RunMetrics
from simulator.replica import EngineReplica, EngineRequest, SharedHost

PD_RULES = ("always", "conditional", "cost")


@dataclass(frozen=True)
class PDPlan:
    """How one router runs a PD deployment: the prefill pool's policy, the decode pool's
    policy (names from the policy registry, with their options), and the rule that
    decides whether a request is disaggregated. ``name`` labels it in results."""

    name: str
    prefill: str = "cache_aware"
    decode: str = "least_load"
    rule: str = "always"
    max_local_prefill_tokens: int = 0
    max_local_uncached_ratio: float | None = None
    prefill_options: Mapping[str, Any] = field(default_factory=dict)
    decode_options: Mapping[str, Any] = field(default_factory=dict)
    #: ``cost`` rule: the weight of the delay a local prefill imposes on each request
    #: decoding on the replica (1: every user's second counts the same).
    interference_weight: float = 1.0

    def __post_init__(self) -> None:
        import policies

        if self.rule not in PD_RULES:
            raise ConfigError("pd.rule", f"must be one of {', '.join(PD_RULES)}, got {self.rule!r}")
        value = self.max_local_prefill_tokens
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError("pd.max_local_prefill_tokens", f"must be an integer >= 0, got {value!r}")
        ratio = self.max_local_uncached_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0 < ratio <= 1):
            raise ConfigError("pd.max_local_uncached_ratio", f"must be in (0, 1] or None, got {ratio!r}")
        weight = self.interference_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ConfigError("pd.interference_weight", f"must be a number >= 0, got {weight!r}")
        for role in ("prefill", "decode"):
            cls = policies.policy_class(getattr(self, role))
            if self.rule == "cost" and not callable(getattr(cls, "costs", None)):
                raise ConfigError(f"pd.{role}", f"the cost rule needs a policy that estimates seconds "
                                                f"(a costs() method, as cache_aware has); {cls.__name__} has none")

    def local(self, prompt_tokens: int, decode_cached_tokens: int) -> bool:
        """Whether to prefill on the decode replica, which caches ``decode_cached_tokens``
        of the prompt: under ``conditional``, when the uncached tokens are at most
        ``max_local_prefill_tokens`` and (if set) under ``max_local_uncached_ratio`` of
        the prompt; under ``cost``, whether that bound lets the costs be compared
        (``PDCluster`` compares them)."""
        if self.rule == "always":
            return False
        uncached = max(0, prompt_tokens - decode_cached_tokens)
        ratio = self.max_local_uncached_ratio
        return uncached <= self.max_local_prefill_tokens and (ratio is None or uncached < ratio * prompt_tokens)


#: The PD plans of the league: kvroute's and the peers' as their code ships them
#: (docs/pd.md cites the source of each). Values of ``kvroute simulate --pd-plan NAME``.
PLANS: dict[str, PDPlan] = {}


def register_plan(plan: PDPlan) -> PDPlan:
    PLANS[plan.name] = plan
    return plan


# kvroute: cache_aware on both pools (on the decode pool it weighs each replica's queued
# work against the prompt it already holds, which a local prefill or a shorter transfer
# saves); every request disaggregated. "kvroute-conditional": prefill on the decode
# replica when at most 256 prompt tokens are not cached there (docs/pd.md: it cuts TTFT
# p50 and, on prefill-heavy traffic, p99, at a TPOT cost). "kvroute-cost": the same
# pools, and a request prefilled on its decode replica when that is estimated sooner, the
# delay to the replica's running decodes counted four times (a decode stalled mid-answer
# is worth more than a second of one request's wait: of 1, 2, 4, 8 and 16, 4 kept every
# workload's hit rate within 0.5 points of the best in `kvroute bench pd`; 1 left chat and
# agent 0.5-0.6 behind), than the best prefill replica plus the transfer (at most 2,048
# uncached tokens, Dynamo's bound for its conditional rule).
register_plan(PDPlan("kvroute", prefill="cache_aware", decode="cache_aware", rule="always"))
register_plan(PDPlan("kvroute-conditional", prefill="cache_aware", decode="cache_aware", rule="conditional",
                     max_local_prefill_tokens=256))
register_plan(PDPlan("kvroute-cost", prefill="cache_aware", decode="cache_aware", rule="cost",
                     max_local_prefill_tokens=2048, interference_weight=4.0))
# smg (lightseekorg/smg @ 73da68ca, model_gateway/src/routers/http/pd_router.rs
# select_pd_pair): one policy call per pool, independent; --prefill-policy and
# --decode-policy default to --policy, cache_aware; never prefills on the decode worker.
_SMG = {"cache_threshold": 0.3, "balance_abs_threshold": 64, "balance_rel_threshold": 1.5, "on_miss": "least_load"}
register_plan(PDPlan("smg", prefill="sglang", decode="sglang", rule="always", prefill_options=_SMG,
                     decode_options=_SMG))
# llm-d (llm-d/llm-d-inference-scheduler @ 520af478): decode profile first, then
# prefix-based-pd-decider: disaggregate iff the prompt's tokens not cached on the chosen
# decode pod >= nonCachedTokens (16 in deploy/config/pd-epp-config.yaml); both profiles
# score prefix-cache (weight 2) + queue (weight 1), max-score picker.
_LLMD = {"prefix_weight": 2.0, "queue_weight": 1.0, "kv_cache_weight": 0.0}
register_plan(PDPlan("llm-d", prefill="llmd", decode="llmd", rule="conditional", max_local_prefill_tokens=15,
                     prefill_options=_LLMD, decode_options=_LLMD))
# Dynamo (ai-dynamo/dynamo, lib/llm/src/kv_router/prefill_router): every request is
# disaggregated by default; the prefill worker by the KV router's cost, the decode worker
# by load alone (overlap credit 0). "dynamo-conditional": its experimental conditional
# disaggregation, policy isl_bounding: prefill on the decode worker iff the tokens it
# does not cache are < 2048 and < 0.7 of the prompt.
register_plan(PDPlan("dynamo", prefill="dynamo", decode="dynamo", rule="always",
                     decode_options={"overlap_score_weight": 0.0}))
register_plan(PDPlan("dynamo-conditional", prefill="dynamo", decode="dynamo", rule="conditional",
                     max_local_prefill_tokens=2047, max_local_uncached_ratio=0.7,
                     decode_options={"overlap_score_weight": 0.0}))
# Ray Serve LLM's PD application: a prefill and a decode deployment, each with its own
# request router (here Ray's PrefixCacheAffinityRouter on both); always disaggregated.
register_plan(PDPlan("ray-prefix", prefill="ray_prefix", decode="ray_prefix", rule="always"))


def plan_named(name: str) -> PDPlan:
    plan = PLANS.get(name)
    if plan is None:
        raise ConfigError("pd_plan", f"unknown PD plan {name!r} (valid: {', '.join(PLANS)})")
    return plan


@dataclass(frozen=True)
class PDConfig:
    """The PD deployment: replicas per pool, and the KV link into each decode replica
    (``kv_bytes_per_token``: 128 KiB for Llama-3-8B in bf16, 32 layers x 8 KV heads x 128
    x 2 (K, V) x 2 bytes; ``link_gbytes_per_s``: 50 GB/s, one 400 Gb/s NIC)."""

    prefill_replicas: int = 2
    decode_replicas: int = 2
    link_gbytes_per_s: float = 50.0
    transfer_latency_s: float = 0.001
    kv_bytes_per_token: int = 131_072

    def __post_init__(self) -> None:
        for name in ("prefill_replicas", "decode_replicas", "kv_bytes_per_token"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"pd.{name}", f"must be a positive integer, got {value!r}")
        for name, positive in (("link_gbytes_per_s", True), ("transfer_latency_s", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0):
                raise ConfigError(f"pd.{name}", f"must be a finite number {'> 0' if positive else '>= 0'}, "
                                                f"got {value!r}")

    def transfer_s(self, tokens: int) -> float:
        """Seconds the link is busy moving ``tokens`` tokens' KV (latency not included)."""
        return tokens * self.kv_bytes_per_token / (self.link_gbytes_per_s * 1e9)


class _Flight:
    """One request in a PD cluster: its route request, the router pair, the decode
    replica, and (disaggregated) the prefill replica and its engine request."""

    __slots__ = ("router", "request", "decode", "prefill", "prefill_req", "arrival_s", "transfer_wait_s")

    def __init__(self, router: int, request: RouteRequest, decode: str, arrival_s: float) -> None:
        self.router = router
        self.request = request
        self.decode = decode
        self.prefill: str | None = None
        self.prefill_req: EngineRequest | None = None
        self.arrival_s = arrival_s
        self.transfer_wait_s = 0.0


class PDCluster:
    """A prefill pool, a decode pool and one KV link into each decode replica, behind
    ``config.routers`` routers (each a prefill core and a decode core running ``plan``).

    Holds the engines by name, the in-flight requests (uid -> ``_Flight``; removed when
    they finish or are rejected: O(requests in flight)), each link's time it is next free,
    the KV events on the wire, per-pool routing counts and the metrics. ``submit`` costs
    one or two routing decisions plus the engine admission; a transfer O(1) plus the
    decode replica's prefix lookup. Same interface as ``simulator.cluster.Cluster`` for
    ``replay`` and ``run_policy``."""

    def __init__(self, kernel: Kernel, config: ClusterConfig, pd: PDConfig, plan: PDPlan,
                 metrics: RunMetrics | None = None) -> None:
        if config.changes:
            raise ConfigError("changes", "replica changes are not simulated with PD disaggregation")
        if config.autoscale is not None:
            raise ConfigError("autoscale", "autoscaling is not simulated with PD disaggregation")
        if config.replicas_per_host is not None:
            raise ConfigError("replicas_per_host", "hosts of several replicas are not simulated with PD "
                                                   "disaggregation (host_slots: one host for all)")
        self.kernel = kernel
        self.config = config
        self.pd = pd
        self.plan = plan
        self.metrics = metrics or RunMetrics()
        capacity = config.blocks_per_replica * config.block_size
        keys = {"kind": "tokens", "block_size": config.block_size}

        def core(policy: str, options: Mapping[str, Any], i: int, role: int) -> RoutingCore:
            return RoutingCore.from_options(policy, policy_options=dict(options), keys=keys,
                                            kv_capacity_tokens=capacity, seed=config.seed * 1000 + 2 * i + role,
                                            **config.router_options)

        self.prefill_cores = [core(plan.prefill, plan.prefill_options, i, 0) for i in range(config.routers)]
        self.decode_cores = [core(plan.decode, plan.decode_options, i, 1) for i in range(config.routers)]
        self.routers = self.prefill_cores + self.decode_cores  # run_policy sums their stats
        self.host = SharedHost(kernel, config.host_slots) if config.host_slots is not None else None
        self.engines: dict[str, EngineReplica] = {}
        self.prefill_names = [f"prefill-{i}" for i in range(pd.prefill_replicas)]
        self.decode_names = [f"decode-{i}" for i in range(pd.decode_replicas)]
        for name in self.prefill_names:
            self._add_engine(name, self._on_prefilled, None)
        for name in self.decode_names:
            self._add_engine(name, self._on_finished, self._on_first_token)
        now = kernel.now
        for cores, names in ((self.prefill_cores, self.prefill_names), (self.decode_cores, self.decode_names)):
            for c in cores:
                c.on_replicas_changed(names, now)
        self._in_flight: dict[int, _Flight] = {}
        self._link_free = dict.fromkeys(self.decode_names, 0.0)
        self._wire = EventWire(kernel, config.kv_event_delay_s, self._deliver_events)
        self._next_router = 0
        self.counts = {"remote": 0, "local": 0, "transfer_tokens": 0, "decode_hit_tokens": 0}
        self.prefill_routed = dict.fromkeys(self.prefill_names, 0)
        self.decode_routed = dict.fromkeys(self.decode_names, 0)
        self.transfer_waits: list[float] = []
        self._done = False
        kernel.schedule(config.report_interval_s, self._report, priority=PRIORITY_EVENTS)

    def _add_engine(self, name: str, on_finished, on_first_token) -> None:
        cfg = self.config
        events = cfg.kv_events
        self.engines[name] = EngineReplica(
            name, self.kernel, cfg.profile, num_blocks=cfg.blocks_per_replica, block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            fast_decode=cfg.fast_decode, host=self.host, on_first_token=on_first_token, on_finished=on_finished,
            on_stored=(lambda keys, n=name: self._kv_event(n, BlocksStored(tuple(keys)))) if events else None,
            on_removed=(lambda keys, n=name: self._kv_event(n, BlocksRemoved(tuple(keys)))) if events else None)
        self.metrics.replica_index(name)

    # -- requests --------------------------------------------------------------------------
    def submit(self, request_id: int, arrival_s: float, prompt_tokens: int, output_tokens: int,
               keys: Sequence[int], session_id: str | None = None) -> None:
        """Route one request now (the kernel's time is its arrival)."""
        self.metrics.on_submitted(arrival_s)
        index = self._next_router
        self._next_router = (index + 1) % len(self.decode_cores)
        now = self.kernel.now
        request = RouteRequest(keys=keys, prompt_tokens=prompt_tokens, block_tokens=self.config.block_size,
                               session_id=session_id, output_tokens=output_tokens, request_id=request_id)
        decode_core = self.decode_cores[index]
        chosen = decode_core.route(request, now)
        decode = chosen.replica
        if decode is None or not self.engines[decode].fits(prompt_tokens, output_tokens):
            if decode is not None:
                decode_core.on_completed(request_id, now)
            self.metrics.rejected += 1
            return
        flight = _Flight(index, request, decode, arrival_s)
        self.decode_routed[decode] += 1
        decode_cached = chosen.matched_blocks * self.config.block_size
        if self.plan.local(prompt_tokens, decode_cached) and (
                self.plan.rule != "cost" or self._local_is_sooner(request, index, decode, decode_cached)):
            self.counts["local"] += 1
            self.metrics.on_routed(decode, prompt_tokens, chosen.outcome)
            self._in_flight[request_id] = flight
            self.engines[decode].add_request(EngineRequest(request_id, prompt_tokens, output_tokens, keys,
                                                           arrival_s, tag=decode))
            return
        prefill_core = self.prefill_cores[index]
        placed = prefill_core.route(request, now)
        prefill = placed.replica
        if prefill is None or not self.engines[prefill].fits(prompt_tokens, 1):
            if prefill is not None:
                prefill_core.on_completed(request_id, now)
            decode_core.on_completed(request_id, now)
            self.metrics.rejected += 1
            return
        self.counts["remote"] += 1
        self.prefill_routed[prefill] += 1
        self.metrics.on_routed(prefill, prompt_tokens, placed.outcome)
        flight.prefill = prefill
        flight.prefill_req = EngineRequest(request_id, prompt_tokens, 1, keys, arrival_s, tag=prefill)
        self._in_flight[request_id] = flight
        self.engines[prefill].add_request(flight.prefill_req)

    @staticmethod
    def _costs(core: RoutingCore, request: RouteRequest, now: float) -> tuple[dict[str, float], Any]:
        """The pool's policy's estimated seconds per replica, and the view they read."""
        view = core.view(request, now)
        return core.policy.costs(request, view), view

    def _local_is_sooner(self, request: RouteRequest, index: int, decode: str, decode_cached: int) -> bool:
        """The ``cost`` rule: the decode replica's estimate, plus the prefill's delay to each
        request decoding there (``interference_weight`` each), against the best prefill
        replica's estimate plus moving the KV the decode replica lacks. O(replicas).

        The decode replica's estimate is read with the request already reserved there (it
        decodes there either way, so it is in that queue either way). Read before the
        reservation, the rule prefilled locally twice as often, and on the Mooncake trace
        lost 0.8 points of hit rate and 255 ms of TTFT p99 (``kvroute bench pd``, measured
        with ``interference_weight`` 1, before the weight was fitted to 4)."""
        now = self.kernel.now
        costs, view = self._costs(self.decode_cores[index], request, now)
        uncached = max(0, request.prompt_tokens - decode_cached)
        load = view.load.get(decode)
        running = load.running if load is not None else 0
        speed = load.speed if load is not None and load.speed > 0 else 1.0
        profile = self.decode_cores[index].policy.profile
        local = costs.get(decode, math.inf) + (
            self.plan.interference_weight * running * profile.prefill_s_per_token * uncached / speed)
        prefill_costs, _ = self._costs(self.prefill_cores[index], request, now)
        remote = min(prefill_costs.values(), default=math.inf) + self.pd.transfer_s(uncached) \
            + self.pd.transfer_latency_s
        return local <= remote

    def _on_prefilled(self, req: EngineRequest, now: float) -> None:
        """The prefill replica is done: move the KV the decode replica lacks, then decode."""
        flight = self._in_flight.get(req.uid)
        if flight is None:
            return
        core = self.prefill_cores[flight.router]
        core.on_first_token(req.uid, now)
        core.on_completed(req.uid, now)
        decode = self.engines[flight.decode]
        size = self.config.block_size
        held = len(decode.pool.longest_hit(flight.request.keys, (req.prompt_tokens - 1) // size)) * size
        tokens = req.prompt_tokens - held
        start = max(now, self._link_free[flight.decode])
        busy = self.pd.transfer_s(tokens)
        self._link_free[flight.decode] = start + busy
        arrive = start + busy + self.pd.transfer_latency_s
        flight.transfer_wait_s = arrive - now
        self.counts["transfer_tokens"] += tokens
        self.counts["decode_hit_tokens"] += held
        self.kernel.schedule(arrive, self._transferred, flight, priority=PRIORITY_ENGINE)

    def _transferred(self, flight: _Flight) -> None:
        request = flight.request
        self.transfer_waits.append(flight.transfer_wait_s)
        self.engines[flight.decode].add_request(EngineRequest(
            request.request_id, request.prompt_tokens, request.output_tokens, request.keys, flight.arrival_s,
            tag=flight.decode, transferred=True))

    def _on_first_token(self, req: EngineRequest, now: float) -> None:
        flight = self._in_flight.get(req.uid)
        if flight is not None:
            self.decode_cores[flight.router].on_first_token(req.uid, now)

    def _on_finished(self, req: EngineRequest, now: float) -> None:
        flight = self._in_flight.pop(req.uid, None)
        if flight is None:
            return
        self.decode_cores[flight.router].on_completed(req.uid, now)
        overhead = self.config.profile.request_overhead_s
        # The request's prefix-cache hit is its prefill's: on the prefill replica, or on
        # the decode replica when prefilled there.
        prefill = flight.prefill_req if flight.prefill_req is not None else req
        self.metrics.on_completed(prefill.tag, req.arrival_s, req.first_token_s + overhead, now + overhead,
                                  req.prompt_tokens, prefill.cached_tokens, req.max_output)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- engines -> routers ----------------------------------------------------------------
    def _cores_of(self, replica: str) -> list[RoutingCore]:
        return self.prefill_cores if replica.startswith("prefill-") else self.decode_cores

    def _kv_event(self, replica: str, event) -> None:
        self._wire.publish(replica, event)

    def _deliver_events(self, replica: str, events: list) -> None:
        now = self.kernel.now
        for core in self._cores_of(replica):
            for event in events:
                core.on_kv_event(replica, event, now)

    def _report(self) -> None:
        now = self.kernel.now
        for name, engine in self.engines.items():
            for core in self._cores_of(name):
                core.on_engine_report(name, now, kv_usage=engine.kv_usage(), waiting=len(engine.waiting),
                                      running=len(engine.running))
        if not self._done:
            self.kernel.schedule(now + self.config.report_interval_s, self._report, priority=PRIORITY_EVENTS)

    def finish(self) -> None:
        self._done = True

    def engine_totals(self) -> dict[str, int]:
        engines = self.engines.values()
        return {"preemptions": sum(e.preemptions for e in engines),
                "evictions": sum(e.pool.evictions for e in engines), "steps": sum(e.steps for e in engines)}

    def pd_summary(self) -> dict[str, Any]:
        """PD figures of the run: requests disaggregated (``remote``) or prefilled on their
        decode replica (``local``), KV tokens moved and found on the decode side, the
        transfer's wait (P done -> KV on D) p50/p99, and each pool's busiest replica's
        share of that pool's requests over its fair share."""
        waits = sorted(self.transfer_waits)

        def share(counts: dict[str, int]) -> float | None:
            total = sum(counts.values())
            return round(max(counts.values()) * len(counts) / total, 4) if total else None

        def pct(q: float) -> float | None:
            return round(waits[max(0, math.ceil(q * len(waits)) - 1)], 6) if waits else None

        return {"remote": self.counts["remote"], "local": self.counts["local"],
                "transfer_tokens": self.counts["transfer_tokens"],
                "decode_hit_tokens": self.counts["decode_hit_tokens"],
                "transfer_wait_p50_s": pct(0.5), "transfer_wait_p99_s": pct(0.99),
                "prefill_max_share_of_fair": share(self.prefill_routed),
                "decode_max_share_of_fair": share(self.decode_routed)}

"""``cache_aware``: kvroute's own policy and the default.

For each candidate replica it estimates the seconds until this request's first token, plus
what placing it there costs the requests after it, and sends the request where the sum is
smallest:

    ttft_r    = (queued_r + uncached_r) * token_s_r + step_s_r
                + pair_s * uncached_r * (held_r + uncached_r / 2)
    cost_r    = ttft_r / speed_r + work_weight * uncached_r * prefill_s_per_token
                + churn_weight * uncached_r * prefill_s_per_token * churn_r + barrier_r

  queued_r    uncached prompt tokens already waiting on r (this router's exact count, plus
              the engine's extra waiting requests when its report is fresh, each assumed
              as large as r's average waiting request)
  held_r      this request's prompt tokens r is believed to cache (matched blocks * block)
  uncached_r  the rest: prompt - held_r
  step_s_r    one engine step with r's running decodes (profile.step_s with no prefill)
  token_s_r   seconds per prefill token on r: the profile's compute cost, plus r's step
              time spread over the tokens one chunked-prefill step can take
  pair_s      the profile's prefill attention per (query, key) pair: long uncached prompts
              cost quadratically, so a long prompt values a cached prefix most
  work_weight the externality of recomputing a prefix another replica holds: those prefill
              seconds delay every request queued behind this one on r, and a copy made
              by choice pushes other prefixes out of r's cache. 2.0 was best of 0 to 5 on
              the shared Mooncake trace at its own rate and at three times it (hit rate
              37.5% -> 53%, TTFT p99 and mean down; docs/simulator.md)
  speed_r     r's speed relative to the profile (``ReplicaLoad.speed``, 1 unless the
              operator or the engine says otherwise: a mixed fleet): r's time to first
              token takes 1/speed_r of the profile's. The copy-work and churn terms, which
              price what a placement does to the cache, are not scaled: scaling them too
              gave a worse TTFT p99 on a half-slow fleet (249 ms against 178 ms;
              docs/simulator.md, "Mixed fleets")
  churn_r     how far r's cache turned over recently: the KV blocks this router wrote
              into it (each routed request's uncached prompt + output), decayed with a
              one-minute half-life (``router.load.CHURN_HALF_LIFE_S``), over r's capacity.
              Uncached blocks written into a cache that turns over fast push out
              prefixes used moments ago, likely to be used again; into one that turns
              over slowly, old ones. Without this term, at low load (every queue empty)
              only the matched blocks differ, so a replica that holds a prefix shared by
              all conversations (a system prompt) takes every new conversation, while
              the other replicas' caches idle: live through the gateway, 86% of a chat
              run's requests went to one of three servers, whose cache of 96 blocks then
              evicted the conversations' histories between turns (``kvroute bench peers``;
              README, "The live league"). ``churn_weight`` 0.5 (0 turns the term off)
              was chosen on the simulated league (docs/simulator.md, "Churn")
  barrier_r   rises steeply as r's KV cache fills: 0 up to ``kv_soft_limit`` of capacity,
              then ``kv_barrier_s * x**2 / (1 - u)`` with x = (u - soft) / (1 - soft) and u
              the projected usage after this request: the KV blocks this router's
              in-flight requests on r add beyond the prefixes r held for them (their
              uncached prompt + output tokens, ``ReplicaLoad.kv_added_blocks``) plus this
              request's own uncached prompt + expected output, over r's capacity

The KV barrier and several routers. In Ray Serve every proxy routes on its own, so the
barrier reads only what this router can keep exact and current: its own in-flight KV,
counted the way the barrier counts the new request (a prefix r already holds is held once,
not once per request). It does not read the engine's reported KV usage. That report is
one number every router receives at the same moment and keeps for a report interval,
while each router's own in-flight share is live. Taking the larger of the two (as before)
hid each router's own new requests whenever the report was higher, so with N routers, each
sending 1/N of the traffic, all of them turned away from the replicas that reported high
and crowded the ones that reported low until the next report; the steep barrier turns
small, stale differences between reports into seconds of cost (``kvroute bench routers``,
tight caches: 71.2% hits with 4 routers vs 77.2% with 1; now 77.8% vs 78.1%). Counting
each in-flight request's whole prompt (as before) also made a single router's barrier fire
on prefixes shared by many requests and held once (``mixed`` at 60 requests/s on 4
replicas of 2,000 blocks, mean of 5 seeds: 71.8% hits before, 77.2% now). The cost: the
barrier holds back less KV, so with long outputs over shared system prompts one router
loses about 2 points (README, Reliability). Other routers' traffic still reaches the cost
through the engine's waiting and running counts (``queued_r``, ``step_s_r``), which are
linear, and through the KV events that fill the tree.

Rules on top of the cost:
  * bounded load: a replica already holding at least ``max(bound_floor, ceil(load_factor *
    (in_flight + 1) / n))`` of this router's in-flight requests (the bounded-load rule of
    consistent hashing, with a floor) is ranked after every replica within bound. So a hot
    prefix shared by all requests never collapses onto one holder: when the best holder is
    over bound the request spills to the next best, and the core's speculative insert
    records the spill target as a new holder (hot-prefix replication). The floor (16)
    keeps the rule from firing on small counts, where the queue term already balances
    and a bound of 1 or 2 forced needless spills that halved the hit rate on long prompts.
    In an autoscaled deployment the floor follows the autoscaler instead (``max(1,
    ceil(load_factor * target_ongoing_requests))``; ``follow_autoscaler``, on by default):
    the autoscaler adds a replica because the replicas' mean load exceeds its target, and
    with a floor of 16 a replica holding the cached conversations kept every request
    while the added ones idled (live, 560 / 23 / 0 requests over three replicas; README,
    "Autoscaling, live"). With the target as the floor, a replica past it spills new work
    to the added ones, whose caches then fill;
  * sessions: the session's replica goes first unless it costs more than
    ``session_slack_s`` above the best (and is within bound);
  * ties are broken at random (``view.rng``).

The profile (``router.profile``) supplies the time constants; the default is roofline
arithmetic for an 8B model on an H100, and calibrated profiles can be named instead.
Returns every candidate as its own tier, best first, so Ray Serve falls back to the next
one when a replica's queue is full. O(replicas log replicas) per decision.

``costs`` and ``rank`` run in C (``router._speedups``) when it is built; the Python code
below is the reference, computes the same floats in the same order (the C build turns off
fused multiply-add) and runs whenever the C side declines an input (a non-dict mapping, a
non-int count, a repeated replica) or ``KVROUTE_PURE_PYTHON=1``. The router's own entry,
``rank_matched``, is a C ``Ranker`` put on the instance: the same ranking from the view's
fields, with no view object and no Python frame (see ``_install_ranker``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies.base import Policy, PolicyConfig, RouteRequest, RoutingView, Tiers, register_policy, require
from router._fast import speedups
from router.load import CHURN_HALF_LIFE_S, ReplicaLoad
from router.profile import DEFAULT_PROFILE, get_profile


@register_policy("cache_aware")
class CacheAwarePolicy(Policy):
    """Least estimated time-to-first-token, with a KV barrier, bounded load and sessions.

    Holds its validated config, the resolved latency profile and the autoscaler's load
    target (``load_target_changed``); no per-request state. See the module docstring for
    the cost model. O(n log n) for n candidates.
    """

    @dataclass(frozen=True, slots=True)
    class Config(PolicyConfig):
        profile: str = DEFAULT_PROFILE.name
        load_factor: float = 1.25
        session_slack_s: float = 0.25
        kv_soft_limit: float = 0.8
        kv_barrier_s: float = 0.1
        work_weight: float = 2.0
        bound_floor: int = 16
        churn_weight: float = 0.5
        follow_autoscaler: bool = True

        def check(self, policy: str) -> None:
            get_profile(self.profile)
            require(self.load_factor >= 1.0, f"{policy}.load_factor", f"must be >= 1, got {self.load_factor}")
            require(self.session_slack_s >= 0, f"{policy}.session_slack_s", f"must be >= 0, got {self.session_slack_s}")
            require(0 <= self.kv_soft_limit < 1, f"{policy}.kv_soft_limit", f"must be in [0, 1), got {self.kv_soft_limit}")
            require(self.kv_barrier_s >= 0, f"{policy}.kv_barrier_s", f"must be >= 0, got {self.kv_barrier_s}")
            require(self.work_weight >= 0, f"{policy}.work_weight", f"must be >= 0, got {self.work_weight}")
            require(self.bound_floor >= 1, f"{policy}.bound_floor", f"must be >= 1, got {self.bound_floor}")
            require(self.churn_weight >= 0, f"{policy}.churn_weight", f"must be >= 0, got {self.churn_weight}")
            require(isinstance(self.follow_autoscaler, bool), f"{policy}.follow_autoscaler",
                    f"must be true or false, got {self.follow_autoscaler!r}")

    _speedups = speedups  # None: Python only (tests set it on an instance)

    def __init__(self, config: PolicyConfig | None = None, **options) -> None:
        super().__init__(config, **options)
        self.profile = get_profile(self.config.profile)
        self._params_for: tuple = (None, None, None)  # the (config, profile, load target) of _params
        self._params: tuple = ()
        self._distinct: tuple | None = None  # the last replicas tuple checked to have no repeats
        # The C ranking's last tiers list, refilled in place once nothing else holds it
        # (router/_native/speedups.c, build_tiers): n + 1 fewer allocations per request.
        self._load_target: float | None = None  # the autoscaler's target_ongoing_requests
        self._tiers: list = [None]
        self._install_ranker()

    #: Attributes the C ``Ranker`` depends on: setting one reinstalls it.
    _RANKER_INPUTS = frozenset(("config", "profile", "_speedups", "_load_target"))

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in self._RANKER_INPUTS and "_tiers" in self.__dict__:  # after __init__
            self._install_ranker()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        if name in self._RANKER_INPUTS:
            self._install_ranker()

    def _install_ranker(self) -> None:
        """Shadow ``rank_matched`` (``Policy``'s: build the view, call ``rank``) on this
        instance with the C ``Ranker``, which returns the same tiers without a view or a
        Python frame per request and falls back to the method whenever the C cost loop
        declines (router/_native/speedups.c). Only when the speedups are built and the
        class ranks as CacheAwarePolicy does (a subclass with its own ``rank``, ``costs``
        or ``rank_matched`` keeps them)."""
        self.__dict__.pop("rank_matched", None)
        ranker = getattr(self._speedups, "Ranker", None)
        cls = type(self)
        if (ranker is not None and cls.rank is CacheAwarePolicy.rank and cls.costs is CacheAwarePolicy.costs
                and cls.rank_matched is Policy.rank_matched):
            self.__dict__["rank_matched"] = ranker(self, Policy.rank_matched, self._native_params(), _IDLE)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("rank_matched", None)  # the C Ranker: rebuilt on load
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._install_ranker()

    def load_target_changed(self, in_flight: float | None) -> None:
        self._load_target = in_flight  # reinstalls the C ranker (its constants hold the floor)

    def bound_floor(self) -> int:
        """The bounded-load rule's floor: the config's, or in an autoscaled deployment
        (``follow_autoscaler``) ``max(1, ceil(load_factor * target))``."""
        cfg = self.config
        if self._load_target is None or not cfg.follow_autoscaler:
            return cfg.bound_floor
        return max(1, math.ceil(cfg.load_factor * self._load_target - 1e-9))

    def _native(self, request: RouteRequest, view: RoutingView, jitter: bool, rank: bool):
        """The C cost loop (rank false: the costs dict; true: the tiers), or None when it
        is not built or declines the input (the Python code then runs; the C side declines
        before its first draw from ``view.rng``, so the Python code draws the same)."""
        fast = self._speedups
        if fast is None:
            return None
        return fast.cache_aware(view.replicas, view.load, view.matched_blocks, view.capacities,
                                view.default_capacity, view.now, request.prompt_tokens, request.block_tokens,
                                request.output_tokens or 0, self._native_params(), view.rng.random if jitter else None,
                                _IDLE, view.session_replica, self._mode(view.replicas) if rank else 0, self._tiers)

    def _native_params(self) -> tuple:
        """The constants of the C cost loop, from the config, profile and bound floor
        (rebuilt if either object was replaced or the floor moved with the autoscaler)."""
        cfg, prof, target = self.config, self.profile, self._load_target
        built = self._params_for
        if built[0] is not cfg or built[1] is not prof or built[2] != target:
            floor = self.bound_floor()
            self._params = (cfg.kv_soft_limit, cfg.kv_barrier_s, prof.step_overhead_s, prof.decode_s_per_seq,
                            prof.attention_s_per_context_token, prof.prefill_s_per_token,
                            prof.max_batched_tokens, cfg.load_factor, cfg.session_slack_s, _OVER_BOUND,
                            prof.prefill_attention_s_per_pair, cfg.work_weight, float(floor),
                            cfg.churn_weight, CHURN_HALF_LIFE_S)
            self._params_for = (cfg, prof, target)
        return self._params

    def _mode(self, replicas) -> int:
        """The C ranking's mode: 2 for a replicas tuple known to hold no repeats, else 1.
        The core passes the same tuple on every request: it is checked for repeats once (a
        repeat would need the Python dict semantics), not per call."""
        if replicas is not self._distinct and len(set(replicas)) == len(replicas):
            self._distinct = replicas
        return 2 if replicas is self._distinct else 1

    def costs(self, request: RouteRequest, view: RoutingView, *, jitter: bool = False) -> dict:
        """Estimated seconds to first token plus KV barrier, per candidate.

        With ``jitter`` each cost gets a random nanosecond-scale addition, which breaks
        exact ties at random without changing any real ordering. Written as one flat
        loop: it runs for every candidate on every request. O(candidates).
        """
        fast = self._native(request, view, jitter, rank=False)
        if fast is not None:
            return fast
        return self._costs_py(request, view, jitter)

    def _costs_py(self, request: RouteRequest, view: RoutingView, jitter: bool) -> dict:
        cfg = self.config
        prof = self.profile
        now = view.now
        prompt = request.prompt_tokens
        block_tokens = request.block_tokens
        output = request.output_tokens or 0
        matched = view.matched_blocks
        loads = view.load
        capacity_of = view.capacities.get
        default_capacity = view.default_capacity
        soft = cfg.kv_soft_limit
        barrier_s = cfg.kv_barrier_s
        overhead = prof.step_overhead_s
        per_seq = prof.decode_s_per_seq
        per_ctx = prof.attention_s_per_context_token
        per_token = prof.prefill_s_per_token
        pair_s = prof.prefill_attention_s_per_pair
        work = cfg.work_weight
        churn_weight = cfg.churn_weight
        max_batched = prof.max_batched_tokens
        rng = view.rng.random
        costs = {}
        for replica in view.replicas:
            load = loads.get(replica) or _IDLE
            queued = load.waiting_prefill_tokens
            running = load.running
            report_time = load.engine_report_time
            fresh = report_time is not None and now - report_time <= load._report_ttl_s
            if fresh:
                extra = (load.engine_waiting or 0) - load.waiting
                if extra > 0:  # requests other routers sent, sized like ours on average
                    queued += extra * (queued // load.waiting if load.waiting else prompt)
                if load.engine_running and load.engine_running > running:
                    running = load.engine_running
            step_s = overhead + per_seq * running + per_ctx * load.context_tokens
            budget = max_batched - running
            token_s = per_token + step_s / (budget if budget > 0 else 1)
            held = matched.get(replica, 0) * block_tokens
            uncached = prompt - held
            if uncached < 0:
                uncached = 0
            cost = (queued + uncached) * token_s + step_s
            attention = pair_s * uncached * (held + uncached / 2)
            copy_work = work * uncached * per_token
            speed = load.speed
            if speed == 1.0:
                cost += attention + copy_work
            else:  # ttft_r on a replica of speed s takes 1/s of the profile's time
                cost = (cost + attention) / speed + copy_work
            capacity = capacity_of(replica, default_capacity) if barrier_s or churn_weight else 0
            if churn_weight and capacity > 0:
                # Written into a cache that turned over recently, the uncached blocks push
                # out prefixes used recently (module docstring, "churn").
                cost += churn_weight * per_token * uncached * (load.churn(now) / capacity)
            if barrier_s:
                if capacity > 0:
                    # This router's own in-flight KV only, never the engine's usage report:
                    # see "the KV barrier and several routers" in the module docstring.
                    usage = load.kv_added_blocks / capacity
                    usage += (uncached + output) / (block_tokens * capacity)
                    if usage > soft:
                        usage = min(usage, 0.999)
                        x = (usage - soft) / (1.0 - soft)
                        cost += barrier_s * x * x / (1.0 - usage)
            if jitter:
                cost += rng() * 1e-9
            costs[replica] = cost
        return costs

    def rank(self, request: RouteRequest, view: RoutingView) -> Tiers:
        replicas = view.replicas
        if not replicas:
            return []
        if type(self).costs is CacheAwarePolicy.costs:  # a subclass's own costs() runs in Python
            tiers = self._native(request, view, jitter=True, rank=True)
            if tiers is not None:
                return tiers
        costs = self.costs(request, view, jitter=True)
        loads = view.load
        in_flight = {r: (loads.get(r) or _IDLE).in_flight for r in replicas}
        bound = max(self.bound_floor(),
                    math.ceil(self.config.load_factor * (sum(in_flight.values()) + 1) / len(replicas)))
        for replica, count in in_flight.items():
            if count >= bound:  # over its fair share: after every replica within bound
                costs[replica] += _OVER_BOUND
        order = sorted(replicas, key=costs.__getitem__)
        session = view.session_replica
        if (session is not None and session in costs and session != order[0]
                and costs[session] <= costs[order[0]] + self.config.session_slack_s):
            order.remove(session)
            order.insert(0, session)
        return [[replica] for replica in order]


_IDLE = ReplicaLoad()
_OVER_BOUND = 1e9  # seconds: larger than any real cost, so over-bound replicas sort last

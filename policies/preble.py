"""``preble``: Preble's E2 scheduler (exploit cached prefixes, explore by cost, rebalance)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from policies.base import (
    Policy,
    PolicyConfig,
    ReplicaId,
    RouteRequest,
    RoutingView,
    Tiers,
    register_policy,
    require,
)
from policies.least_load import shuffled
from router.errors import ConfigError
from router.profile import DEFAULT_PROFILE, LatencyProfile, get_profile


@register_policy("preble")
class Preble(Policy):
    """E2: exploit when the cached prefix outweighs the rest, else explore by least cost.

    What it does, per request (B = ``request.block_tokens``, P = ``prompt_tokens``):
      * matched = deepest match over the candidates, in tokens (``blocks * B``, at most P);
        remaining = P - matched.
      * Exploit if ``matched > remaining``: among the candidates holding the deepest match,
        the least loaded (ties at random). Load rebalancing: if that holder's load is at
        least ``rebalance_threshold`` times the lightest candidate's load (and is > 0), and
        at least ``rebalance_min_requests`` requests have been routed, the request goes to
        the lightest candidate instead (Preble moves the prefix to the lightest GPU).
      * Explore otherwise: the candidate of least cost (ties at random), where
            load(r) = windowed prefill time(r) + decode time(r)
            cost(r) = load(r) + eviction time(r) + this request's uncached prefill time on r
        - windowed prefill time: the uncached prompt tokens routed to r in the last
          ``window_s`` seconds (own bounded history, filled by ``observe_routed``) times the
          profile's prefill seconds per token;
        - decode time: active requests (``in_flight``) * expected output tokens * the
          profile's decode step time at r's current batch (``step_s(0, running,
          context_tokens)``); expected output = ``request.output_tokens`` or
          ``default_output_tokens``;
        - eviction time (``enable_eviction``): blocks this request's uncached part would
          push out of r's cache (cached + new - capacity, when the capacity is known),
          times the time to prefill them again.
    The pick is the first singleton tier; the other candidates follow by ascending explore
    cost (ties at random).

    Source: Preble (ICLR'25), WukLab/preble, multi_node/global_scheduler_with_time.py
    @ 785bd249 (``GlobalSchedulerWithTime.runtime_selector``: exploit iff the new leaf is
    shorter than the matched context, else argmin of windowed prefill + decode cost
    (``SlidingWindowHistogram.get_node_cost``: miss rate * count * prefill_time +
    active requests * output length * TPOT) plus ``virtual_evict_for_routing`` eviction cost;
    ``handle_important_node_stealing``: rebalance when the heaviest GPU's cost >=
    HIGH_LOAD_THRESHOLD (1.5) * the lightest's, after >= 50 routed requests; window
    ``timedelta(minutes=3)``; output length fallback 45 tokens). Preble's server entry point
    builds it with ``enable_eviction=True``.

    Defaults: window_s 180, rebalance_threshold 1.5, rebalance_min_requests 50,
    enable_eviction true, default_output_tokens 45, profile "llama3-8b-h100"
    (router.profile.DEFAULT_PROFILE), max_history 100000.
    Complexity: O(n log n) per call plus amortised O(1) history expiry; memory
    O(max_history + replicas) (each history entry is a (time, replica, tokens) tuple).

    Deviations:
      * Preble keeps per-prefix-node histograms and GPU allocations over its own radix tree
        and rebalances by reassigning prefix nodes; here the history is per replica and
        rebalancing is decided per request, for the request at hand.
      * Preble's miss rates, TPOT and output lengths are measured online; here prefill and
        decode times come from the latency profile, and the output length from the request.
      * Preble's eviction cost charges evicted "important" nodes by their windowed use;
        here the overflowing blocks are charged once at the profile's prefill rate.
      * Preble's exploit takes the argmin of its cost among the allocated GPUs (the paper:
        the least loaded); here the least ``load(r)``.
    """

    @dataclass(frozen=True, slots=True)
    class Config(PolicyConfig):
        window_s: float = 180.0
        rebalance_threshold: float = 1.5
        rebalance_min_requests: int = 50
        enable_eviction: bool = True
        default_output_tokens: int = 45
        profile: str = DEFAULT_PROFILE.name
        max_history: int = 100_000

        def check(self, policy: str) -> None:
            require(0.0 < self.window_s < math.inf, f"{policy}.window_s",
                    f"must be a finite number > 0, got {self.window_s!r}")
            require(1.0 <= self.rebalance_threshold < math.inf, f"{policy}.rebalance_threshold",
                    f"must be a finite number >= 1.0, got {self.rebalance_threshold!r}")
            require(self.rebalance_min_requests >= 0, f"{policy}.rebalance_min_requests",
                    f"must be >= 0, got {self.rebalance_min_requests!r}")
            require(self.default_output_tokens > 0, f"{policy}.default_output_tokens",
                    f"must be > 0, got {self.default_output_tokens!r}")
            require(self.max_history > 0, f"{policy}.max_history",
                    f"must be > 0, got {self.max_history!r}")
            try:
                get_profile(self.profile)
            except ConfigError as exc:
                raise ConfigError(f"{policy}.profile", str(exc)) from None

    def __init__(self, config=None, **options) -> None:
        super().__init__(config, **options)
        self.profile: LatencyProfile = get_profile(self.config.profile)
        self._history: deque[tuple[float, ReplicaId, int]] = deque()
        self._prefill_tokens: dict[ReplicaId, int] = {}  # windowed sum per replica
        self._routed = 0

    # -- windowed history ----------------------------------------------------------------
    def _expire(self, now: float) -> None:
        start = now - self.config.window_s
        history = self._history
        while history and history[0][0] < start:
            self._forget(history.popleft())

    def _forget(self, entry: tuple[float, ReplicaId, int]) -> None:
        _, replica, tokens = entry
        left = self._prefill_tokens.get(replica, 0) - tokens
        if left > 0:
            self._prefill_tokens[replica] = left
        else:
            self._prefill_tokens.pop(replica, None)

    def windowed_prefill_tokens(self, replica: ReplicaId) -> int:
        """Uncached prompt tokens routed to ``replica`` inside the window (as of the last call)."""
        return self._prefill_tokens.get(replica, 0)

    @property
    def history_len(self) -> int:
        return len(self._history)

    def observe_routed(self, request: RouteRequest, replica: ReplicaId, now: float,
                       matched_blocks: int = 0) -> None:
        block = max(1, request.block_tokens)
        tokens = max(0, request.prompt_tokens - max(0, matched_blocks) * block)
        self._expire(now)
        self._history.append((now, replica, tokens))
        self._prefill_tokens[replica] = self._prefill_tokens.get(replica, 0) + tokens
        while len(self._history) > self.config.max_history:
            self._forget(self._history.popleft())
        self._routed += 1

    def replicas_changed(self, replicas: Sequence[ReplicaId]) -> None:
        keep = set(replicas)
        self._history = deque(e for e in self._history if e[1] in keep)
        sums: dict[Hashable, int] = {}
        for _, replica, tokens in self._history:
            sums[replica] = sums.get(replica, 0) + tokens
        self._prefill_tokens = {r: t for r, t in sums.items() if t > 0}

    # -- routing -------------------------------------------------------------------------
    def rank(self, request: RouteRequest, view: RoutingView) -> Tiers:
        candidates = view.replicas
        if not candidates:
            return []
        cfg = self.config
        prof = self.profile
        self._expire(view.now)

        block = max(1, request.block_tokens)
        prompt = max(0, request.prompt_tokens)
        output = request.output_tokens if request.output_tokens and request.output_tokens > 0 \
            else cfg.default_output_tokens
        matched = {r: min(max(view.matched(r), 0), request.blocks) for r in candidates}
        uncached = {r: max(0, prompt - matched[r] * block) for r in candidates}

        load: dict[ReplicaId, float] = {}
        cost: dict[ReplicaId, float] = {}
        for r in candidates:
            rl = view.load_of(r)
            prefill_s = prof.prefill_s_per_token * self.windowed_prefill_tokens(r)
            decode_s = rl.in_flight * output * prof.step_s(0, rl.running, rl.context_tokens) \
                if rl.in_flight > 0 else 0.0
            load[r] = prefill_s + decode_s
            eviction_s = 0.0
            capacity = view.capacity_blocks(r)
            if cfg.enable_eviction and capacity > 0:
                new_blocks = request.blocks - matched[r]
                overflow = view.cached_blocks(r) + new_blocks - capacity
                if overflow > 0:
                    eviction_s = prof.prefill_s_per_token * overflow * block
            cost[r] = load[r] + eviction_s + prof.prefill_s_per_token * uncached[r]

        order = shuffled(view, candidates)  # random tie-break for every sort below
        by_cost = sorted(order, key=cost.__getitem__)

        deepest = max(matched.values())
        matched_tokens = min(prompt, deepest * block)
        if deepest > 0 and matched_tokens > prompt - matched_tokens:
            holders = [r for r in order if matched[r] == deepest]
            pick = min(holders, key=load.__getitem__)
            lightest = min(order, key=load.__getitem__)
            if (self._routed >= cfg.rebalance_min_requests and load[pick] > 0
                    and load[pick] >= cfg.rebalance_threshold * load[lightest]):
                pick = lightest
        else:
            pick = by_cost[0]
        return [[pick]] + [[r] for r in by_cost if r != pick]

"""``least_uncached``: least uncached prefill tokens, with session stickiness.

A worked example of a third-party kvroute policy (docs/policies.md is the contract). For
each candidate replica r, with B = ``request.block_tokens``:

    uncached(r) = max(0, request.prompt_tokens - view.matched(r) * B)
    cost(r)     = view.load_of(r).waiting_prefill_tokens + uncached(r)

i.e. the prompt tokens that must be prefilled on r before this request's first token:
the prefill already queued there plus this request's part r does not cache. The request
goes where that is smallest. Two rules on top:

* bounded load: a replica already holding ``max(bound_floor, ceil(load_factor *
  (in_flight + 1) / n))`` or more of this router's in-flight requests is ranked after every
  replica within the bound, so a prefix every request shares cannot pull all traffic onto
  the one replica that caches it (the collapse every kvroute policy is checked for);
* sessions: the replica the request's session last went to (``view.session_replica``)
  goes first if it is within the bound and costs at most ``session_slack_tokens`` more
  than the cheapest replica.

Replicas of equal cost share one tier, so whoever applies the ranking (Ray Serve, or
``RoutingCore.route`` in the simulator) picks the one with the fewest requests in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies.base import Policy, PolicyConfig, RouteRequest, RoutingView, Tiers, register_policy, require


@register_policy("least_uncached")
class LeastUncachedTokens(Policy):
    """Fewest prefill tokens ahead of the first token, within a load bound, sessions sticky.

    Holds only its validated ``config`` (``LeastUncachedTokens.Config``): no per-request
    state, nothing that grows with traffic. Reads ``view.replicas``, ``view.matched``,
    ``view.load_of`` (``waiting_prefill_tokens``, ``in_flight``) and
    ``view.session_replica``; never does I/O, never reads a clock, never draws random
    numbers (ties are left to the applier inside a tier).

    Complexity: O(n log n) time and O(n) memory per ``rank`` call for n candidates.
    Options (validated at construction, errors name ``least_uncached.<field>``):
      session_slack_tokens  extra cost (tokens) the session's replica may have over the
                            cheapest before the session is broken; int >= 0, default 512
      load_factor           bounded-load factor over the fair share; float >= 1, default 1.5
      bound_floor           the bound never goes below this many in-flight requests;
                            int >= 1, default 8
    """

    @dataclass(frozen=True, slots=True)
    class Config(PolicyConfig):
        session_slack_tokens: int = 512
        load_factor: float = 1.5
        bound_floor: int = 8

        def check(self, policy: str) -> None:
            require(self.session_slack_tokens >= 0, f"{policy}.session_slack_tokens",
                    f"must be >= 0, got {self.session_slack_tokens}")
            require(self.load_factor >= 1.0, f"{policy}.load_factor", f"must be >= 1, got {self.load_factor}")
            require(self.bound_floor >= 1, f"{policy}.bound_floor", f"must be >= 1, got {self.bound_floor}")

    def cost(self, request: RouteRequest, view: RoutingView, replica) -> int:
        """Prompt tokens to prefill on ``replica`` before this request's first token. O(1)."""
        uncached = request.prompt_tokens - view.matched(replica) * request.block_tokens
        return view.load_of(replica).waiting_prefill_tokens + max(0, uncached)

    def rank(self, request: RouteRequest, view: RoutingView) -> Tiers:
        replicas = view.replicas
        if not replicas:
            return []
        cfg = self.config
        in_flight = {r: view.load_of(r).in_flight for r in replicas}
        bound = max(cfg.bound_floor, math.ceil(cfg.load_factor * (sum(in_flight.values()) + 1) / len(replicas)))
        costs = {r: self.cost(request, view, r) for r in replicas}
        within = sorted((r for r in replicas if in_flight[r] < bound), key=costs.__getitem__)
        over = sorted((r for r in replicas if in_flight[r] >= bound), key=costs.__getitem__)

        session = view.session_replica
        first: list = []
        if (session is not None and session in costs and within and in_flight[session] < bound
                and costs[session] <= costs[within[0]] + cfg.session_slack_tokens):
            within.remove(session)
            first = [[session]]
        return first + _group_equal(within, costs) + _group_equal(over, costs)


def _group_equal(order: list, costs: dict) -> Tiers:
    """Consecutive replicas of equal cost in one tier (``order`` is sorted by cost). O(n)."""
    tiers: Tiers = []
    previous = None
    for replica in order:
        cost = costs[replica]
        if tiers and cost == previous:
            tiers[-1].append(replica)
        else:
            tiers.append([replica])
        previous = cost
    return tiers

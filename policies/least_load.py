"""``least_load``: join the shortest queue, counted as this router's requests in flight.

Also home of two small helpers the other peer policies share (``shuffled`` and
``rank_by``): a full ranking as singleton tiers with a random tie-break drawn from
``view.rng``, so ties never favour the first-listed replica.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from policies.base import Policy, ReplicaId, RouteRequest, RoutingView, Tiers, register_policy


def shuffled(view: RoutingView, replicas: Sequence[ReplicaId]) -> list[ReplicaId]:
    """A uniformly random permutation of ``replicas`` drawn from ``view.rng``. O(n)."""
    order = list(replicas)
    view.rng.shuffle(order)
    return order


def rank_by(view: RoutingView, replicas: Sequence[ReplicaId],
            key: Callable[[ReplicaId], Any]) -> Tiers:
    """Every replica as a singleton tier, ascending by ``key``; ties in random order.

    Shuffle, then a stable sort: each replica tied on the best key is equally likely to come
    first. O(n log n).
    """
    order = shuffled(view, replicas)
    order.sort(key=key)
    return [[r] for r in order]


@register_policy("least_load")
class LeastLoad(Policy):
    """Fewest requests in flight from this router (``load.in_flight``); ties broken at random.

    What it does: ranks every candidate by its in-flight count, ascending, as singleton tiers
    (so a full replica is skipped in favour of the next least loaded); replicas with equal
    counts are ordered uniformly at random via ``view.rng``.

    Source: the classic join-shortest-queue baseline; it is the "shortest queue" branch of the
    SGLang router's ``cache_aware`` policy (sgl-project/sglang,
    sgl-router/src/policies/cache_aware.rs, ``min_by_key(|w| w.load())``), where the load is
    the router's own count of requests sent and not yet completed.

    Defaults: no options.
    Complexity: O(n log n) time, O(n) memory per call; no state.
    Deviation: SGLang's ``min_by_key`` returns the first minimal worker; here ties are broken
    uniformly at random, so a cold start does not pile onto the first-listed replica.
    """

    def rank(self, request: RouteRequest, view: RoutingView) -> Tiers:
        if not view.replicas:
            return []
        return rank_by(view, view.replicas, lambda r: view.load_of(r).in_flight)

"""``pow2``: Ray Serve's power-of-two-choices request router."""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import Policy, ReplicaId, RouteRequest, RoutingView, Tiers, register_policy


def two_random_choices(view: RoutingView, candidates: Sequence[ReplicaId]) -> list[ReplicaId]:
    """At most two distinct candidates, uniformly random, exactly as Ray 2.60 draws them.

    n == 1 -> that one; n == 2 -> both, in random order; n >= 3 -> i uniform in [0, n), j
    uniform in [0, n - 1) shifted up past i: every ordered pair equally likely. O(1) draws.
    """
    n = len(candidates)
    if n == 0:
        return []
    if n == 1:
        return [candidates[0]]
    rng = view.rng
    if n == 2:
        return [candidates[0], candidates[1]] if rng.getrandbits(1) else [candidates[1], candidates[0]]
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:
        j += 1
    return [candidates[i], candidates[j]]


@register_policy("pow2")
class PowerOfTwo(Policy):
    """Power of two choices: two distinct random candidates in one tier.

    What it does: draws two distinct candidates uniformly at random and returns them as ONE
    tier; the applier then sends the request to the one with fewer requests in flight (the
    first listed on a tie, and the order inside the pair is itself random).

    Source: Ray Serve ``PowerOfTwoChoicesRequestRouter.choose_replicas`` (Ray 2.60.0,
    ray/serve/_private/request_router/pow_2_router.py): the same draws (``getrandbits(1)``
    for two candidates, ``randrange(n)`` then ``randrange(n - 1)`` shifted past the first for
    three or more), returning ``[[a, b]]``; Ray then probes both queue lengths and takes the
    shorter.

    Defaults: no options.
    Complexity: O(1) per call; no state.
    Deviation: the comparison inside the pair is done by the applier on this router's
    in-flight counts, not on queue lengths probed from the replicas. Like Ray's single
    iteration, no fallback tier: if both are full, Ray retries with a fresh pair after a
    backoff, which is the caller's loop here.
    """

    def rank(self, request: RouteRequest, view: RoutingView) -> Tiers:
        pair = two_random_choices(view, view.replicas)
        return [pair] if pair else []

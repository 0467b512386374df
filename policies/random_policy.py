"""``random``: a uniformly random candidate."""

from __future__ import annotations

from policies.base import Policy, RouteRequest, RoutingView, Tiers, register_policy
from policies.least_load import shuffled


@register_policy("random")
class RandomPolicy(Policy):
    """Uniform random choice among the candidates, drawn from ``view.rng``.

    What it does: returns a uniformly random permutation of the candidates as singleton
    tiers; the first tier is therefore a uniform pick, and the rest are random fallbacks for
    when that replica is full.

    Source: SGLang router ``RandomPolicy`` (sgl-project/sglang,
    sgl-router/src/policies/random.rs): ``rng.random_range(0..healthy.len())``.

    Defaults: no options.
    Complexity: O(n) time and memory per call; no state.
    Deviation: none in the pick; the fallback order after the first tier is our addition.
    """

    def rank(self, request: RouteRequest, view: RoutingView) -> Tiers:
        if not view.replicas:
            return []
        return [[r] for r in shuffled(view, view.replicas)]

"""``ray_prefix``: Ray Serve LLM's ``PrefixCacheAffinityRouter``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies.base import (
    Policy,
    PolicyConfig,
    RouteRequest,
    RoutingView,
    Tiers,
    register_policy,
    require,
)
from policies.pow2 import two_random_choices


@register_policy("ray_prefix")
class RayPrefixCacheAffinity(Policy):
    """Prefix-cache affinity with a power-of-two fallback, as Ray Serve LLM routes.

    What it does, per request, over the candidates:
      1. Queue length of each candidate = ``load.queue_len(now)``. If
         ``max - min > imbalanced_threshold`` the load is imbalanced: fall back to power of
         two choices (one tier of two distinct random candidates).
      2. Otherwise the match rate is the deepest match over the candidates divided by the
         request's length (``matched blocks / request blocks``; 0 for a request with no
         blocks). If ``rate >= match_rate_threshold``: one tier holding every candidate
         that holds that deepest match (all candidates when nothing matches).
      3. Else: one tier holding the candidates with the fewest cached blocks (the
         "smallest tenants").
      4. If the chosen tier is empty, the power-of-two fallback.
    The applier then picks the member of the tier with the fewest requests in flight, as Ray
    picks the one with the shortest queue.

    Source: Ray 2.60.0, ray/llm/_internal/serve/routing_policies/prefix_aware/
    prefix_aware_router.py (``PrefixCacheAffinityRouter._prefix_match_best_replicas`` and
    ``choose_replicas``) with prefix_tree.py (``prefix_match``, ``get_smallest_tenants``).

    Defaults (Ray's ``initialize_state``): imbalanced_threshold = inf (never imbalanced),
    match_rate_threshold = 0.1.
    Complexity: O(n) per call; no state (the prefix tree is the router core's).

    Deviations:
      * Ray measures the match in characters of a character tree; here in key blocks of
        fixed size, equal to the character rate up to one block.
      * Ray's "smallest tenants" are taken over every tenant in the tree (which can name a
        replica outside the candidates); here only candidates are considered.
      * Ray's queue lengths come from probing replicas (or its queue-length cache); here
        from ``ReplicaLoad.queue_len``: the engine's fresh report, else this router's count.
      * Ray divides by ``len(text)`` and would fail on an empty prompt; here the rate is 0.
    """

    @dataclass(frozen=True, slots=True)
    class Config(PolicyConfig):
        imbalanced_threshold: float = math.inf
        match_rate_threshold: float = 0.1

        def check(self, policy: str) -> None:
            require(self.imbalanced_threshold >= 0, f"{policy}.imbalanced_threshold",
                    f"must be >= 0 (inf disables the fallback), got {self.imbalanced_threshold!r}")
            require(0.0 <= self.match_rate_threshold <= 1.0, f"{policy}.match_rate_threshold",
                    f"must be between 0 and 1, got {self.match_rate_threshold!r}")

    def rank(self, request: RouteRequest, view: RoutingView) -> Tiers:
        candidates = view.replicas
        if not candidates:
            return []
        cfg = self.config
        now = view.now
        queues = [view.load_of(r).queue_len(now) for r in candidates]
        if max(queues) - min(queues) > cfg.imbalanced_threshold:
            return [two_random_choices(view, candidates)]

        blocks = request.blocks
        matched = {r: min(max(view.matched(r), 0), blocks) for r in candidates}
        deepest = max(matched.values())
        rate = deepest / blocks if blocks > 0 else 0.0
        if rate >= cfg.match_rate_threshold:
            chosen = [r for r in candidates if matched[r] == deepest]
        else:
            sizes = {r: view.cached_blocks(r) for r in candidates}
            smallest = min(sizes.values())
            chosen = [r for r in candidates if sizes[r] == smallest]
        if not chosen:
            return [two_random_choices(view, candidates)]
        return [chosen]

"""``sglang``: the SGLang router's ``cache_aware`` policy."""

from __future__ import annotations

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
from policies.least_load import rank_by


@register_policy("sglang")
class SGLangCacheAware(Policy):
    """Cache-aware routing with a load-imbalance override, as the SGLang router does it.

    What it does, per request, over the candidates (load = this router's in-flight count):
      1. Imbalanced iff ``max - min > balance_abs_threshold`` AND
         ``max > balance_rel_threshold * min``: route to the least loaded candidate.
      2. Otherwise match rate = deepest match / request length (blocks; 0 for an empty
         request). If ``rate > cache_threshold`` (strictly): the candidate holding the
         deepest match (one of them, at random, when several hold it).
      3. Else the candidate with the smallest tree (fewest cached blocks, ties at random);
         with ``on_miss="least_load"``, the least loaded one (current smg,
         lightseekorg/smg model_gateway/src/policies/cache_aware.rs @ 73da68ca, and the
         sgl-model-gateway it came from; its defaults there: cache_threshold 0.3,
         balance_abs_threshold 64, balance_rel_threshold 1.5).
    The pick is returned as the first singleton tier; the other candidates follow as
    singleton tiers in least-loaded order (ties at random) so the applier can skip a full
    replica. The tree insert SGLang does on every decision (also when imbalanced) is the
    router core's ``observe_routed`` path, not the policy's.

    Source: sgl-project/sglang, sgl-router/src/policies/cache_aware.rs @ b6f20641 (same logic
    @ 026f853b): ``select_worker``; tree.rs (``prefix_match`` returns the first tenant of the
    deepest node, ``get_smallest_tenant`` the tenant with the fewest characters);
    config validation in sgl-router/src/config/validation.rs.

    Defaults (``CacheAwareConfig::default``): cache_threshold 0.5, balance_abs_threshold 32,
    balance_rel_threshold 1.1. Validation as SGLang's: cache_threshold in [0, 1],
    balance_rel_threshold >= 1.0, balance_abs_threshold >= 0.
    Complexity: O(n log n) per call (the fallback ordering); no state.

    Deviations:
      * The miss branch follows the source at the cited commits: the smallest tree, not the
        least loaded replica (DESIGN.md says least loaded; the code says smallest tenant).
      * SGLang's tree stores characters; the match rate here is in key blocks, equal up to
        one block.
      * Among several holders of the deepest match SGLang takes the first key of a DashMap
        (arbitrary hash order); here one at random. Smallest-tree ties: same.
      * SGLang computes min/max load over all workers, healthy or not, and the smallest
        tenant over the whole tree; here over the candidates only.
    """

    @dataclass(frozen=True, slots=True)
    class Config(PolicyConfig):
        cache_threshold: float = 0.5
        balance_abs_threshold: int = 32
        balance_rel_threshold: float = 1.1
        on_miss: str = "smallest_tree"

        def check(self, policy: str) -> None:
            require(self.on_miss in ("smallest_tree", "least_load"), f"{policy}.on_miss",
                    f"must be smallest_tree or least_load, got {self.on_miss!r}")
            require(0.0 <= self.cache_threshold <= 1.0, f"{policy}.cache_threshold",
                    f"must be between 0.0 and 1.0, got {self.cache_threshold!r}")
            require(self.balance_abs_threshold >= 0, f"{policy}.balance_abs_threshold",
                    f"must be >= 0, got {self.balance_abs_threshold!r}")
            require(self.balance_rel_threshold >= 1.0, f"{policy}.balance_rel_threshold",
                    f"must be >= 1.0, got {self.balance_rel_threshold!r}")

    def rank(self, request: RouteRequest, view: RoutingView) -> Tiers:
        candidates = view.replicas
        if not candidates:
            return []
        cfg = self.config
        loads = {r: view.load_of(r).in_flight for r in candidates}
        by_load = rank_by(view, candidates, loads.__getitem__)
        max_load = max(loads.values())
        min_load = min(loads.values())
        imbalanced = (max_load - min_load > cfg.balance_abs_threshold
                      and max_load > min_load * cfg.balance_rel_threshold)
        if imbalanced:
            return by_load

        blocks = request.blocks
        matched = {r: min(max(view.matched(r), 0), blocks) for r in candidates}
        deepest = max(matched.values())
        rate = deepest / blocks if blocks > 0 else 0.0
        if rate > cfg.cache_threshold:
            pool = [r for r in candidates if matched[r] == deepest]
        elif cfg.on_miss == "least_load":
            return by_load
        else:
            sizes = {r: view.cached_blocks(r) for r in candidates}
            smallest = min(sizes.values())
            pool = [r for r in candidates if sizes[r] == smallest]
        pick: ReplicaId = pool[view.rng.randrange(len(pool))] if len(pool) > 1 else pool[0]
        return [[pick]] + [tier for tier in by_load if tier[0] != pick]

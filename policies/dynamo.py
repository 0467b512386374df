"""``dynamo``: NVIDIA Dynamo's KV router cost function (``DefaultWorkerSelector``)."""

from __future__ import annotations

import math
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


@register_policy("dynamo")
class DynamoKvRouter(Policy):
    """Least cost = weighted prefill blocks + decode blocks, argmin or softmax-sampled.

    What it does, per candidate r (block size B = ``request.block_tokens``):
        prefill_tokens(r) = load.waiting_prefill_tokens               (queued prefill work)
                          + max(0, prompt_tokens - matched(r) * B)    (this request, uncached)
        decode_blocks(r)  = load.kv_blocks + request.blocks           (active KV blocks + new)
        cost(r)           = overlap_score_weight * prefill_tokens(r) / B + decode_blocks(r)
    With ``router_temperature == 0`` the replica of least cost; among equal costs the one
    with the smallest tree (``view.cached_blocks``), and at random when those tie too.
    With T > 0 one replica is sampled with p(r) ~ exp(-(cost(r) - c_min) / ((c_max - c_min) * T))
    (uniform when all costs are equal). The pick is the first singleton tier; the other
    candidates follow by ascending cost (then tree size, then random) so the applier can
    skip a full replica.

    Source: ai-dynamo/dynamo, lib/llm/src/kv_router/scheduler.rs @ db19bd2a
    (``DefaultWorkerSelector::select_worker``: ``logit = overlap_weight *
    potential_prefill_block + decode_block``; ``softmax_sample``: min-max normalised,
    negated, divided by the temperature; ties at T = 0 broken by tree size, then random) and
    the per-worker loads of lib/llm/src/kv_router/sequence.rs
    (``potential_blocks_and_tokens``: active blocks + new blocks, active prefill tokens +
    ``isl - overlap * block_size``). Defaults from ``KvRouterConfig::default``.
    Later versions rename the weight ``prefill_load_scale`` and add overlap credits; this
    follows the cited one.

    Defaults: overlap_score_weight = 1.0, router_temperature = 0.0.
    Complexity: O(n log n) per call (the fallback ordering); no state.

    Deviations:
      * Dynamo's new decode blocks are the request's blocks not already held by the
        worker's active sequences; the view does not expose active-sequence overlap, so all
        of the request's blocks are counted on every candidate. That adds the same constant
        to every cost and so changes no decision (argmin and the min-max-normalised softmax
        are both shift-invariant).
      * Dynamo's active prefill tokens decay as a prefill progresses; here the waiting
        requests' uncached tokens count in full until their first token.
    """

    @dataclass(frozen=True, slots=True)
    class Config(PolicyConfig):
        overlap_score_weight: float = 1.0
        router_temperature: float = 0.0

        def check(self, policy: str) -> None:
            require(0.0 <= self.overlap_score_weight < math.inf, f"{policy}.overlap_score_weight",
                    f"must be a finite number >= 0, got {self.overlap_score_weight!r}")
            require(0.0 <= self.router_temperature < math.inf, f"{policy}.router_temperature",
                    f"must be a finite number >= 0, got {self.router_temperature!r}")

    def costs(self, request: RouteRequest, view: RoutingView) -> dict[ReplicaId, float]:
        """Dynamo's logit (lower is better) for every candidate."""
        weight = self.config.overlap_score_weight
        block = max(1, request.block_tokens)
        prompt = max(0, request.prompt_tokens)
        new_blocks = request.blocks
        out: dict[ReplicaId, float] = {}
        for r in view.replicas:
            load = view.load_of(r)
            cached_tokens = min(max(view.matched(r), 0), request.blocks) * block
            prefill_tokens = load.waiting_prefill_tokens + max(0, prompt - cached_tokens)
            decode_blocks = load.kv_blocks + new_blocks
            out[r] = weight * prefill_tokens / block + decode_blocks
        return out

    def rank(self, request: RouteRequest, view: RoutingView) -> Tiers:
        candidates = view.replicas
        if not candidates:
            return []
        cost = self.costs(request, view)
        tree = {r: view.cached_blocks(r) for r in candidates}
        order = shuffled(view, candidates)
        order.sort(key=lambda r: (cost[r], tree[r]))
        temperature = self.config.router_temperature
        if temperature == 0.0:
            pick = order[0]  # least cost, then smallest tree, then random (the shuffle)
        else:
            pick = self._sample(candidates, cost, temperature, view.rng.random())
        return [[pick]] + [[r] for r in order if r != pick]

    @staticmethod
    def _sample(candidates, cost, temperature: float, u: float) -> ReplicaId:
        values = [cost[r] for r in candidates]
        lo, hi = min(values), max(values)
        if lo == hi:
            probs = [1.0 / len(values)] * len(values)
        else:
            scale = (hi - lo) * temperature
            weights = [math.exp(-(v - lo) / scale) for v in values]
            total = sum(weights)
            probs = [w / total for w in weights]
        cumulative = 0.0
        for r, p in zip(candidates, probs):
            cumulative += p
            if u <= cumulative:
                return r
        return candidates[-1]

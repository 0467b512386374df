"""``round_robin``: cycle through the candidates in order."""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import Policy, ReplicaId, RouteRequest, RoutingView, Tiers, register_policy

_WRAP = 1 << 62  # keep the counter a small int; any multiple of every n would do as well


@register_policy("round_robin")
class RoundRobin(Policy):
    """Round robin over the candidate list: the k-th call starts at candidate ``k mod n``.

    What it does: keeps one counter; each ``rank`` call takes ``i = counter mod n`` over the
    current candidates (n of them), increments the counter and returns the candidates
    rotated to start at ``i`` as singleton tiers, so a full replica is skipped in favour of
    the next one in round-robin order.

    Source: SGLang router ``RoundRobinPolicy`` (sgl-project/sglang,
    sgl-router/src/policies/round_robin.rs @ 098565a6): ``counter.fetch_add(1) %
    healthy.len()`` over the healthy workers, the counter kept across changes of the set.

    Defaults: no options.
    Complexity: O(n) time per call (building the rotation); O(1) state (one counter).
    Deviation: the counter advances per ``rank`` call (as SGLang advances per selection),
    not per ``observe_routed``; ``replicas_changed`` resets it, like SGLang's ``reset``.
    """

    def __init__(self, config=None, **options) -> None:
        super().__init__(config, **options)
        self._counter = 0

    def rank(self, request: RouteRequest, view: RoutingView) -> Tiers:
        candidates = view.replicas
        n = len(candidates)
        if n == 0:
            return []
        start = self._counter % n
        self._counter = (self._counter + 1) % _WRAP
        return [[r] for r in candidates[start:] + candidates[:start]]

    def replicas_changed(self, replicas: Sequence[ReplicaId]) -> None:
        self._counter = 0

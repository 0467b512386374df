"""``session``: consistent hashing of the session with bounded loads."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import xxhash

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

_xxh3 = xxhash.xxh3_64_intdigest
_U64 = (1 << 64) - 1
_RING_CACHE_SIZE = 8


def _replica_point(replica: ReplicaId, index: int) -> int:
    return _xxh3(f"kvroute-ring\x00{replica}\x00{index}".encode("utf-8", "surrogatepass"))


def _session_point(session_id: str) -> int:
    return _xxh3(b"kvroute-session\x00" + session_id.encode("utf-8", "surrogatepass"))


def _key_point(key: int) -> int:
    return _xxh3(b"kvroute-key\x00" + (key & _U64).to_bytes(8, "little"))


class _Ring:
    """Sorted virtual-node points of one candidate tuple. Built in O(n V log(n V))."""

    __slots__ = ("points", "owners", "n")

    def __init__(self, candidates: Sequence[ReplicaId], virtual_nodes: int) -> None:
        entries = sorted((_replica_point(r, i), k)
                         for k, r in enumerate(candidates) for i in range(virtual_nodes))
        self.points = [p for p, _ in entries]
        self.owners = [k for _, k in entries]  # index into the candidate tuple
        self.n = len(candidates)

    def walk(self, point: int) -> list[int]:
        """Candidate indices in ring order, clockwise from ``point``, each once."""
        size = len(self.points)
        start = bisect_left(self.points, point)
        seen: set[int] = set()
        order: list[int] = []
        for step in range(size):
            k = self.owners[(start + step) % size]
            if k not in seen:
                seen.add(k)
                order.append(k)
                if len(order) == self.n:
                    break
        return order


@register_policy("session")
class SessionAffinity(Policy):
    """Consistent hashing of the session id onto the candidates, with bounded loads.

    What it does: every candidate owns ``virtual_nodes`` points on a 64-bit ring
    (xxh3_64 of its id and the point's index, stable across processes). The request's point
    is xxh3_64 of its session id; a request without one uses its first block key (so
    requests sharing a first block share a replica); a request with neither goes to the
    least loaded candidate. Walking clockwise from that point, the request takes the first
    replica whose in-flight count is below the bound
        capacity = ceil(load_factor * (total in flight + 1) / n)
    over the n candidates (some replica is always below it, since total < n * capacity).
    The other candidates follow in ring order as singleton tiers.

    Source: Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads"
    (SODA 2018, arXiv:1608.01350): capacity ceil(c * m / n) counting the ball being placed,
    c = 1 + epsilon, first non-full bin clockwise. c = 1.25 is the imbalance constant of
    the lafikl/liblb ``bounded`` balancer (written for Vimeo's deployment of the paper) and
    brpc's ``c_murmurhash_bl`` default; HAProxy exposes the same bound as
    ``hash-balance-factor`` (percent, off by default). Virtual nodes: 100 per replica.

    Defaults: virtual_nodes 100, load_factor 1.25.
    Complexity: ring built once per distinct candidate tuple (cached, at most 8 tuples):
    O(n V log(n V)) time, O(n V) memory; per request O(log(n V)) to find the point plus the
    walk (O(n V) worst case, about O(n log n) expected) and O(n) to count loads.
    Deviation: ``view.session_replica`` is not consulted: the replica follows from the hash
    and the current loads alone, so a session returns to its home replica when the home's
    load falls back under the bound.
    """

    @dataclass(frozen=True, slots=True)
    class Config(PolicyConfig):
        virtual_nodes: int = 100
        load_factor: float = 1.25

        def check(self, policy: str) -> None:
            require(1 <= self.virtual_nodes <= 10_000, f"{policy}.virtual_nodes",
                    f"must be between 1 and 10000, got {self.virtual_nodes!r}")
            require(1.0 <= self.load_factor < math.inf, f"{policy}.load_factor",
                    f"must be a finite number >= 1.0, got {self.load_factor!r}")

    def __init__(self, config=None, **options) -> None:
        super().__init__(config, **options)
        # exact decimal value of the factor, so ceil(1.1 * 10) is 11 and not 12
        self._factor = Fraction(repr(float(self.config.load_factor)))
        self._rings: OrderedDict[tuple, _Ring] = OrderedDict()
        self.ring_builds = 0

    def _ring(self, candidates: tuple) -> _Ring:
        ring = self._rings.get(candidates)
        if ring is None:
            ring = _Ring(candidates, self.config.virtual_nodes)
            self.ring_builds += 1
            self._rings[candidates] = ring
            while len(self._rings) > _RING_CACHE_SIZE:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(candidates)
        return ring

    def replicas_changed(self, replicas: Sequence[ReplicaId]) -> None:
        self._rings.clear()

    def capacity(self, total_in_flight: int, n: int) -> int:
        """Bounded-load capacity per replica when ``total_in_flight`` are already placed."""
        return math.ceil(self._factor * (total_in_flight + 1) / n)

    def rank(self, request: RouteRequest, view: RoutingView) -> Tiers:
        candidates = view.replicas
        if not candidates:
            return []
        if request.session_id is not None:
            point = _session_point(request.session_id)
        elif request.blocks > 0:
            point = _key_point(request.keys[0])
        else:
            return rank_by(view, candidates, lambda r: view.load_of(r).in_flight)
        order = [candidates[k] for k in self._ring(tuple(candidates)).walk(point)]
        loads = [view.load_of(r).in_flight for r in order]
        cap = self.capacity(sum(loads), len(order))
        pick = next(i for i, q in enumerate(loads) if q < cap)
        return [[order[pick]]] + [[r] for i, r in enumerate(order) if i != pick]

"""Engine KV-cache events in the router's own terms (router block keys, not engine hashes).

``router.kv_events`` (the vLLM stream) and the simulator produce these; ``RoutingCore``
applies them to the prefix tree. Immutable records.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """The engine now caches these blocks (a chain, root-side first)."""

    keys: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    """The engine evicted these blocks."""

    keys: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine dropped its whole prefix cache (reset or restart)."""


KvEvent = BlocksStored | BlocksRemoved | AllBlocksCleared

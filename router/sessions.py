"""Session affinity: session id -> the replica its last request went to.

A soft prior: the table only remembers; the policy decides whether to honour it.
Session ids are stored as their 64-bit xxh3 digest, never raw, so an entry costs the same
whatever the client sends, and the table can be inspected or exported without leaking ids.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import xxhash

from router.errors import ConfigError

ReplicaId = Hashable


def session_digest(session_id: str) -> int:
    """Stable 64-bit digest of a session id (what the table and any metric may see)."""
    return xxhash.xxh3_64_intdigest(session_id.encode("utf-8", "surrogatepass"))


class SessionTable:
    """Session digest -> (replica, expiry), LRU-ordered, at most ``max_sessions`` entries.

    ``get`` and ``put`` are O(1); ``purge_replica`` is O(sessions). An entry expires
    ``ttl_s`` after its last ``put``; when full, the least recently used entry is evicted
    (counted in ``evicted``). Memory: about 150 bytes per session.
    """

    def __init__(self, *, ttl_s: float = 1800.0, max_sessions: int = 100_000) -> None:
        if not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool) or not ttl_s > 0:
            raise ConfigError("sessions.ttl_s", f"must be a number > 0, got {ttl_s!r}")
        if not isinstance(max_sessions, int) or isinstance(max_sessions, bool) or max_sessions <= 0:
            raise ConfigError("sessions.max_sessions", f"must be a positive integer, got {max_sessions!r}")
        self.ttl_s = float(ttl_s)
        self.max_sessions = max_sessions
        self._entries: OrderedDict[int, tuple[ReplicaId, float]] = OrderedDict()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session_id: str | None, now: float) -> ReplicaId | None:
        """The session's replica, or None if unknown or expired."""
        if not session_id:
            return None
        digest = session_digest(session_id)
        entry = self._entries.get(digest)
        if entry is None:
            return None
        replica, expires = entry
        if expires < now:
            del self._entries[digest]
            self.expired += 1
            return None
        return replica

    def put(self, session_id: str | None, replica: ReplicaId, now: float) -> None:
        """Remember that the session's latest request went to ``replica``."""
        if not session_id:
            return
        digest = session_digest(session_id)
        entries = self._entries
        entries[digest] = (replica, now + self.ttl_s)
        entries.move_to_end(digest)
        while len(entries) > self.max_sessions:
            entries.popitem(last=False)
            self.evicted += 1

    def purge_replica(self, replica: ReplicaId) -> int:
        """Forget every session pinned to ``replica`` (it died or left)."""
        doomed = [d for d, (r, _) in self._entries.items() if r == replica]
        for digest in doomed:
            del self._entries[digest]
        return len(doomed)

    def expire(self, now: float) -> int:
        """Drop expired entries from the LRU end (entries are refreshed on put, so the
        oldest put expires first)."""
        removed = 0
        entries = self._entries
        while entries:
            digest, (_, expires) = next(iter(entries.items()))
            if expires >= now:
                break
            del entries[digest]
            removed += 1
        self.expired += removed
        return removed

    def check_invariants(self) -> None:
        assert len(self._entries) <= self.max_sessions
        for digest, (replica, expires) in self._entries.items():
            assert isinstance(digest, int) and 0 <= digest < 1 << 64
            assert replica is not None
            assert expires == expires  # not NaN

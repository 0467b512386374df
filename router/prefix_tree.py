"""One prefix tree of blocks for all replicas' KV caches.

Because block keys are chained (``router.keys``), a key names its whole prefix and so its
parent: the tree is stored flat, as a map ``key -> owners``, and walking a request's keys
in order walks a root-to-leaf path. This is also exactly how vLLM's prefix cache finds
blocks (a hash -> block map probed block by block), including its one quirk: a block
whose parent was evicted is found again once the parent is computed again.

Layout
  _owners   key -> bitmask of replica slots holding that block (bit i = slot i): a C
            ``BlockMap`` (router/_native/blockmap.c: 16-byte slots in one open-addressing
            array, one cache line per probe) while every slot is below 64 and the
            extension is built, else a dict
  per replica (``_ReplicaBlocks``), each entry in exactly one of two insertion-ordered
  maps, key -> time of its last move, whose order is LRU order (oldest first): C
  ``BlockLRU``s (open addressing, each entry linked to its LRU neighbours in its slot)
  beside the ``BlockMap``, else ``_OrderedTimes`` dicts:
    spec    entries learned from routing, not yet confirmed by the engine's KV events.
            A speculative entry expires ``speculative_ttl_s`` after its last move, so this
            dict is also in deadline order and expiry pops from its front.
    conf    entries confirmed by KV events; they never expire.
  The replica's LRU order is the merge of the two by time; at equal times speculative
  entries count as older (an unconfirmed guess is evicted before a confirmed block).

A touch re-inserts the key at the young end. ``insert`` touches a chain leaf-first, so the
head of a chain ends up younger than its tail and LRU eviction frees tails before heads,
as vLLM does when it frees a request's blocks in reverse order. A block touched within
``touch_coalesce_s`` of its last move is not moved again (a hot system prompt would
otherwise be re-linked on every request): a block is moved only when its last move is
more than the window old, so every block's LRU position, and a speculative block's
deadline, is at most that window old. ``touch_coalesce_s=0`` gives exact LRU.

Expiry is exact: ``match`` first sweeps every speculative entry whose deadline has passed
(only when ``now`` has passed ``next_expiry``, the earliest deadline), so an expired
entry never counts and a chain whose head expired stops matching at the head. Time must
never go backwards (wall time or simulated time).

Complexity
  match(keys, replicas)   O(matched blocks + replicas): one dict probe and one AND per
                          matched block, stopping at the first block no candidate holds;
                          with a ``HeldPrefix`` that ``held_bit`` still honours, the
                          blocks it covers are not probed once only its replica is left
                          (a conversation's next turn: O(new blocks + the others' matches))
  held_bit(mark, since)   O(1): whether a replica certainly kept what it held at ``mark``
                          (no removal since but evictions and expiries of older entries)
  kept_all(mark)          O(1): whether a replica lost no entry at all since ``drop_mark``
                          (an insert may then skip the owner probes of what it matched)
  insert(replica, keys)   O(len(keys)) plus O(evicted)
  remove / clear / drop   O(blocks touched)
  expire(now)             O(expired + replicas)
  eviction                O(evicted): a merge of the two dicts' oldest entries
Memory: with the C tables, 48 to 96 bytes for a replica's entry (its ``BlockLRU`` slot)
plus 32 to 64 bytes per distinct block (its ``BlockMap`` slot), and no Python object per
block; with dicts, about 52 bytes per entry plus about 120 per block (map slot, key int,
mask int). The router benchmark measures it.
"""

from __future__ import annotations

import heapq
import math
import sys
from collections.abc import Hashable, Iterable, Sequence
from heapq import merge
from itertools import chain, islice
from operator import itemgetter
from typing import NamedTuple

from router._fast import BlockLRU, BlockMap, speedups
from router.errors import ConfigError

ReplicaId = Hashable


class _OrderedTimes(dict):
    """key -> time of last move, in insertion (LRU) order: the pure-Python twin of the C
    ``BlockLRU``, with the two operations it adds to a dict."""

    __slots__ = ()

    def oldest(self, count: int) -> list[tuple[int, float]]:
        """The first ``count`` (key, time) pairs, oldest first. O(count)."""
        return list(islice(self.items(), max(0, count)))

    def pop_expired(self, ttl: float, now: float) -> tuple[list[int], float]:
        """Pop from the old end every entry whose deadline (time + ttl) is before
        ``now``; returns them and the first deadline kept (inf if none). O(popped)."""
        victims = []
        next_deadline = math.inf
        for key, moved in self.items():
            deadline = moved + ttl
            if deadline >= now:
                next_deadline = deadline
                break
            victims.append(key)
        for key in victims:
            del self[key]
        return victims, next_deadline


#: ``PrefixTree.hold_mark``'s token: the replica's record and its removal count.
HoldMark = tuple
#: ``PrefixTree.drop_mark``: the replica's record and its removal, eviction and expiry
#: counts.
DropMark = tuple


class HeldPrefix(NamedTuple):
    """``match_best``'s hint: ``mark`` (``PrefixTree.hold_mark`` taken once the first
    ``depth`` keys of a chain were all inserted for the replica, the earliest of those
    inserts at ``since``). (A named tuple: one is made per routed conversation turn.)"""

    mark: HoldMark
    since: float
    depth: int


class _ReplicaBlocks:
    """One replica's speculative and confirmed blocks, each map in LRU order, and what
    ``PrefixTree.held_bit`` needs to know that a chain inserted earlier is still whole:
    ``dropped_through``, the latest move time of any entry evicted or expired (both go
    oldest first), and ``removals``, a count of the other removals (an engine's
    BlockRemoved or AllBlocksCleared), which can take any entry."""

    __slots__ = ("replica", "slot", "bit", "spec", "conf", "capacity", "evicted", "expired",
                 "dropped_through", "removals")

    def __init__(self, replica: ReplicaId, slot: int, capacity: int, times: type) -> None:
        self.replica = replica
        self.slot = slot
        self.bit = 1 << slot
        self.spec = times()  # BlockLRU or _OrderedTimes
        self.conf = times()
        self.capacity = capacity
        self.evicted = 0
        self.expired = 0
        self.dropped_through = -math.inf
        self.removals = 0

    def __len__(self) -> int:
        return len(self.spec) + len(self.conf)

    def lru(self, count: int | None = None) -> list[int]:
        """The ``count`` least recently moved keys (all if None), oldest first; at equal
        times speculative before confirmed."""
        spec = self.spec.items() if count is None else self.spec.oldest(count)
        conf = self.conf.items() if count is None else self.conf.oldest(count)
        # heapq.merge is stable: on equal times the first iterable (spec) comes first.
        merged = merge(spec, conf, key=_TIME)
        return [key for key, _ in (merged if count is None else islice(merged, count))]


_TIME = itemgetter(1)
#: A 64-bit key as a Python int: a 24-byte header and three 30-bit digits, rounded up by
#: the allocator.
_KEY_OBJECT_BYTES = sys.getsizeof(1 << 63) + 4


def _check_capacity(capacity: int, field: str = "tree.capacity_blocks") -> int:
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
        raise ConfigError(field, f"must be a positive integer, got {capacity!r}")
    return capacity


class PrefixTree:
    """The blocks every replica is believed to cache, shared in one keyed tree.

    Holds ``_owners`` (key -> replica-slot bitmask) and one ``_ReplicaBlocks`` per
    replica (LRU-ordered touch times, deadline-ordered speculative entries, bounded by
    the replica's capacity). See the module docstring for the layout, the complexity of
    each operation and memory per entry. Single owner, no locks: the router's event loop
    or the simulator drives it.

    The block table is a C ``BlockMap`` whose methods run the walks of ``match``,
    ``insert`` and the owner drops, when it is built and every replica slot fits a 64-bit
    mask; the dict and the Python loops beside them are the reference and compute the
    same result (a subclass with ``_speedups = None`` runs them only; the tests check
    both).
    """

    _speedups = speedups  # None: the pure-Python reference (dict and loops)

    def __init__(self, *, default_capacity_blocks: int = 65_536,
                 speculative_ttl_s: float = 300.0, touch_coalesce_s: float = 1.0) -> None:
        self.default_capacity_blocks = _check_capacity(default_capacity_blocks,
                                                        "tree.default_capacity_blocks")
        if not isinstance(speculative_ttl_s, (int, float)) or not speculative_ttl_s > 0:
            raise ConfigError("tree.speculative_ttl_s", f"must be a number > 0, got {speculative_ttl_s!r}")
        if not isinstance(touch_coalesce_s, (int, float)) or not touch_coalesce_s >= 0:
            raise ConfigError("tree.touch_coalesce_s", f"must be a number >= 0, got {touch_coalesce_s!r}")
        self.speculative_ttl_s = float(speculative_ttl_s)
        self.touch_coalesce_s = float(touch_coalesce_s)
        self._owners = self._new_block_map()
        self._replicas: dict[ReplicaId, _ReplicaBlocks] = {}
        self.capacities: dict[ReplicaId, int] = {}  # replica -> capacity, for policy views
        self._slot_replica: list[ReplicaId | None] = []
        self._bit_replica: dict[int, ReplicaId] = {}
        self._free_slots: list[int] = []
        self._members_of: dict[int, tuple] = {}  # memo of _members(mask)
        self._mask_for: tuple | None = None  # the candidate set whose mask is in _mask
        self._mask = 0
        self._zeros: dict[ReplicaId, int] = {}  # dict.fromkeys(_mask_for, 0)
        self._walks = None  # the BlockMap while it holds the blocks, else None (dict)
        self._next_expiry = math.inf  # earliest speculative deadline (a lower bound)

    # -- replicas ----------------------------------------------------------------------
    def add_replica(self, replica: ReplicaId, capacity_blocks: int | None = None) -> None:
        """Register ``replica`` (no-op if known, except updating its capacity)."""
        if replica not in self._replicas:
            self._register(replica)
        if capacity_blocks is not None:
            self.set_capacity(replica, capacity_blocks)

    def _register(self, replica: ReplicaId) -> _ReplicaBlocks:
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
            self._slot_replica[slot] = replica
        else:
            slot = len(self._slot_replica)
            self._slot_replica.append(replica)
        rb = self._replicas[replica] = _ReplicaBlocks(replica, slot, self.default_capacity_blocks,
                                                      self._times_type())
        self._bit_replica[rb.bit] = replica
        self.capacities[replica] = rb.capacity
        self._replicas_changed()
        return rb

    def _new_block_map(self):
        return BlockMap() if BlockMap is not None and self._speedups is not None else {}

    def _times_type(self) -> type:
        """The per-replica LRU map: C ``BlockLRU`` unless running the Python reference.
        Independent of the slot count (it holds no masks), so it never changes."""
        return BlockLRU if BlockLRU is not None and self._speedups is not None else _OrderedTimes

    def _replicas_changed(self) -> None:
        self._mask_for = None
        self._members_of.clear()
        # The BlockMap keeps masks in 64 bits: usable while no slot is 64 or above. Slots
        # are reused, never released, so the switch to a dict happens at most once.
        fast = (BlockMap is not None and self._speedups is not None and len(self._slot_replica) <= 64
                and all(type(rb.spec) is BlockLRU for rb in self._replicas.values()))
        if fast != isinstance(self._owners, BlockMap or ()):
            table = self._new_block_map() if fast else {}
            for key, mask in self._owners.items():
                table[key] = mask
            self._owners = table
        self._walks = self._owners if fast else None

    def set_capacity(self, replica: ReplicaId, capacity_blocks: int) -> None:
        """Set a replica's capacity in blocks; evicts its LRU blocks if now over it."""
        _check_capacity(capacity_blocks)
        rb = self._replicas.get(replica)
        if rb is None:
            rb = self._register(replica)
        rb.capacity = capacity_blocks
        self.capacities[replica] = capacity_blocks
        excess = len(rb) - capacity_blocks
        if excess > 0:
            self._evict(rb, excess)

    @property
    def replicas(self) -> list[ReplicaId]:
        return list(self._replicas)

    def __contains__(self, replica: ReplicaId) -> bool:
        return replica in self._replicas

    def capacity(self, replica: ReplicaId) -> int:
        return self.capacities.get(replica, self.default_capacity_blocks)

    def replica_blocks(self, replica: ReplicaId) -> int:
        """Blocks held by ``replica`` (0 if unknown)."""
        rb = self._replicas.get(replica)
        return len(rb) if rb is not None else 0

    def replica_keys(self, replica: ReplicaId) -> list[int]:
        """A replica's keys, least recently used first (for tests and inspection)."""
        rb = self._replicas.get(replica)
        return rb.lru() if rb is not None else []

    def is_confirmed(self, replica: ReplicaId, key: int) -> bool | None:
        """True if confirmed, False if speculative, None if the replica does not hold it."""
        rb = self._replicas.get(replica)
        if rb is None:
            return None
        if key in rb.conf:
            return True
        return False if key in rb.spec else None

    def stats(self, replica: ReplicaId) -> dict[str, int]:
        rb = self._replicas.get(replica)
        if rb is None:
            return {"blocks": 0, "speculative": 0, "capacity": self.default_capacity_blocks,
                    "evicted": 0, "expired": 0}
        return {"blocks": len(rb), "speculative": len(rb.spec), "capacity": rb.capacity,
                "evicted": rb.evicted, "expired": rb.expired}

    def replica_bytes(self, replica: ReplicaId) -> int:
        """Memory of ``replica``'s own entries (its two LRU dicts; the key and time objects
        are shared with the block map and the clock). O(1)."""
        rb = self._replicas.get(replica)
        return sys.getsizeof(rb.spec) + sys.getsizeof(rb.conf) if rb is not None else 0

    def shared_bytes(self) -> int:
        """Memory of the block map shared by all replicas: a ``BlockMap`` holds keys and
        masks inline; a dict adds one 64-bit key object per block (masks above 256 add
        one small int each, not counted). O(1)."""
        if type(self._owners) is dict:
            return sys.getsizeof(self._owners) + len(self._owners) * _KEY_OBJECT_BYTES
        return sys.getsizeof(self._owners)

    def __len__(self) -> int:
        """Distinct blocks in the tree (nodes)."""
        return len(self._owners)

    @property
    def entries(self) -> int:
        """(block, replica) entries: the sum of every replica's block count."""
        return sum(len(rb) for rb in self._replicas.values())

    # -- lookups -----------------------------------------------------------------------
    def match(self, keys: Sequence[int], replicas: Sequence[ReplicaId], now: float) -> dict[ReplicaId, int]:
        """Longest prefix of ``keys`` (in blocks) each of ``replicas`` holds, unexpired.

        Unknown replicas match 0. Sweeps expired speculative entries first when any can
        have expired. O(matched blocks + replicas).
        """
        return self.match_best(keys, replicas, now)[0]

    def match_best(self, keys: Sequence[int], replicas: Sequence[ReplicaId],
                   now: float, held: HeldPrefix | None = None) -> tuple[dict[ReplicaId, int], int]:
        """``match``, and the longest of its matches (0 if none), which the walk knows for
        free. O(matched blocks + replicas). ``held``: a replica that held the first keys
        of this chain at a known time (``HeldPrefix``); when ``held_bit`` says it still
        does, the walk does not probe them for it: O(new blocks + the other replicas'
        matches) for a conversation's next turn. The result is the same either way."""
        if now > self._next_expiry:
            self.expire(now)
        alive = self._mask if replicas is self._mask_for else self._candidate_mask(replicas)
        result = self._zeros.copy()  # dict.fromkeys(replicas, 0), cached with the mask
        if not alive or not keys:
            return result, 0
        known = known_depth = 0
        if held is not None:
            known = self.held_bit(held.mark, held.since) & alive
            if known:
                known_depth = min(held.depth, len(keys))
        walks = self._walks
        if walks is not None:  # the same walk in C, writing into ``result``
            if known:
                return result, walks.match_into(keys, alive, result, self._slot_replica, known, known_depth)
            return result, walks.match_into(keys, alive, result, self._slot_replica)
        members = self._members
        update = result.update
        fromkeys = dict.fromkeys
        owners_get = self._owners.get
        longest = 0
        for depth, key in enumerate(keys):
            still = (owners_get(key, 0) | known if depth < known_depth else owners_get(key, 0)) & alive
            if still != alive:
                if depth:  # the result already says 0
                    update(fromkeys(members(alive ^ still), depth))
                    longest = depth
                alive = still
                if not alive:
                    break
        else:
            update(fromkeys(members(alive), len(keys)))
            longest = len(keys)
        return result, longest

    def hold_mark(self, replica: ReplicaId) -> HoldMark | None:
        """What ``held_bit`` compares with later to know that ``replica`` lost no entry
        since now (None for an unknown replica). Take it after inserting the chain. O(1)."""
        rb = self._replicas.get(replica)
        return None if rb is None else (rb, rb.removals)

    def drop_mark(self, replica: ReplicaId) -> DropMark | None:
        """What ``kept_all`` compares with later to know that ``replica`` lost no entry at
        all since now: whatever a match found it holding now, it still holds (None for an
        unknown replica). O(1)."""
        rb = self._replicas.get(replica)
        return None if rb is None else (rb, rb.removals, rb.evicted, rb.expired)

    def kept_all(self, mark: DropMark) -> bool:
        """Whether the replica of ``mark`` (``drop_mark``) lost no entry since: every way
        out (eviction, expiry, an engine's removal, a clear, the replica leaving) bumps one
        of the counts in the mark or replaces its record. O(1)."""
        rb = mark[0]
        return (self._replicas.get(rb.replica) is rb and rb.removals == mark[1] and rb.evicted == mark[2]
                and rb.expired == mark[3])

    def held_bit(self, mark: HoldMark, since: float) -> int:
        """The replica's bit when every entry it held at ``mark`` and had moved at or
        after ``since - touch_coalesce_s`` is certainly still held, else 0. A chain
        inserted (or touched by an insert) at ``since`` and complete at ``mark`` then is
        whole: nothing removed the replica's entries since ``mark`` but evictions and
        expiries, which take the oldest entries first and took none that recent. (The
        replica's removal count and its own record are compared: an engine's removal,
        or the replica leaving and coming back, gives 0.) Conservative: 0 is always
        safe (the walk then probes every key). O(1)."""
        rb, removals = mark
        if (self._replicas.get(rb.replica) is not rb or rb.removals != removals
                or rb.dropped_through >= since - self.touch_coalesce_s):
            return 0
        return rb.bit

    def _members(self, mask: int) -> tuple:
        """The replicas whose bits are set in ``mask`` (memoised; few masks recur)."""
        found = self._members_of.get(mask)
        if found is None:
            if len(self._members_of) >= 4096:  # bound the memo
                self._members_of.clear()
            bits = []
            rest = mask
            while rest:
                low = rest & -rest
                bits.append(self._bit_replica[low])
                rest ^= low
            found = self._members_of[mask] = tuple(bits)
        return found

    def _candidate_mask(self, replicas: Sequence[ReplicaId]) -> int:
        """Bitmask of the known replicas among ``replicas`` (cached for the last set), and
        ``_zeros``, ``dict.fromkeys(replicas, 0)`` for ``match`` to copy (a copy of a
        16-entry dict costs a fifth of building it)."""
        if replicas is self._mask_for:
            return self._mask
        if not isinstance(replicas, tuple):
            replicas = tuple(replicas)
        if replicas == self._mask_for:
            return self._mask
        mask = 0
        known = self._replicas
        for replica in replicas:
            rb = known.get(replica)
            if rb is not None:
                mask |= rb.bit
        self._mask_for = replicas
        self._mask = mask
        self._zeros = dict.fromkeys(replicas, 0)
        return mask

    # -- updates -----------------------------------------------------------------------
    def insert(self, replica: ReplicaId, keys: Sequence[int], now: float, confirmed: bool = False) -> int:
        """Record that ``replica`` holds the chain ``keys``; returns how many were new.

        Speculative entries live ``speculative_ttl_s`` from their last touch; confirmed
        ones until removed or evicted. A speculative touch never demotes a confirmed entry;
        a confirming one promotes a speculative entry. Only the first ``capacity`` keys
        are kept: a longer chain would evict its own head.
        """
        return self._insert(replica, keys, now, confirmed, 0)

    def _insert(self, replica: ReplicaId, keys: Sequence[int], now: float, confirmed: bool, held: int) -> int:
        """``insert``, told that ``replica`` holds the first ``held`` keys. Only for a
        caller that has just matched ``keys`` at this same ``now`` with nothing changed
        since (``RoutingCore.route``), or matched them earlier and knows the replica lost
        nothing since (``kept_all``): it skips those keys' owner probes, which on a big
        tree are cache misses. O(len(keys)) plus O(evicted)."""
        rb = self._replicas.get(replica)
        if rb is None:
            rb = self._register(replica)
        capacity = rb.capacity
        if len(keys) > capacity:
            keys = keys[:capacity]
        spec = rb.spec
        conf = rb.conf
        walks = self._walks
        if walks is not None:  # the loop below, in C
            new = walks.insert_walk(spec, conf, keys, rb.bit, now, now - self.touch_coalesce_s, confirmed, held)
        else:
            new = self._insert_walk(rb, keys, now, now - self.touch_coalesce_s, confirmed, held)
        if not confirmed:
            deadline = now + self.speculative_ttl_s
            if deadline < self._next_expiry:
                self._next_expiry = deadline
        excess = len(spec) + len(conf) - capacity
        if excess > 0:
            self._evict(rb, excess)
        return new

    def _insert_walk(self, rb: _ReplicaBlocks, keys: Sequence[int], now: float, stale_before: float,
                     confirmed: bool, held: int) -> int:
        """Insert's loop, leaf first; returns how many keys were new to the replica. The
        first ``held`` keys are known held: no owner probe for them."""
        spec = rb.spec
        conf = rb.conf
        spec_get = spec.get
        target = conf if confirmed else spec
        owners = self._owners
        owners_get = owners.get
        bit = rb.bit
        new = 0
        for index in range(len(keys) - 1, -1, -1):  # leaf first: the head ends up youngest
            key = keys[index]
            if index >= held:
                mask = owners_get(key, 0)
                if not mask & bit:  # new for this replica: the owner mask says so, no LRU probe
                    owners[key] = mask | bit
                    target[key] = now
                    new += 1
                    continue
            moved = spec_get(key)
            if moved is not None:  # speculative
                if confirmed:  # promote (and touch)
                    del spec[key]
                    conf[key] = now
                elif moved < stale_before:  # move, which also extends its deadline
                    del spec[key]
                    spec[key] = now
            elif conf[key] < stale_before:  # confirmed stays confirmed when touched
                del conf[key]
                conf[key] = now
        return new

    def _drop_bits(self, keys: Sequence[int], bit: int) -> None:
        """Clear ``bit`` on each of ``keys`` (all held by that replica); a key left with no
        owner leaves the table. O(len(keys))."""
        if self._walks is not None:
            self._walks.drop_bits(keys, bit)
            return
        owners = self._owners
        keep = ~bit
        for key in keys:
            mask = owners[key] & keep
            if mask:
                owners[key] = mask
            else:
                del owners[key]

    def _evict(self, rb: _ReplicaBlocks, count: int) -> None:
        if self._walks is not None:  # the loop below, in C
            _, newest = self._walks.evict(rb.spec, rb.conf, count, rb.bit)
            rb.evicted += count
            if newest > rb.dropped_through:
                rb.dropped_through = newest
            return
        spec_pop = rb.spec.pop
        conf_pop = rb.conf.pop
        victims = rb.lru(count)  # the oldest ``count`` entries of both kinds
        for key in victims:
            moved = spec_pop(key, None)
            if moved is None:
                moved = conf_pop(key)
            if moved > rb.dropped_through:
                rb.dropped_through = moved
        self._drop_bits(victims, rb.bit)
        rb.evicted += count

    def evict_lru(self, replica: ReplicaId, count: int) -> int:
        """Evict up to ``count`` of a replica's least recently used blocks."""
        rb = self._replicas.get(replica)
        if rb is None or count <= 0:
            return 0
        count = min(count, len(rb))
        self._evict(rb, count)
        return count

    def remove(self, replica: ReplicaId, keys: Iterable[int]) -> int:
        """Forget that ``replica`` holds ``keys`` (an engine's BlockRemoved). Unknown keys
        and replicas are ignored; returns how many entries were removed."""
        rb = self._replicas.get(replica)
        if rb is None:
            return 0
        if self._walks is not None:  # the loop below, in C
            removed = self._walks.remove_walk(rb.spec, rb.conf, keys, rb.bit)
        else:
            spec_pop = rb.spec.pop
            conf_pop = rb.conf.pop
            gone = [key for key in keys if spec_pop(key, None) is not None or conf_pop(key, None) is not None]
            self._drop_bits(gone, rb.bit)
            removed = len(gone)
        if removed:
            rb.removals += 1
        return removed

    def clear_replica(self, replica: ReplicaId) -> int:
        """Forget every block of ``replica`` but keep it registered (AllBlocksCleared)."""
        rb = self._replicas.get(replica)
        if rb is None:
            return 0
        self._drop_bits(list(chain(rb.spec, rb.conf)), rb.bit)
        removed = len(rb)
        rb.removals += 1
        times = type(rb.spec)
        rb.spec = times()
        rb.conf = times()
        return removed

    def drop_replica(self, replica: ReplicaId) -> int:
        """Forget ``replica`` entirely (it died or left); its slot is reused later."""
        removed = self.clear_replica(replica)
        rb = self._replicas.pop(replica, None)
        if rb is not None:
            self._slot_replica[rb.slot] = None
            del self._bit_replica[rb.bit]
            del self.capacities[replica]
            heapq.heappush(self._free_slots, rb.slot)
            self._replicas_changed()
        return removed

    def expire(self, now: float) -> int:
        """Remove every speculative entry whose deadline (last move + TTL) is before
        ``now``; returns how many. ``spec`` is in deadline order: this pops its front."""
        ttl = self.speculative_ttl_s
        total = 0
        next_expiry = math.inf
        for rb in self._replicas.values():
            victims, deadline = rb.spec.pop_expired(ttl, now)
            if deadline < next_expiry:
                next_expiry = deadline
            if victims and now - ttl > rb.dropped_through:
                rb.dropped_through = now - ttl  # each was last moved before now - ttl
            self._drop_bits(victims, rb.bit)
            rb.expired += len(victims)
            total += len(victims)
        self._next_expiry = next_expiry
        return total

    @property
    def next_expiry(self) -> float:
        """No speculative entry expires before this time (``inf`` if there is none)."""
        return self._next_expiry

    # -- checking ----------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Assert the structure is consistent (used by tests after every step)."""
        seen_slots = set()
        entries = 0
        for replica, rb in self._replicas.items():
            assert rb.replica == replica
            assert rb.slot not in seen_slots, "slot shared by two replicas"
            seen_slots.add(rb.slot)
            assert self._slot_replica[rb.slot] == replica
            assert rb.bit == 1 << rb.slot
            assert len(rb) <= rb.capacity, (replica, len(rb), rb.capacity)
            assert set(rb.spec).isdisjoint(rb.conf), "an entry is both speculative and confirmed"
            assert type(rb.spec) is type(rb.conf)
            for key in chain(rb.spec, rb.conf):
                assert self._owners.get(key, 0) & rb.bit, f"{replica} holds {key} but is not an owner"
            for kind in (rb.spec, rb.conf):
                times = list(kind.values())
                assert times == sorted(times), "entries out of LRU order"
            if rb.spec:
                first = rb.spec.oldest(1)[0][1]
                assert first + self.speculative_ttl_s >= self._next_expiry, "next_expiry is not a lower bound"
            entries += len(rb)
        live_bits = sum(1 << s for s in seen_slots)
        bits = 0
        for key, mask in self._owners.items():
            assert mask, f"{key} has no owner but is still stored"
            assert mask & ~live_bits == 0, f"{key} owned by a freed slot"
            bits += mask.bit_count()
        assert bits == entries, (bits, entries)
        free = set(self._free_slots)
        assert free.isdisjoint(seen_slots)
        assert len(free) + len(seen_slots) == len(self._slot_replica)
        for slot in free:
            assert self._slot_replica[slot] is None
        assert self._bit_replica == {rb.bit: r for r, rb in self._replicas.items()}
        assert self.capacities == {r: rb.capacity for r, rb in self._replicas.items()}

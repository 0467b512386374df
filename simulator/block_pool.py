"""vLLM v1's paged KV block pool with prefix caching, as a plain Python model.

Mirrors ``vllm/v1/core/block_pool.py`` and the parts of ``kv_cache_manager.py`` that decide
hits, allocation and eviction:

* A fixed number of blocks. Each has a reference count and, once full, a block key (the
  chained hash of its tokens); ``cached`` maps key -> block for every block holding a key.
* The free queue holds every block with no reference, in eviction order: new blocks are
  taken from its head; a freed block is appended at its tail. With prefix caching a freed
  block keeps its key, so it stays a hit until it reaches the head and is reused, at which
  point its key is dropped (a ``removed`` event). This is LRU by time of freeing.
* A hit (``touch``) on a block in the free queue takes it out of the queue (ref 0 -> 1):
  "hits revive them".
* A request frees its blocks tail first (``free`` is given them in reverse), so the tail of
  a chain reaches the head of the queue, and is evicted, before the chain's head.
* ``cache_full_blocks`` gives keys to blocks as they fill (at allocation time, like vLLM)
  and emits a ``stored`` event; a key already cached by another block (two requests that
  computed the same block concurrently) keeps the first block for lookups, as vLLM's
  ``get_cached_block`` returns the first of its duplicates.

Blocks are integers 0..n-1; the free queue is an ``OrderedDict`` (O(1) append, O(1)
removal anywhere, O(1) pop from the head), the same complexity as vLLM's doubly linked
list. Memory: O(blocks). Unlike vLLM there is no reserved null block: all ``num_blocks``
are usable.

``BlockPool`` is the C implementation (``simulator._block_pool``, built from
simulator/_native/block_pool.c: the same rules without a Python object per block, which is
where a long-context replay spent most of its time) when it was built and
``KVROUTE_PURE_PYTHON`` is not set, else ``BlockPoolPy``, this module's Python model, which
is its reference: tests/test_block_pool.py runs both against a naive model and against
each other, and a replay gives byte-identical results with either.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import islice


class BlockPoolPy:
    """The blocks of one replica: reference counts, keys, the free (eviction) queue.

    ``on_stored(keys)`` and ``on_removed(keys)`` receive the KV events (lists of block keys,
    root side first for stored). All operations are O(blocks touched). Keys are integers
    in [0, 2**64) (the simulator's chained xxh3 keys). A bad entry (a block out of range,
    a block freed more often than taken) raises; what came before it is applied.
    """

    __slots__ = ("num_blocks", "ref", "key_of", "cached", "free_queue", "duplicates",
                 "on_stored", "on_removed", "evictions", "hits_blocks", "queries_blocks")

    def __init__(self, num_blocks: int, *, on_stored: Callable[[list[int]], None] | None = None,
                 on_removed: Callable[[list[int]], None] | None = None) -> None:
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"kv_blocks must be a positive integer, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.key_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}
        # block -> None, in eviction order. An OrderedDict, not a dict: a dict keeps the
        # entries deleted from its head until it is resized, and iterating from the head
        # walks over them, so taking blocks from the head cost O(blocks freed since the
        # last resize), tens of thousands of entries per allocation with 1M-token caches
        # (kvroute bench simulator; docs/simulator.md, "Speed"). The linked list starts at
        # the first live entry.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # key -> the other blocks holding a key that ``cached`` maps to a first block.
        self.duplicates: dict[int, list[int]] = {}
        self.on_stored = on_stored
        self.on_removed = on_removed
        self.evictions = 0
        self.hits_blocks = 0
        self.queries_blocks = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks a new allocation can take: free ones and evictable cached ones."""
        return len(self.free_queue)

    @property
    def num_cached(self) -> int:
        """Distinct keys held."""
        return len(self.cached)

    @property
    def usage(self) -> float:
        """Share of blocks in use by running requests (vLLM's ``kv_cache_usage``)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def longest_hit(self, keys: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks of the longest cached prefix of ``keys`` (at most ``max_blocks``). No side
        effect: the caller touches them if it allocates (vLLM's get_computed_blocks)."""
        cached = self.cached
        out: list[int] = []
        for i in range(min(max_blocks, len(keys))):
            block = cached.get(keys[i])
            if block is None:
                break
            out.append(block)
        return out

    def count_free(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` are in the free queue (a hit's blocks an allocation must not
        count as free: taking them removes them from the queue)."""
        ref = self.ref
        return sum(1 for block in blocks if ref[block] == 0)

    def lookup(self, key: int) -> int | None:
        """The block lookups of ``key`` find, or None."""
        return self.cached.get(key)

    def cached_keys(self) -> list[int]:
        """The distinct keys held (in no particular order: the C twin's is its table's)."""
        return list(self.cached)

    def free_order(self) -> list[int]:
        """The free queue, next to evict first."""
        return list(self.free_queue)

    def refs(self) -> list[int]:
        """Every block's reference count."""
        return list(self.ref)

    def keys(self) -> list[int | None]:
        """Every block's key, or None."""
        return list(self.key_of)

    # -- allocation ------------------------------------------------------------------------
    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on hit blocks; a block in the free queue leaves it."""
        ref = self.ref
        free_queue = self.free_queue
        for block in blocks:
            if ref[block] == 0:
                del free_queue[block]
            ref[block] += 1

    def get_new_blocks(self, count: int) -> list[int]:
        """Pop ``count`` blocks from the head of the free queue, dropping their old keys."""
        if count > len(self.free_queue):
            raise ValueError(f"cannot allocate {count} blocks, only {len(self.free_queue)} free")
        free_queue = self.free_queue
        ref = self.ref
        key_of = self.key_of
        removed: list[int] = []
        out: list[int] = []
        for block in list(islice(free_queue, count)):
            del free_queue[block]
            key = key_of[block]
            if key is not None:
                self._uncache(block, key)
                removed.append(key)
            ref[block] = 1
            out.append(block)
        if removed:
            self.evictions += len(removed)
            if self.on_removed is not None:
                self.on_removed(removed)
        return out

    def _uncache(self, block: int, key: int) -> None:
        self.key_of[block] = None
        others = self.duplicates.get(key)
        if self.cached.get(key) == block:
            if others:
                # Another block still holds this key: lookups now find the oldest of them.
                self.cached[key] = others.pop(0)
                if not others:
                    del self.duplicates[key]
            else:
                del self.cached[key]
        else:
            others.remove(block)
            if not others:
                del self.duplicates[key]

    def cache_blocks(self, blocks: Sequence[int], keys: Sequence[int]) -> None:
        """Give newly full ``blocks`` their ``keys`` and announce them (one stored event)."""
        key_of = self.key_of
        cached = self.cached
        stored: list[int] = []
        for block, key in zip(blocks, keys):
            if key_of[block] is not None:
                continue
            key_of[block] = key
            if key in cached:
                self.duplicates.setdefault(key, []).append(block)
            else:
                cached[key] = block
            stored.append(key)
        if stored and self.on_stored is not None:
            self.on_stored(stored)

    def free(self, blocks_tail_first: Sequence[int]) -> None:
        """Drop one reference from each block; blocks left unreferenced join the tail of the
        free queue in the given order (the caller passes a request's blocks tail first)."""
        ref = self.ref
        free_queue = self.free_queue
        for block in blocks_tail_first:
            count = ref[block] - 1
            if count < 0:
                raise ValueError(f"block {block} freed more often than it was taken")
            ref[block] = count
            if count == 0:
                free_queue[block] = None

    def reset(self) -> int:
        """Drop every cached key (vLLM's reset_prefix_cache, or an engine restart); returns
        how many keys were held. Blocks in use stay allocated to their requests, without a
        key; the requests' next full blocks are cached again as usual."""
        dropped = len(self.cached)
        key_of = self.key_of
        for block in range(self.num_blocks):
            key_of[block] = None
        self.cached.clear()
        self.duplicates.clear()
        return dropped

    def check_invariants(self) -> None:
        assert all(r >= 0 for r in self.ref)
        assert set(self.free_queue) == {b for b in range(self.num_blocks) if self.ref[b] == 0}
        for key, block in self.cached.items():
            assert self.key_of[block] == key
        holders: dict[int, set[int]] = {}
        for block, key in enumerate(self.key_of):
            if key is not None:
                holders.setdefault(key, set()).add(block)
        assert set(holders) == set(self.cached)
        for key, blocks in holders.items():
            others = self.duplicates.get(key, [])
            assert blocks == {self.cached[key], *others} and len(others) == len(blocks) - 1


BlockPool: type = BlockPoolPy
if os.environ.get("KVROUTE_PURE_PYTHON", "").strip() in ("", "0"):
    try:
        from simulator._block_pool import BlockPool  # noqa: F811 - the C twin, when built
    except ImportError:  # not built (no compiler at install time): the Python model runs
        pass

"""The simulated vLLM block pool against a naive reference model (hypothesis state machine).

The reference keeps a plain list as the free queue and finds cached blocks by scanning in
the order keys were given, i.e. it is written from vLLM's rules directly: allocation takes
the head of the free queue and drops that block's key; freeing appends unreferenced
blocks at the tail in the order given (a request's blocks tail first); a hit revives a block
from wherever it is in the queue; of several blocks holding one key, lookups find the one
that got it first.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from simulator.block_pool import BlockPool


class ReferencePool:
    def __init__(self, n: int) -> None:
        self.ref = [0] * n
        self.key = [None] * n
        self.free = list(range(n))
        self.given: list[tuple[int, int]] = []  # (key, block) in the order keys were given

    def lookup(self, key: int):
        for k, block in self.given:
            if k == key:
                return block
        return None

    def hit(self, keys, limit):
        out = []
        for key in keys[:limit]:
            block = self.lookup(key)
            if block is None:
                break
            out.append(block)
        return out

    def allocate(self, count):
        taken, removed = self.free[:count], []
        self.free = self.free[count:]
        for block in taken:
            if self.key[block] is not None:
                removed.append(self.key[block])
                self.given.remove((self.key[block], block))
                self.key[block] = None
            self.ref[block] = 1
        return taken, removed

    def touch(self, blocks):
        for block in blocks:
            if self.ref[block] == 0:
                self.free.remove(block)
            self.ref[block] += 1

    def cache(self, blocks, keys):
        stored = []
        for block, key in zip(blocks, keys):
            if self.key[block] is None:
                self.key[block] = key
                self.given.append((key, block))
                stored.append(key)
        return stored

    def release(self, blocks):
        for block in blocks:
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free.append(block)


KEYS = st.lists(st.integers(0, 5), min_size=1, max_size=6)


class PoolMachine(RuleBasedStateMachine):
    """Requests arrive (hit, allocate, cache) and finish (free tail first) in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 12
        self.events: list[tuple[str, list[int]]] = []
        self.pool = BlockPool(self.n, on_stored=lambda k: self.events.append(("stored", list(k))),
                              on_removed=lambda k: self.events.append(("removed", list(k))))
        self.ref = ReferencePool(self.n)
        self.requests: list[list[int]] = []

    @rule(chain=KEYS, extra=st.integers(0, 2), lookup=st.booleans())
    def arrive(self, chain, extra, lookup):
        """``lookup=False`` is a request that skips the prefix lookup (vLLM does for some,
        e.g. with prompt logprobs): it computes blocks already cached elsewhere, which is
        how several blocks come to hold one key."""
        # Chained keys: key i names the whole prefix, like the simulator's block keys.
        keys = [hash(tuple(chain[:i + 1])) & 0xFFFF_FFFF for i in range(len(chain))]
        hit = self.pool.longest_hit(keys, len(keys)) if lookup else []
        assert hit == (self.ref.hit(keys, len(keys)) if lookup else [])
        need = len(keys) - len(hit) + extra
        evictable = sum(1 for b in hit if self.pool.ref[b] == 0)
        if need > self.pool.num_free - evictable:
            return  # would not fit: vLLM's allocate_slots returns None, nothing changes
        self.events.clear()
        self.pool.touch(hit)
        self.ref.touch(hit)
        new = self.pool.get_new_blocks(need)
        ref_new, removed = self.ref.allocate(need)
        assert new == ref_new
        blocks = hit + new
        self.pool.cache_blocks(blocks[len(hit):len(keys)], keys[len(hit):])
        stored = self.ref.cache(blocks[len(hit):len(keys)], keys[len(hit):])
        expected = ([("removed", removed)] if removed else []) + ([("stored", stored)] if stored else [])
        assert self.events == expected
        self.requests.append(blocks)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish(self, data):
        blocks = self.requests.pop(data.draw(st.integers(0, len(self.requests) - 1)))
        self.pool.free(blocks[::-1])
        self.ref.release(blocks[::-1])

    @invariant()
    def same_state(self):
        assert list(self.pool.free_queue) == self.ref.free
        assert self.pool.ref == self.ref.ref
        assert self.pool.key_of == self.ref.key
        for key in set(k for k in self.ref.key if k is not None):
            assert self.pool.cached[key] == self.ref.lookup(key)
        self.pool.check_invariants()


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_freed_chain_is_evicted_tail_first():
    """A finished request's blocks are evicted last block first (vLLM frees in reverse)."""
    removed = []
    pool = BlockPool(4, on_removed=removed.extend)
    blocks = pool.get_new_blocks(3)
    pool.cache_blocks(blocks, [10, 11, 12])
    pool.free(blocks[::-1])
    pool.get_new_blocks(2)  # block 3 (never used) first, then the chain's tail
    assert removed == [12]
    assert pool.longest_hit([10, 11, 12], 3) == blocks[:2]


def test_hit_revives_a_free_block_and_protects_it_from_eviction():
    pool = BlockPool(2)
    (a,) = pool.get_new_blocks(1)
    pool.cache_blocks([a], [7])
    pool.free([a])
    pool.touch(pool.longest_hit([7], 1))
    assert pool.num_free == 1
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    assert pool.longest_hit([7], 1) == [a]

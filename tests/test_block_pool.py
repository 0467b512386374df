"""The simulated vLLM block pool against a naive reference model (hypothesis state machine).

The reference keeps a plain list as the free queue and finds cached blocks by scanning in
the order keys were given, i.e. it is written from vLLM's rules directly: allocation takes
the head of the free queue and drops that block's key; freeing appends unreferenced
blocks at the tail in the order given (a request's blocks tail first); a hit revives a block
from wherever it is in the queue; of several blocks holding one key, lookups find the one
that got it first. Both implementations run it: ``BlockPoolPy`` (the Python model) and the
C ``BlockPool`` (``simulator._block_pool``), and a second machine drives the two side by
side with full 64-bit keys, comparing every result, event and counter.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from simulator.block_pool import BlockPoolPy

try:
    from simulator._block_pool import BlockPool as CBlockPool
except ImportError:  # not built: the Python model alone
    CBlockPool = None

IMPLEMENTATIONS = [BlockPoolPy] + ([CBlockPool] if CBlockPool is not None else [])
needs_c = pytest.mark.skipif(CBlockPool is None, reason="simulator._block_pool not built")


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

    def reset(self):
        dropped = len({k for k, _ in self.given})
        self.key = [None] * len(self.key)
        self.given = []
        return dropped


KEYS = st.lists(st.integers(0, 5), min_size=1, max_size=6)


class PoolMachine(RuleBasedStateMachine):
    """Requests arrive (hit, allocate, cache) and finish (free tail first) in any order;
    now and then every key is dropped (a prefix-cache reset)."""

    implementation: type = BlockPoolPy

    def __init__(self) -> None:
        super().__init__()
        self.n = 12
        self.events: list[tuple[str, list[int]]] = []
        self.pool = self.implementation(self.n, on_stored=lambda k: self.events.append(("stored", list(k))),
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
        evictable = self.pool.count_free(hit)
        assert evictable == sum(1 for b in hit if self.ref.ref[b] == 0)
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

    @rule()
    def reset(self):
        assert self.pool.reset() == self.ref.reset()

    @invariant()
    def same_state(self):
        assert self.pool.free_order() == self.ref.free
        assert self.pool.num_free == len(self.ref.free)
        assert self.pool.refs() == self.ref.ref
        assert self.pool.keys() == self.ref.key
        held = set(k for k in self.ref.key if k is not None)
        assert self.pool.num_cached == len(held) and sorted(self.pool.cached_keys()) == sorted(held)
        for key in held:
            assert self.pool.lookup(key) == self.ref.lookup(key)
        self.pool.check_invariants()


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class CPoolMachine(PoolMachine):
    implementation = CBlockPool


TestCPoolMachine = needs_c(CPoolMachine.TestCase)
TestCPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


WIDE_KEYS = st.lists(st.sampled_from([0, 1, 2**32, 2**63, 2**64 - 1, 12345678901234567]), min_size=1, max_size=8)


class TwinMachine(RuleBasedStateMachine):
    """The C pool and the Python model side by side, as the simulator's engine drives them
    (hits looked up and touched, blocks allocated and cached, requests freed tail first,
    resets), with keys over the whole uint64 range: every return value, event list,
    counter and the whole state must agree."""

    def __init__(self) -> None:
        super().__init__()
        self.events = {"c": [], "py": []}
        self.pools = {name: cls(9, on_stored=lambda k, e=self.events[name]: e.append(("stored", list(k))),
                                on_removed=lambda k, e=self.events[name]: e.append(("removed", list(k))))
                      for name, cls in (("c", CBlockPool), ("py", BlockPoolPy))}
        self.requests: list[list[int]] = []

    def both(self, method, *args):
        results = {name: getattr(pool, method)(*args) for name, pool in self.pools.items()}
        assert results["c"] == results["py"], method
        return results["py"]

    @rule(chain=WIDE_KEYS, extra=st.integers(0, 3), lookup=st.booleans(), limit=st.integers(0, 9))
    def arrive(self, chain, extra, lookup, limit):
        hit = self.both("longest_hit", chain, limit) if lookup else []
        need = len(chain) - len(hit) + extra
        if need > self.pools["py"].num_free - self.both("count_free", hit):
            for pool in self.pools.values():  # would not fit: both refuse, nothing changes
                with pytest.raises(ValueError):
                    pool.get_new_blocks(pool.num_free + 1)
            return
        self.both("touch", hit)
        blocks = hit + self.both("get_new_blocks", need)
        self.both("cache_blocks", blocks[len(hit):len(chain)], chain[len(hit):])
        self.requests.append(blocks)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish(self, data):
        blocks = self.requests.pop(data.draw(st.integers(0, len(self.requests) - 1)))
        self.both("free", blocks[::-1])

    @rule()
    def reset(self):
        self.both("reset")

    @invariant()
    def same(self):
        assert self.events["c"] == self.events["py"]
        for method in ("free_order", "refs", "keys"):
            self.both(method)
        for name in ("num_free", "num_cached", "usage", "evictions"):
            assert getattr(self.pools["c"], name) == getattr(self.pools["py"], name), name
        self.pools["c"].check_invariants()


TestTwinMachine = needs_c(TwinMachine.TestCase)
TestTwinMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize("BlockPool", IMPLEMENTATIONS)
def test_bad_input_raises_a_clear_error(BlockPool):
    with pytest.raises(ValueError, match="kv_blocks must be a positive integer"):
        BlockPool(0)
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="cannot allocate 3 blocks, only 2 free"):
        pool.get_new_blocks(3)
    with pytest.raises(ValueError, match="freed more often"):
        pool.free([0])
    with pytest.raises(IndexError):
        pool.touch([2])
    pool.check_invariants()


@pytest.mark.parametrize("BlockPool", IMPLEMENTATIONS)
def test_freed_chain_is_evicted_tail_first(BlockPool):
    """A finished request's blocks are evicted last block first (vLLM frees in reverse)."""
    removed = []
    pool = BlockPool(4, on_removed=removed.extend)
    blocks = pool.get_new_blocks(3)
    pool.cache_blocks(blocks, [10, 11, 12])
    pool.free(blocks[::-1])
    pool.get_new_blocks(2)  # block 3 (never used) first, then the chain's tail
    assert removed == [12]
    assert pool.longest_hit([10, 11, 12], 3) == blocks[:2]


@pytest.mark.parametrize("BlockPool", IMPLEMENTATIONS)
def test_hit_revives_a_free_block_and_protects_it_from_eviction(BlockPool):
    pool = BlockPool(2)
    (a,) = pool.get_new_blocks(1)
    pool.cache_blocks([a], [7])
    pool.free([a])
    pool.touch(pool.longest_hit([7], 1))
    assert pool.num_free == 1
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    assert pool.longest_hit([7], 1) == [a]

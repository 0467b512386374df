"""The C tables of the prefix tree (router/_native/blockmap.c) against naive references.

``BlockMap`` (key -> owner mask) must behave as a dict restricted to uint64 keys and
non-zero uint64 masks; ``BlockLRU`` (key -> time) as an insertion-ordered dict, i.e. as
the tree's pure-Python ``_OrderedTimes``, including the order after deletes, re-inserts
and in-place updates, and its two extra operations. Hypothesis state machines drive both
against plain dicts through growth, deletion runs (backward-shift deletion moves entries
and, in a BlockLRU, re-points their LRU neighbours) and shrinking. The tree-level
equivalence (C walks vs Python loops) is in test_prefix_tree.py and test_speedups.py.
"""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from router._fast import BlockLRU, BlockMap
from router.prefix_tree import _OrderedTimes

pytestmark = pytest.mark.skipif(BlockMap is None, reason="router._blockmap not built")

# Few distinct small keys make collisions, long probe runs and deletions inside runs
# common; a few huge ones cover the top of the uint64 range.
KEYS = st.one_of(st.integers(0, 40), st.integers(2**64 - 3, 2**64 - 1), st.integers(0, 2**64 - 1))
MASKS = st.integers(1, 2**64 - 1)
TIMES = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


class BlockMapMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = BlockMap()
        self.ref: dict[int, int] = {}

    @rule(key=KEYS, mask=MASKS)
    def set(self, key, mask):
        self.table[key] = mask
        self.ref[key] = mask

    @rule(key=KEYS)
    def delete(self, key):
        if key in self.ref:
            del self.table[key]
            del self.ref[key]
        else:
            with pytest.raises(KeyError):
                del self.table[key]

    @rule(bit=st.integers(0, 63), data=st.data())
    def drop_bits(self, bit, data):
        held = sorted(k for k, m in self.ref.items() if m >> bit & 1)
        keys = data.draw(st.lists(st.sampled_from(held), unique=True) if held else st.just([]))
        self.table.drop_bits(keys, 1 << bit)
        for key in keys:
            self.ref[key] &= ~(1 << bit)
            if not self.ref[key]:
                del self.ref[key]

    @rule(key=KEYS)
    def lookups(self, key):
        assert (key in self.table) == (key in self.ref)
        assert self.table.get(key, 0) == self.ref.get(key, 0)
        if key in self.ref:
            assert self.table[key] == self.ref[key]

    @precondition(lambda self: len(self.ref) > 0)
    @rule()
    def clear_everything(self):
        for key in list(self.ref):
            del self.table[key]
        self.ref.clear()
        assert self.table.capacity == 16  # shrunk back to its minimum

    @invariant()
    def same_content_and_bounded(self):
        assert len(self.table) == len(self.ref)
        assert sorted(self.table.items()) == sorted(self.ref.items())
        # At most 2/3 full, and (after the shrink rule) not vastly oversized.
        assert len(self.table) * 3 <= self.table.capacity * 2
        assert self.table.capacity <= max(16, 16 * len(self.table))


class BlockLRUMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.lru = BlockLRU()
        self.ref = _OrderedTimes()

    @rule(key=KEYS, time=TIMES)
    def set(self, key, time):
        self.lru[key] = time
        self.ref[key] = time

    @rule(key=KEYS, time=TIMES)
    def move_to_end(self, key, time):  # the tree's touch: delete, then re-insert
        if key in self.ref:
            del self.lru[key]
            del self.ref[key]
        self.lru[key] = time
        self.ref[key] = time

    @rule(key=KEYS)
    def pop(self, key):
        assert self.lru.pop(key, None) == self.ref.pop(key, None)

    @rule(key=KEYS)
    def delete(self, key):
        if key in self.ref:
            del self.lru[key]
            del self.ref[key]
        else:
            with pytest.raises(KeyError):
                del self.lru[key]
            with pytest.raises(KeyError):
                self.lru.pop(key)

    @rule(count=st.integers(-2, 50))
    def oldest(self, count):
        assert self.lru.oldest(count) == self.ref.oldest(count)

    @rule(ttl=st.floats(0, 1e6), now=TIMES)
    def pop_expired(self, ttl, now):
        assert self.lru.pop_expired(ttl, now) == self.ref.pop_expired(ttl, now)

    @rule(key=KEYS)
    def lookups(self, key):
        assert (key in self.lru) == (key in self.ref)
        assert self.lru.get(key) == self.ref.get(key)

    @invariant()
    def same_content_in_the_same_order(self):
        assert len(self.lru) == len(self.ref)
        assert self.lru.items() == list(self.ref.items())
        assert list(self.lru) == list(self.ref)
        assert self.lru.values() == list(self.ref.values())


BlockMapMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=80, deadline=None)
BlockLRUMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=80, deadline=None)
TestBlockMapMachine = BlockMapMachine.TestCase
TestBlockLRUMachine = BlockLRUMachine.TestCase


@given(st.lists(st.integers(0, 2**64 - 1), unique=True, min_size=1, max_size=3000))
@settings(max_examples=20, deadline=None)
def test_many_keys_grow_then_shrink_back(keys):
    lru, table = BlockLRU(), BlockMap()
    for i, key in enumerate(keys):
        lru[key] = float(i)
        table[key] = i + 1
    assert lru.keys() == keys and len(table) == len(keys)
    for key in keys[: len(keys) - 1]:
        del lru[key]
        del table[key]
    assert lru.keys() == keys[-1:] and table.items() == [(keys[-1], len(keys))]
    assert sys.getsizeof(table) < 16 * 64 and sys.getsizeof(lru) < 24 * 64  # shrunk


def test_bad_keys_and_values_raise_without_changing_anything():
    table, lru = BlockMap(), BlockLRU()
    table[5] = 3
    lru[5] = 1.0
    for bad_key, error in ((-1, OverflowError), (2**64, OverflowError), ("5", TypeError), (5.0, TypeError)):
        with pytest.raises(error):
            table[bad_key] = 1
        with pytest.raises(error):
            lru[bad_key] = 1.0
    with pytest.raises(ValueError, match="mask 0"):
        table[6] = 0
    with pytest.raises(TypeError):
        lru[6] = "soon"
    with pytest.raises(KeyError):
        table.drop_bits([5, 7], 1)  # 5 loses bit 1, then 7 is unknown
    assert table.items() == [(5, 2)] and lru.items() == [(5, 1.0)]
    # Lookups of keys that could never be stored answer "absent", as a dict would.
    for absent in (-1, 2**64, "5", 5.5, None):
        assert absent not in table and absent not in lru
        assert table.get(absent, 7) == 7 and lru.get(absent) is None and lru.pop(absent, None) is None
        for mapping in (table, lru):
            with pytest.raises(KeyError):
                mapping[absent]
            with pytest.raises(KeyError):
                del mapping[absent]
    assert lru.pop_expired(1.0, 0.0) == ([], 2.0)  # deadline 1.0 + 1.0 is not before 0.0
    assert lru.pop_expired(1.0, 3.0) == ([5], math.inf) and len(lru) == 0


def test_insert_walk_rejects_dict_maps():
    # The tree pairs a BlockMap with BlockLRUs only; a dict here would be a wiring bug.
    with pytest.raises(TypeError, match="BlockLRU"):
        BlockMap().insert_walk({}, {}, [1, 2], 1, 0.0, 0.0, False, 0)


# Keys are read inline from an int's 30-bit digits when they fit three of them: the edges
# of each digit count, the top of the uint64 range, and what lies just past it.
DIGIT_EDGES = [0, 1, 2**30 - 1, 2**30, 2**30 + 1, 2**60 - 1, 2**60, 2**63, 2**64 - 2, 2**64 - 1]


def test_keys_at_every_digit_boundary_are_stored_and_found_exactly():
    table, lru = BlockMap(), BlockLRU()
    for i, key in enumerate(DIGIT_EDGES):
        table[key] = i + 1
        lru[key] = float(i)
    assert sorted(table.items()) == sorted((k, i + 1) for i, k in enumerate(DIGIT_EDGES))
    assert lru.keys() == DIGIT_EDGES
    for i, key in enumerate(DIGIT_EDGES):
        assert table[key] == i + 1 and lru[key] == float(i) and key in table
    # the walks read keys the same way
    alive = (1 << 3) - 1
    for key in DIGIT_EDGES:
        table[key] = alive
    assert table.match_walk(DIGIT_EDGES, alive) == [(alive, len(DIGIT_EDGES))]
    assert table.match_walk(DIGIT_EDGES + [12345], alive) == [(alive, len(DIGIT_EDGES))]


class _Int(int):
    pass


@pytest.mark.parametrize("key", [2**64, 2**64 + 1, 2**90 - 1, 2**90, -1, -(2**30), -(2**64)])
def test_keys_just_outside_the_range_raise(key):
    table, lru = BlockMap(), BlockLRU()
    with pytest.raises(OverflowError):
        table[key] = 1
    with pytest.raises(OverflowError):
        lru[key] = 1.0
    with pytest.raises(OverflowError):
        table.match_walk([key], 1)
    assert key not in table and len(table) == len(lru) == 0


def test_int_subclasses_and_bools_are_keys_by_value():
    table = BlockMap()
    table[_Int(2**40)] = 3
    table[True] = 5
    assert table[2**40] == 3 and table[1] == 5 and table.get(_Int(1)) == 5


KEY_LISTS = st.lists(st.one_of(st.integers(-3, 2**64 + 3), st.booleans(), st.just(2**64 - 1), st.just(1.0),
                               st.none(), st.text(max_size=2), st.builds(_Int, st.integers(0, 9))), max_size=6)


@given(keys=KEY_LISTS, as_tuple=st.booleans())
@settings(max_examples=400, deadline=None)
def test_valid_keys_agrees_with_its_python_twin(keys, as_tuple):
    """A KV event's keys are checked in C (router._blockmap.valid_keys): the same verdict as
    router.core._valid_keys_py on any list or tuple, and False for any other container."""
    from router._fast import valid_keys
    from router.core import _valid_keys_py

    value = tuple(keys) if as_tuple else keys
    assert valid_keys(value) is _valid_keys_py(value)
    assert valid_keys(iter(keys)) is False and _valid_keys_py(iter(keys)) is False


def test_match_into_with_known_holders_skips_only_their_probes():
    """``known`` replicas count as holding ``keys[:known_depth]`` (the caller's guarantee,
    here deliberately false for slot 0 to show the probes are skipped), the others are
    probed as usual; arguments are checked."""
    bm = BlockMap()
    keys = list(range(100, 110))
    for key in keys[:4]:
        bm[key] = 0b11  # slots 0 and 1 hold the first 4 keys
    bm[keys[8]] = 0b1   # slot 0 also holds a later key (its own 5th-8th are absent)
    slots = ["a", "b", "c"]
    plain = {"a": 0, "b": 0, "c": 0}
    assert bm.match_into(keys, 0b111, plain, slots) == 4 and plain == {"a": 4, "b": 4, "c": 0}
    hinted = {"a": 0, "b": 0, "c": 0}
    # Slot 0 "known" to hold the first 9: b still drops at 4, a walks on from 9 (absent).
    assert bm.match_into(keys, 0b111, hinted, slots, 0b1, 9) == 9 and hinted == {"a": 9, "b": 4, "c": 0}
    capped = {"a": 0, "b": 0, "c": 0}
    assert bm.match_into(keys, 0b011, capped, slots, 0b1, 99) == 10 and capped["a"] == 10  # depth capped at len
    outside = {"a": 0, "b": 0, "c": 0}
    assert bm.match_into(keys, 0b010, outside, slots, 0b1, 9) == 4 and outside["a"] == 0  # known & alive only
    with pytest.raises(ValueError, match="known_depth"):
        bm.match_into(keys, 0b1, {}, slots, 0b1, -1)
    with pytest.raises(TypeError):
        bm.match_into(keys, 0b1, {}, slots, 0b1)


def test_evict_reports_the_newest_time_it_evicted():
    bm, spec, conf = BlockMap(), BlockLRU(), BlockLRU()
    for key, time in ((1, 1.0), (2, 2.0), (3, 3.0)):
        bm[key] = 0b1
        (spec if key != 2 else conf)[key] = time
    assert bm.evict(spec, conf, 2, 0b1) == (2, 2.0)
    assert list(bm.items()) == [(3, 1)]
    assert bm.evict(spec, conf, 5, 0b1) == (1, 3.0)
    assert bm.evict(spec, conf, 1, 0b1) == (0, -math.inf)

"""PrefixTree and keyers: a stateful model check plus documented-behaviour unit tests.

The state machine drives a ``PrefixTree`` with exact LRU (``touch_coalesce_s=0``) and a
strictly increasing clock against a naive reference written from the docstrings of
``router/prefix_tree.py``: per replica an ordered dict (LRU, oldest first) of
``prefix tuple -> (touch time, confirmed)``, where "holding key i" of a sequence means
holding the prefix ``seq[:i + 1]`` (keys are chained, so a key names its whole prefix).
"""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from router.errors import ConfigError
from router.keys import (DEFAULT_SEED, CharChunkKeyer, PrehashedKeyer, TokenBlockKeyer,
                         namespace_seed)
from router.prefix_tree import HeldPrefix, PrefixTree

class PurePythonPrefixTree(PrefixTree):
    """The tree with its C walks turned off: the Python reference loops only."""

    _speedups = None


KEYER = PrehashedKeyer(block_tokens=1)
TTL = 5.0


def keys_of(seq) -> list[int]:
    return KEYER.keys(list(seq))


_KEY_OF_PREFIX: dict[tuple, int] = {}


def key_of_prefix(prefix: tuple) -> int:
    """The key naming ``prefix`` (the last key of its chain)."""
    key = _KEY_OF_PREFIX.get(prefix)
    if key is None:
        key = _KEY_OF_PREFIX[prefix] = keys_of(prefix)[-1]
    return key


# ---------------------------------------------------------------------------------------
# Reference model
# ---------------------------------------------------------------------------------------
class RefReplica:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # prefix tuple -> (last touch time, confirmed); insertion order is LRU (oldest first)
        self.entries: OrderedDict[tuple, tuple[float, bool]] = OrderedDict()

    def ordered(self) -> list[tuple]:
        """LRU order, oldest first. Documented: by time of last move, and at equal times a
        speculative entry counts as older than a confirmed one (stable otherwise)."""
        return sorted(self.entries, key=lambda p: self.entries[p])  # (time, confirmed): False < True

    def evict_oldest(self, count: int) -> None:
        for prefix in self.ordered()[:count]:
            del self.entries[prefix]

    def live(self, prefix: tuple, now: float) -> bool:
        entry = self.entries.get(prefix)
        if entry is None:
            return False
        touched, confirmed = entry
        return confirmed or touched + TTL >= now


REPLICAS = ["r0", "r1", "r2"]
UNKNOWN = ["ghost", 7]  # never registered by any rule
ALL_IDS = REPLICAS + UNKNOWN

seqs = st.lists(st.integers(0, 2), min_size=0, max_size=6).map(tuple)
# Every step advances the clock by a per-run step drawn from STEPS (time strictly
# increases); the ``advance`` rule adds a drawn jump, sometimes past the TTL. Small steps
# make touches close together, large ones spread deadlines apart.
STEPS = (0.01, 0.05, 0.3)
jumps = st.integers(1, 900).map(lambda centis: centis / 100.0)


class PrefixTreeMachine(RuleBasedStateMachine):
    # sequences inserted so far: later rules reuse them so chains overlap often
    chains = Bundle("chains")
    # PrefixTree uses the C walks when router._speedups is built; the subclass machine at
    # the end of this section runs the same rules on the pure-Python loops.
    tree_class = PrefixTree

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.tree: PrefixTree | None = None
        self.default_capacity = 8
        self.step = STEPS[0]
        self.ref: dict = {}
        self.last_tuple: tuple | None = None
        # (replica, chain, hold_mark, time) of whole chains inserted: match_held's hints
        self.holds: list[tuple] = []
        # (replica, chain, drop_mark, matched depth) of matches: insert_kept's claims
        self.kept: list[tuple] = []

    @initialize(capacity=st.integers(6, 12), step=st.sampled_from(STEPS))
    def setup(self, capacity, step):
        self.default_capacity = capacity
        self.step = step
        self.tree = self.tree_class(default_capacity_blocks=capacity, speculative_ttl_s=TTL,
                                    touch_coalesce_s=0.0)

    def tick(self) -> float:
        self.now += self.step
        return self.now

    @rule(jump=jumps)
    def advance(self, jump):
        self.now += jump

    def ref_replica(self, replica) -> RefReplica:
        rr = self.ref.get(replica)
        if rr is None:
            rr = self.ref[replica] = RefReplica(self.default_capacity)
        return rr

    # -- rules -------------------------------------------------------------------------
    @rule(replica=st.sampled_from(REPLICAS), capacity=st.none() | st.integers(1, 12))
    def add_replica(self, replica, capacity):
        self.tick()
        self.tree.add_replica(replica, capacity)
        rr = self.ref_replica(replica)
        if capacity is not None:
            rr.capacity = capacity
            excess = len(rr.entries) - capacity
            if excess > 0:
                rr.evict_oldest(excess)

    @rule(target=chains, replica=st.sampled_from(REPLICAS), seq=seqs | chains,
          confirmed=st.booleans())
    def insert(self, replica, seq, confirmed):
        return self.do_insert(replica, seq, confirmed)

    def do_insert(self, replica, seq, confirmed, held=0):
        now = self.tick()
        if held:
            new = self.tree._insert(replica, keys_of(seq), now, confirmed, held)
        else:
            new = self.tree.insert(replica, keys_of(seq), now, confirmed=confirmed)
        rr = self.ref_replica(replica)
        chain = [seq[:i + 1] for i in range(min(len(seq), rr.capacity))]
        expected_new = 0
        for prefix in reversed(chain):  # leaf first
            old = rr.entries.pop(prefix, None)
            if old is None:
                expected_new += 1
                rr.entries[prefix] = (now, confirmed)
            else:
                # a speculative touch never demotes; a confirming one promotes
                rr.entries[prefix] = (now, old[1] or confirmed)
        excess = len(rr.entries) - rr.capacity
        if excess > 0:
            rr.evict_oldest(excess)
        assert new == expected_new
        if len(seq) <= rr.capacity:  # the whole chain is held now (RoutingService's condition)
            self.holds = self.holds[-15:] + [(replica, seq, self.tree.hold_mark(replica), now)]
        return seq

    @rule(pick=st.integers(0, 15), more=seqs,
          replicas=st.lists(st.sampled_from(ALL_IDS), unique=True, max_size=5), depth_cut=st.integers(0, 2))
    def match_held(self, pick, more, replicas, depth_cut):
        """A hint from any earlier whole insert, whatever happened since (evictions,
        expiries, removals, the replica dropped and re-added, capacities cut): the match
        is the reference's, with or without it."""
        if not self.holds:
            return
        replica, seq, mark, since = self.holds[pick % len(self.holds)]
        now = self.tick()
        asked = list(dict.fromkeys([replica] + replicas))
        held = HeldPrefix(mark, since, max(0, len(seq) - depth_cut))
        self.check_match(seq + more, asked, now, held)

    @rule(seq=chains, replica=st.sampled_from(REPLICAS))
    def mark_drops(self, seq, replica):
        """A match, and the replica's ``drop_mark`` then (what ``RoutingService.rank``
        keeps for the replica it reserves on)."""
        now = self.tick()
        self.check_match(seq, [replica], now)
        depth = self.tree.match(keys_of(seq), [replica], now)[replica]
        mark = self.tree.drop_mark(replica)
        if mark is not None:
            self.kept = self.kept[-3:] + [(replica, seq, mark, depth)]

    @rule(pick=st.integers(0, 3), more=seqs)
    def insert_kept(self, pick, more):
        """An insert told that the replica still holds what an earlier match found, when
        ``kept_all`` says so, whatever happened since (``RoutingService.routed``): the
        claim is true in the reference, and the insert does what a plain one does."""
        if not self.kept:
            return
        replica, seq, mark, depth = self.kept[pick % len(self.kept)]
        if not depth or not self.tree.kept_all(mark):
            return
        rr = self.ref[replica]
        assert all(seq[:i + 1] in rr.entries for i in range(depth)), "kept_all, but an entry is gone"
        self.do_insert(replica, seq + more, False, held=depth)

    def do_remove(self, replica, seq, indices) -> None:
        self.tick()
        ks = keys_of(seq)
        chosen = [i for i in sorted(indices) if i < len(seq)]
        removed = self.tree.remove(replica, [ks[i] for i in chosen])
        expected = 0
        rr = self.ref.get(replica)
        if rr is not None:
            for i in chosen:
                if rr.entries.pop(seq[:i + 1], None) is not None:
                    expected += 1
        assert removed == expected

    @rule(replica=st.sampled_from(ALL_IDS), seq=seqs | chains, picks=st.sets(st.integers(0, 5)))
    def remove(self, replica, seq, picks):
        self.do_remove(replica, seq, picks)

    @rule(replica=st.sampled_from(REPLICAS), seq=chains, count=st.integers(1, 3))
    def remove_head(self, replica, seq, count):
        """Remove the first ``count`` keys of a chain and keep the rest (an engine may
        evict a parent block while its child stays cached)."""
        self.do_remove(replica, seq, range(count))

    @rule(seq=seqs | chains, replicas=st.lists(st.sampled_from(ALL_IDS), unique=True, max_size=5),
          as_tuple=st.booleans(), reuse=st.booleans())
    def match(self, seq, replicas, as_tuple, reuse):
        now = self.tick()
        if reuse and self.last_tuple is not None:
            asked = self.last_tuple  # the very same tuple object as the previous match
        else:
            asked = tuple(replicas) if as_tuple else list(replicas)
        if isinstance(asked, tuple):
            self.last_tuple = asked
        self.check_match(seq, asked, now)

    def ref_expire(self, now) -> int:
        """Drop expired speculative entries from the reference; how many."""
        expired = 0
        for rr in self.ref.values():
            for prefix, (touched, confirmed) in list(rr.entries.items()):
                if not confirmed and touched + TTL < now:
                    del rr.entries[prefix]
                    expired += 1
        return expired

    def check_match(self, seq, asked, now, held=None) -> None:
        # Documented: match first sweeps every expired speculative entry (as expire does).
        got, longest = self.tree.match_best(keys_of(seq), asked, now, held)
        self.ref_expire(now)
        expected = {}
        for replica in asked:
            rr = self.ref.get(replica)
            depth = 0
            if rr is not None:
                while depth < len(seq) and rr.live(seq[:depth + 1], now):
                    depth += 1
            expected[replica] = depth
        assert got == expected, (seq, asked, now)
        assert longest == max(expected.values(), default=0)
        assert self.tree.match(keys_of(seq), asked, now) == expected  # nothing expired since

    @rule()
    def expire(self):
        now = self.tick()
        removed = self.tree.expire(now)
        assert removed == self.ref_expire(now)
        self.compare_keys()
        # next_expiry is a lower bound on every remaining speculative deadline
        for rr in self.ref.values():
            for touched, confirmed in rr.entries.values():
                if not confirmed:
                    assert touched + TTL >= self.tree.next_expiry

    @rule(replica=st.sampled_from(ALL_IDS), count=st.integers(-1, 5))
    def evict_lru(self, replica, count):
        self.tick()
        got = self.tree.evict_lru(replica, count)
        rr = self.ref.get(replica)
        expected = 0
        if rr is not None and count > 0:
            expected = min(count, len(rr.entries))
            rr.evict_oldest(expected)
        assert got == expected

    @rule(replica=st.sampled_from(ALL_IDS))
    def clear_replica(self, replica):
        self.tick()
        got = self.tree.clear_replica(replica)
        rr = self.ref.get(replica)
        expected = 0
        if rr is not None:
            expected = len(rr.entries)
            rr.entries.clear()
        assert got == expected
        assert (replica in self.tree) == (replica in self.ref)

    @rule(replica=st.sampled_from(ALL_IDS))
    def drop_replica(self, replica):
        self.tick()
        got = self.tree.drop_replica(replica)
        rr = self.ref.pop(replica, None)
        assert got == (len(rr.entries) if rr is not None else 0)
        assert replica not in self.tree

    @rule(replica=st.sampled_from(REPLICAS), capacity=st.integers(1, 12))
    def set_capacity(self, replica, capacity):
        self.tick()
        self.tree.set_capacity(replica, capacity)
        rr = self.ref_replica(replica)
        rr.capacity = capacity
        excess = len(rr.entries) - capacity
        if excess > 0:
            rr.evict_oldest(excess)

    # -- invariants --------------------------------------------------------------------
    def compare_keys(self) -> None:
        for replica in ALL_IDS:
            rr = self.ref.get(replica)
            expected = [key_of_prefix(p) for p in rr.ordered()] if rr is not None else []
            assert self.tree.replica_keys(replica) == expected, replica

    @invariant()
    def consistent(self):
        if self.tree is None:
            return
        self.tree.check_invariants()
        assert set(self.tree.replicas) == set(self.ref)
        self.compare_keys()
        for replica in ALL_IDS:
            rr = self.ref.get(replica)
            if rr is None:
                assert replica not in self.tree
                assert self.tree.replica_blocks(replica) == 0
                assert self.tree.capacity(replica) == self.default_capacity
                continue
            assert self.tree.replica_blocks(replica) == len(rr.entries)
            assert self.tree.capacity(replica) == rr.capacity
            stats = self.tree.stats(replica)
            assert stats["blocks"] == len(rr.entries) and stats["capacity"] == rr.capacity
            assert stats["speculative"] == sum(1 for _, c in rr.entries.values() if not c)
            for prefix, (_, confirmed) in rr.entries.items():
                assert self.tree.is_confirmed(replica, key_of_prefix(prefix)) is confirmed
        distinct = {p for rr in self.ref.values() for p in rr.entries}
        assert len(self.tree) == len(distinct)
        assert self.tree.entries == sum(len(rr.entries) for rr in self.ref.values())

    @invariant()
    def every_held_prefix_matches(self):
        # match every chain some replica holds, against every replica, at the current time
        if self.tree is None:
            return
        for prefix in {p for rr in self.ref.values() for p in rr.entries}:
            self.check_match(prefix, ALL_IDS, self.now)


# Shrinking a failing run of this machine costs 20-60 s on a slow VM, so the shrink phase
# is off to keep the file fast: a failure prints the whole (at most 30-step) trace. Drop
# ``phases`` locally to get a minimal trace.
PrefixTreeMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=30, deadline=None, report_multiple_bugs=False,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow])
TestPrefixTreeMachine = PrefixTreeMachine.TestCase


class PurePythonPrefixTreeMachine(PrefixTreeMachine):
    tree_class = PurePythonPrefixTree


PurePythonPrefixTreeMachine.TestCase.settings = PrefixTreeMachine.TestCase.settings
TestPurePythonPrefixTreeMachine = PurePythonPrefixTreeMachine.TestCase


def test_the_default_tree_uses_the_c_block_map_when_it_is_built():
    from router._fast import BlockMap

    tree = PrefixTree(default_capacity_blocks=4)
    tree.add_replica("a")
    if BlockMap is None:
        pytest.skip("router._blockmap not built")
    assert type(tree._owners) is BlockMap and tree._walks is tree._owners
    pure = PurePythonPrefixTree(default_capacity_blocks=4)
    pure.add_replica("a")
    assert type(pure._owners) is dict and pure._walks is None


@pytest.mark.parametrize("tree_class", [PrefixTree, PurePythonPrefixTree])
def test_a_65th_replica_moves_the_blocks_to_a_dict_and_loses_nothing(tree_class):
    # Masks in the C table are 64 bits: slot 64 needs the dict. The switch must carry
    # every block and owner across, and matching must go on giving the same answers.
    tree = tree_class(default_capacity_blocks=100, speculative_ttl_s=1e9)
    replicas = [f"r{i}" for i in range(64)]
    for i, replica in enumerate(replicas):
        tree.insert(replica, [1000, 2000 + i % 3, 3000 + i], 0.0, confirmed=i % 2 == 0)
    before = tree.match([1000, 2001, 3001], replicas, 1.0)
    assert before["r1"] == 3 and before["r4"] == 2 and before["r0"] == 1
    tree.add_replica("r64")
    assert type(tree._owners) is dict and tree._walks is None
    assert tree.match([1000, 2001, 3001], replicas, 1.0) == before
    tree.insert("r64", [1000, 2001], 2.0)
    assert tree.match([1000, 2001], ["r64", "r1", "r0"], 2.0) == {"r64": 2, "r1": 2, "r0": 1}
    tree.check_invariants()
    for replica in replicas:
        tree.drop_replica(replica)
    assert len(tree) == 2 and tree.entries == 2
    tree.check_invariants()


# ---------------------------------------------------------------------------------------
# Keys: namespaces, chaining, full blocks, input validation, huge prompts
# ---------------------------------------------------------------------------------------
def test_namespaces_give_disjoint_keys_for_the_same_text():
    keyer = CharChunkKeyer(chunk_chars=8)
    text = "the same system prompt, shared by two tenants" * 4
    seeds = {
        "default": DEFAULT_SEED,
        "lora_a": namespace_seed("m", "lora-a", ""),
        "lora_b": namespace_seed("m", "lora-b", ""),
        "salt_1": namespace_seed("m", "", "salt-1"),
        "salt_2": namespace_seed("m", "", "salt-2"),
        "model_only": namespace_seed("m", "", ""),
    }
    assert len(set(seeds.values())) == len(seeds)
    keysets = {name: keyer.keys(text, seed) for name, seed in seeds.items()}
    assert all(len(ks) == len(text) // 8 for ks in keysets.values())
    names = list(keysets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert set(keysets[a]).isdisjoint(keysets[b]), (a, b)
    # Same namespace, same keys (for every keyer).
    assert keyer.keys(text, namespace_seed("m", "lora-a", "")) == keysets["lora_a"]
    tok = TokenBlockKeyer(block_size=4)
    ids = list(range(40))
    assert tok.keys(ids, namespace_seed("m", "x", "y")) == tok.keys(ids, namespace_seed("m", "x", "y"))
    assert set(tok.keys(ids, namespace_seed("m", "x", ""))).isdisjoint(tok.keys(ids, namespace_seed("m", "", "x")))
    pre = PrehashedKeyer(block_tokens=512)
    assert set(pre.keys([1, 2, 3], namespace_seed(lora="a"))).isdisjoint(pre.keys([1, 2, 3], namespace_seed(lora="b")))
    # parts are length-prefixed: ("ab", "c") and ("a", "bc") are different namespaces
    assert namespace_seed("ab", "c", "") != namespace_seed("a", "bc", "")
    assert namespace_seed("", "ab", "c") != namespace_seed("", "a", "bc")
    assert namespace_seed() == DEFAULT_SEED


def test_a_tenants_prefix_does_not_match_another_tenants_request():
    keyer = CharChunkKeyer(chunk_chars=8)
    text = "shared prefix of forty characters.......|"
    tree = PrefixTree(default_capacity_blocks=100, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    tree.insert("r", keyer.keys(text, namespace_seed(cache_salt="alice")), now=0.0)
    assert tree.match(keyer.keys(text, namespace_seed(cache_salt="bob")), ["r"], 1.0) == {"r": 0}
    assert tree.match(keyer.keys(text, namespace_seed(cache_salt="alice")), ["r"], 1.0) == {"r": len(text) // 8}


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=40), cut=st.integers(0, 40),
       block=st.integers(1, 5))
def test_keys_of_a_prefix_are_a_prefix_of_the_keys(tokens, cut, block):
    keyer = TokenBlockKeyer(block_size=block)
    full = keyer.keys(tokens)
    part = keyer.keys(tokens[:cut])
    assert len(full) == len(tokens) // block
    assert part == full[:len(tokens[:cut]) // block]


@settings(max_examples=200, deadline=None)
@given(a=st.text(alphabet="abc", max_size=48), b=st.text(alphabet="abc", max_size=48))
def test_char_keys_shared_exactly_for_identical_leading_blocks(a, b):
    keyer = CharChunkKeyer(chunk_chars=4)
    ka, kb = keyer.keys(a), keyer.keys(b)
    common = 0
    while common < min(len(ka), len(kb)) and a[4 * common:4 * common + 4] == b[4 * common:4 * common + 4]:
        common += 1
    # key i is shared exactly when blocks 0..i are identical (chained keys)
    assert ka[:common] == kb[:common]
    assert all(x != y for x, y in zip(ka[common:], kb[common:]))


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(-2**70, 2**70), max_size=12), cut=st.integers(0, 12))
def test_prehashed_keys_are_chained(ids, cut):
    full = KEYER.keys(ids)
    assert len(full) == len(ids)
    assert KEYER.keys(ids[:cut]) == full[:cut]


def test_only_full_blocks_get_keys():
    keyer = CharChunkKeyer(chunk_chars=8)
    assert keyer.keys("a" * 7) == []
    assert len(keyer.keys("a" * 8)) == 1
    assert len(keyer.keys("abcdefgh" * 2)) == 2
    assert len(keyer.keys("abcdefgh" * 2 + "x" * 7)) == 2
    assert keyer.keys("") == []
    tok = TokenBlockKeyer(block_size=4)
    assert tok.keys([1, 2, 3]) == []
    assert len(tok.keys(list(range(7)))) == 1
    assert len(tok.keys(list(range(8)))) == 2
    # the partial trailing block does not change the full blocks' keys
    assert keyer.keys("abcdefgh" * 2 + "xyz") == keyer.keys("abcdefgh" * 2)


@pytest.mark.parametrize("bad", [[-1], [0, 2**32], [5, 6, 7, -3], [2**40]])
def test_token_keyer_rejects_out_of_range_ids(bad):
    with pytest.raises(ValueError):
        TokenBlockKeyer(block_size=1).keys(bad)


def test_token_keyer_accepts_the_uint32_range():
    keys = TokenBlockKeyer(block_size=2).keys([0, 2**32 - 1, 1, 2])
    assert len(keys) == 2


def test_char_keyer_handles_lone_surrogates_and_invalid_utf8_deterministically():
    keyer = CharChunkKeyer(chunk_chars=8)
    text = "abc\ud800def\udfffghij" * 5
    first = keyer.keys(text)
    assert first and first == keyer.keys(text)
    assert first != keyer.keys("abc\ud801def\udfffghij" * 5)
    raw = b"\xff\xfe\xc3\x28 invalid utf-8 \x80\x80" * 4
    kb = keyer.keys(raw)
    assert kb and kb == keyer.keys(raw) == keyer.keys(bytearray(raw)) == keyer.keys(memoryview(raw))
    assert kb != keyer.keys(b"\xff\xfd\xc3\x28 invalid utf-8 \x80\x80" * 4)
    assert keyer.prompt_tokens(raw) > 0 and keyer.prompt_tokens(text) > 0


def test_million_character_prompt_keeps_capacity_blocks_and_the_chain_head():
    chunk = 128
    keyer = CharChunkKeyer(chunk_chars=chunk)
    rng = random.Random(1)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(1_000_000))
    keys = keyer.keys(text)
    assert len(keys) == 1_000_000 // chunk
    assert len(set(keys)) == len(keys)
    capacity = 1000
    tree = PrefixTree(default_capacity_blocks=capacity, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    assert tree.insert("r", keys, now=0.0) == capacity
    tree.check_invariants()
    assert tree.replica_blocks("r") == capacity
    assert len(tree) == capacity
    assert set(tree.replica_keys("r")) == set(keys[:capacity])
    assert tree.match(keys, ["r"], 1.0) == {"r": capacity}
    assert tree.match(keys[:capacity], ["r"], 1.0) == {"r": capacity}
    # inserting it again changes nothing: the same head is kept
    assert tree.insert("r", keys, now=2.0) == 0
    assert tree.replica_blocks("r") == capacity and len(tree) == capacity


# ---------------------------------------------------------------------------------------
# PrefixTree unit tests
# ---------------------------------------------------------------------------------------
def chain(*ids) -> list[int]:
    return keys_of(ids)


def test_bad_config_raises_config_error_naming_the_field():
    for kwargs, field in [({"default_capacity_blocks": 0}, "tree.default_capacity_blocks"),
                          ({"default_capacity_blocks": True}, "tree.default_capacity_blocks"),
                          ({"default_capacity_blocks": 2.0}, "tree.default_capacity_blocks"),
                          ({"speculative_ttl_s": 0}, "tree.speculative_ttl_s"),
                          ({"speculative_ttl_s": float("nan")}, "tree.speculative_ttl_s"),
                          ({"touch_coalesce_s": -0.5}, "tree.touch_coalesce_s")]:
        with pytest.raises(ConfigError) as info:
            PrefixTree(**kwargs)
        assert info.value.field == field
    tree = PrefixTree(default_capacity_blocks=4)
    with pytest.raises(ConfigError):
        tree.set_capacity("r", 0)
    with pytest.raises(ConfigError):
        tree.add_replica("r", -1)


def test_match_unknown_replicas_and_empty_keys():
    tree = PrefixTree(default_capacity_blocks=8, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    k = chain(1, 2, 3)
    tree.insert("a", k, 0.0)
    assert tree.match(k, ["a", "nobody"], 1.0) == {"a": 3, "nobody": 0}
    assert tree.match([], ["a", "nobody"], 1.0) == {"a": 0, "nobody": 0}
    assert tree.match(chain(1, 2, 9), ["a"], 1.0) == {"a": 2}
    assert tree.match(chain(9, 2, 3), ["a"], 1.0) == {"a": 0}


def test_insert_touches_leaf_first_and_evicts_tails_first():
    tree = PrefixTree(default_capacity_blocks=4, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    a = chain(1, 2, 3)
    tree.insert("r", a, 0.0)
    assert tree.replica_keys("r") == a[::-1]  # head youngest
    b = chain(7, 8)
    tree.insert("r", b, 1.0)  # one over capacity: the oldest entry (a's tail) goes
    assert tree.replica_keys("r") == a[1::-1] + b[::-1]
    assert tree.match(a, ["r"], 1.5) == {"r": 2}
    assert tree.stats("r")["evicted"] == 1


def test_touch_coalescing_skips_reorder_within_window_then_moves_after():
    for confirmed in (False, True):
        tree = PrefixTree(default_capacity_blocks=20, speculative_ttl_s=100.0, touch_coalesce_s=1.0)
        a, b = chain(1, 2, 3), chain(4, 5)
        tree.insert("r", a, 0.0, confirmed=confirmed)
        tree.insert("r", b, 0.1, confirmed=confirmed)
        before = a[::-1] + b[::-1]
        assert tree.replica_keys("r") == before
        tree.insert("r", a, 0.5, confirmed=confirmed)  # touched 0.5 s ago: not moved
        assert tree.replica_keys("r") == before
        tree.insert("r", a, 1.5, confirmed=confirmed)  # touched 1.5 s ago: moved
        assert tree.replica_keys("r") == b[::-1] + a[::-1]
        tree.check_invariants()


def test_touch_coalescing_exact_lru_when_window_is_zero():
    tree = PrefixTree(default_capacity_blocks=20, speculative_ttl_s=100.0, touch_coalesce_s=0.0)
    a, b = chain(1, 2), chain(4, 5)
    tree.insert("r", a, 0.0)
    tree.insert("r", b, 0.01)
    tree.insert("r", a, 0.02)
    assert tree.replica_keys("r") == b[::-1] + a[::-1]


def test_coalescing_still_refreshes_an_ancestor_touched_longer_ago_than_the_window():
    # Docs: "A block touched less than touch_coalesce_s ago is not moved again" and
    # "the head of a chain is always younger than its tail".
    tree = PrefixTree(default_capacity_blocks=20, speculative_ttl_s=5.0, touch_coalesce_s=1.0)
    k = chain(1, 2)
    tree.insert("r", k[:1], 0.0)   # head touched at 0.0
    tree.insert("r", k, 0.5)       # tail new at 0.5; head touched 0.5 s ago: not moved
    tree.insert("r", k, 1.2)       # tail touched 0.7 s ago: not moved; head 1.2 s ago: moved
    assert tree.replica_keys("r") == [k[1], k[0]], "the chain head must be younger than its tail"
    # So the head's speculative deadline is 1.2 + 5 = 6.2 and the tail's 0.5 + 5 = 5.5.
    tree.expire(5.3)
    assert tree.match(k, ["r"], 5.3) == {"r": 2}


def test_speculative_entries_expire_and_confirmed_survive():
    tree = PrefixTree(default_capacity_blocks=50, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    spec, conf = chain(1, 2, 3), chain(4, 5, 6)
    tree.insert("r", spec, 0.0)
    tree.insert("r", conf, 0.0, confirmed=True)
    assert tree.is_confirmed("r", spec[0]) is False
    assert tree.is_confirmed("r", conf[0]) is True
    assert tree.is_confirmed("r", 12345) is None
    assert tree.match(spec, ["r"], TTL) == {"r": 3}  # live up to and including the deadline
    assert tree.match(spec, ["r"], TTL + 0.01) == {"r": 0}
    assert tree.is_confirmed("r", spec[0]) is None  # match swept the expired entries
    later = 1e6
    assert tree.match(conf, ["r"], later) == {"r": 3}  # confirmed entries never expire
    tree.insert("r", spec, later)
    # a speculative touch never demotes; a confirming insert promotes
    tree.insert("r", conf, later + 1.0)
    assert all(tree.is_confirmed("r", k) for k in conf)
    tree.insert("r", spec, later + 2.0, confirmed=True)
    assert all(tree.is_confirmed("r", k) for k in spec)
    assert tree.match(spec, ["r"], later + 1e6) == {"r": 3}
    assert tree.expire(later + 1e6) == 0
    tree.check_invariants()


def test_next_expiry_is_a_lower_bound():
    tree = PrefixTree(default_capacity_blocks=50, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    a, b, c = chain(1, 2), chain(3, 4, 5), chain(6)
    tree.insert("r", a, 0.0)           # deadlines 5
    tree.insert("s", b, 2.0)           # deadlines 7
    tree.insert("s", c, 3.0, confirmed=True)
    assert tree.next_expiry <= 0.0 + TTL
    # nothing expires before next_expiry
    assert tree.expire(min(tree.next_expiry, 4.9)) == 0
    assert tree.replica_blocks("r") == 2 and tree.replica_blocks("s") == 4
    assert tree.expire(6.0) == 2       # a's two entries
    tree.check_invariants()
    assert tree.next_expiry <= 2.0 + TTL
    assert tree.match(a, ["r"], 6.0) == {"r": 0}
    assert tree.match(b, ["s"], 6.0) == {"s": 3}
    assert tree.expire(max(6.0, tree.next_expiry)) == 0  # time never goes backwards
    assert tree.expire(7.5) == 3
    assert tree.stats("s")["expired"] == 3 and tree.stats("r")["expired"] == 2
    assert tree.match(c, ["s"], 7.5) == {"s": 1}
    assert tree.replica_keys("s") == c
    tree.check_invariants()


def test_match_ignores_expired_ancestor_of_a_confirmed_block():
    # Docs: "an expired entry never counts and a chain whose head expired stops matching
    # at the head". The engine evicted the chain's head (a
    # BlockRemoved), the router then re-learned it speculatively, and the engine never
    # confirmed it: once its TTL passes, nothing beyond the head can be matched.
    tree = PrefixTree(default_capacity_blocks=8, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    k = chain(1, 2)
    tree.insert("r", k, 0.0, confirmed=True)
    tree.remove("r", [k[0]])
    tree.insert("r", k, 1.0)  # head new and speculative (deadline 6), tail stays confirmed
    assert tree.is_confirmed("r", k[0]) is False and tree.is_confirmed("r", k[1]) is True
    before_sweep = tree.match(k, ["r"], 7.0)
    tree.expire(7.0)
    after_sweep = tree.match(k, ["r"], 7.0)
    assert after_sweep == {"r": 0}
    assert before_sweep == after_sweep == {"r": 0}


def test_match_with_no_candidates_returns_empty_after_replica_added():
    tree = PrefixTree(default_capacity_blocks=8, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    k = chain(1, 2)
    tree.insert("a", k, 0.0)
    assert tree.match(k, ["a"], 0.1) == {"a": 2}
    tree.add_replica("b")
    assert tree.match(k, [], 0.2) == {}
    assert tree.match(k, (), 0.3) == {}


def test_match_with_no_candidates_after_drop_replica():
    tree = PrefixTree(default_capacity_blocks=8, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    k = chain(1, 2)
    tree.insert("a", k, 0.0)
    assert tree.match(k, ("a",), 0.1) == {"a": 2}
    tree.drop_replica("a")
    assert tree.match(k, (), 0.2) == {}


def test_confirmed_touches_are_ordered_at_sub_millisecond_spacing():
    # touch_coalesce_s=0 "gives exact LRU": a key touched later is younger, however close
    # the two touch times are.
    tree = PrefixTree(default_capacity_blocks=8, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    a, b = chain(1), chain(2)
    tree.insert("r", a, 1.0, confirmed=True)
    tree.insert("r", b, 1.00005, confirmed=True)
    tree.insert("r", a, 1.0001)  # a touched again, after b
    assert tree.replica_keys("r") == b + a


def test_remove_clear_evict_and_unknown_replicas():
    tree = PrefixTree(default_capacity_blocks=8, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    k = chain(1, 2, 3)
    tree.insert("a", k, 0.0)
    tree.insert("b", k[:2], 0.0, confirmed=True)
    assert len(tree) == 3 and tree.entries == 5
    assert tree.remove("a", [k[2], 999]) == 1
    assert tree.remove("nobody", k) == 0
    assert "nobody" not in tree
    assert tree.match(k, ["a", "b"], 1.0) == {"a": 2, "b": 2}
    assert len(tree) == 2
    assert tree.evict_lru("a", 0) == 0 and tree.evict_lru("a", -3) == 0
    assert tree.evict_lru("nobody", 3) == 0
    assert tree.evict_lru("a", 10) == 2
    assert tree.replica_blocks("a") == 0 and "a" in tree
    assert tree.clear_replica("b") == 2 and "b" in tree and len(tree) == 0
    assert tree.clear_replica("nobody") == 0 and tree.drop_replica("nobody") == 0
    tree.check_invariants()


def test_set_capacity_evicts_lru_and_registers():
    tree = PrefixTree(default_capacity_blocks=8, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    a, b = chain(1, 2, 3), chain(5, 6)
    tree.insert("r", a, 0.0)
    tree.insert("r", b, 1.0)
    tree.set_capacity("r", 3)
    assert tree.replica_keys("r") == [a[0]] + b[::-1]
    assert tree.capacity("r") == 3
    tree.set_capacity("new", 2)
    assert "new" in tree and tree.capacity("new") == 2
    # a chain longer than capacity keeps its first `capacity` keys
    assert tree.insert("new", a, 2.0) == 2
    assert tree.replica_keys("new") == a[1::-1]
    tree.check_invariants()


def test_replica_slots_are_reused_after_drop():
    tree = PrefixTree(default_capacity_blocks=16, speculative_ttl_s=TTL, touch_coalesce_s=0.0)
    first = [f"old{i}" for i in range(80)]
    for i, replica in enumerate(first):
        tree.insert(replica, chain(i, 1, 2), float(i) * 0.01, confirmed=True)
    tree.check_invariants()
    for replica in first[::2]:
        tree.drop_replica(replica)
    tree.check_invariants()
    second = [f"new{i}" for i in range(40)]
    for replica in second:
        tree.add_replica(replica)
    tree.check_invariants()
    # every freed slot was taken again: no growth of the slot table
    assert len(tree._slot_replica) == 80
    # a reused slot does not inherit the dropped replica's blocks
    for i in range(80):
        got = tree.match(chain(i, 1, 2), first + second, 10.0)
        for replica in second:
            assert got[replica] == 0
        for j, replica in enumerate(first):
            assert got[replica] == (3 if (j == i and j % 2 == 1) else 0)
    for i, replica in enumerate(second):
        tree.insert(replica, chain(100 + i), 11.0)
        assert tree.match(chain(100 + i), second, 11.0)[replica] == 1
    for replica in second + first:
        tree.drop_replica(replica)
    tree.check_invariants()
    assert len(tree) == 0 and tree.replicas == []
    for replica in first:
        tree.add_replica(replica)
    tree.check_invariants()
    assert len(tree._slot_replica) == 80


@pytest.mark.parametrize("tree_class", [PrefixTree, PurePythonPrefixTree])
@pytest.mark.parametrize("drop", ["nothing", "insert elsewhere", "evict", "expire", "remove", "clear",
                                  "drop and re-add", "capacity cut"])
def test_kept_all_is_false_after_any_way_out_of_the_replica(tree_class, drop):
    """``drop_mark``/``kept_all``: every way an entry leaves a replica makes the mark
    stale; inserts (there or elsewhere) do not."""
    tree = tree_class(default_capacity_blocks=8, speculative_ttl_s=10.0)
    tree.add_replica("a")
    tree.add_replica("b")
    tree.insert("a", keys_of((1, 2, 3)), 0.0)
    mark = tree.drop_mark("a")
    assert tree.drop_mark("ghost") is None
    if drop == "insert elsewhere":
        tree.insert("b", keys_of((1, 2, 3, 4)), 1.0)
        tree.insert("a", keys_of((1, 2, 3, 4)), 1.0)
    elif drop == "evict":
        tree.insert("a", keys_of((5, 5, 5, 5, 5, 5)), 1.0)  # 9 entries > 8: the oldest goes
    elif drop == "expire":
        tree.expire(20.0)
    elif drop == "remove":
        assert tree.remove("a", keys_of((1, 2, 3))[2:]) == 1
    elif drop == "clear":
        tree.clear_replica("a")
    elif drop == "drop and re-add":
        tree.drop_replica("a")
        tree.add_replica("a")
    elif drop == "capacity cut":
        tree.add_replica("a", 2)
    assert tree.kept_all(mark) is (drop in ("nothing", "insert elsewhere"))

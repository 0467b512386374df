"""RoutingCore: lifecycle, events, replica changes, bad input, and no collapse for any policy."""

from __future__ import annotations

import tracemalloc
from collections import Counter

import pytest

import policies
from router.core import RoutingCore, pick_from_tiers
from router.errors import ConfigError
from router.events import AllBlocksCleared, BlocksRemoved, BlocksStored
from router.keys import CharChunkKeyer, PrehashedKeyer
from tests.helpers import load, view

REPLICAS = [f"r{i}" for i in range(8)]


def make_core(policy="cache_aware", replicas=REPLICAS, **options) -> RoutingCore:
    core = RoutingCore.from_options(policy, seed=7, **options)
    core.on_replicas_changed(replicas, 0.0)
    return core


# -- no collapse ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", policies.available())
def test_no_policy_collapses_when_every_request_shares_its_first_block(name):
    """Every request shares block 0 and nothing else (16 blocks each). A policy that
    chases the longest match without a load bound sends everything to the first holder.
    Fair share is 1/8; 2x fair share is more than 10 standard deviations above what
    uniform random routing of 800 requests gives, so only a real collapse exceeds it."""
    core = RoutingCore(policies.get(name), PrehashedKeyer(block_tokens=16), seed=3)
    core.on_replicas_changed(REPLICAS, 0.0)
    shares = Counter()
    in_flight = 16
    for i in range(800):
        now = i * 0.01
        req = core.make_request([0] + [10_000 + 16 * i + j for j in range(15)], request_id=i)
        shares[core.route(req, now).replica] += 1
        if i >= in_flight:  # requests finish in arrival order, keeping 16 in flight
            core.on_first_token(i - in_flight, now)
            core.on_completed(i - in_flight, now)
    core.check_invariants()
    assert sum(shares.values()) == 800
    assert max(shares.values()) <= 2 * 800 / len(REPLICAS), shares


def test_cache_aware_spreads_a_hot_prefix_that_is_most_of_the_prompt():
    """Half of every prompt is one shared system prompt. Copying the prefix costs work, so
    cache_aware replicates it only as far as queues make worth it (5 of 8 replicas here),
    but no replica ends up with 2x its fair share (the collapse test's line) and the
    prefix has several holders."""
    core = make_core(keys={"kind": "chars", "chunk_chars": 64})
    shares = Counter()
    system = "You are a helpful assistant. " * 80
    for i in range(400):
        now = i * 0.01
        req = core.make_request(system + f"question {i}: " + "x" * 1000 + str(i) * 300, request_id=i)
        shares[core.route(req, now).replica] += 1
        if i >= 16:
            core.on_first_token(i - 16, now)
            core.on_completed(i - 16, now)
    assert max(shares.values()) <= 2 * 400 / len(REPLICAS), shares
    # ...and the shared prefix got replicated (spill targets recorded as holders).
    req = core.make_request(system + "z" * 200)
    holders = [r for r, m in core.tree.match(req.keys, core.replicas, 5.0).items() if m >= 20]
    assert len(holders) >= 4


# -- lifecycle -----------------------------------------------------------------------------
def test_route_learns_the_prefix_and_sends_the_next_request_there():
    core = make_core()
    prompt = "shared context " * 200
    first = core.route(core.make_request(prompt + "A", request_id=1), 0.0)
    core.on_first_token(1, 0.1)
    core.on_completed(1, 0.2)
    second = core.route(core.make_request(prompt + "B", request_id=2), 0.3)
    assert second.replica == first.replica
    assert second.outcome == "prefix_hit"
    assert second.matched_blocks == len(core.make_request(prompt).keys)


def test_load_accounting_follows_the_request_lifecycle():
    core = make_core(replicas=["a"])
    req = core.make_request("p" * 4000, request_id="x", output_tokens=100)
    core.route(req, 0.0)
    a = core.load.loads["a"]
    assert (a.in_flight, a.waiting, a.running) == (1, 1, 0)
    assert a.waiting_prefill_tokens == req.prompt_tokens  # cold: nothing cached
    core.on_first_token("x", 0.5)
    assert (a.waiting, a.running, a.waiting_prefill_tokens, a.context_tokens) == (0, 1, 0, req.prompt_tokens)
    core.on_completed("x", 1.0)
    assert (a.in_flight, a.running, a.kv_blocks, a.kv_added_blocks, a.context_tokens) == (0, 0, 0, 0, 0)
    core.on_completed("x", 1.0)  # a duplicate completion changes nothing
    assert a.in_flight == 0 and core.load.unknown_request_events == 1
    core.check_invariants()


def test_kv_accounting_counts_a_cached_prefix_once():
    """Each request in flight counts its whole KV (prompt + output) in ``kv_blocks`` and,
    in ``kv_added_blocks``, only what it adds beyond the prefix the replica holds (what
    cache_aware's KV barrier reads)."""
    core = make_core(replicas=["a"], keys={"kind": "tokens", "block_size": 16})
    prefix = list(range(3200))  # 200 blocks
    first = core.make_request(prefix + [7] * 32, request_id="first", output_tokens=64)
    core.route(first, 0.0)
    a = core.load.loads["a"]
    assert a.kv_blocks == a.kv_added_blocks == (3232 + 64) // 16  # cold: all of it
    second = core.make_request(prefix + [9] * 32, request_id="second", output_tokens=64)
    core.route(second, 0.1)  # holds the 200-block prefix (the first one's speculative entry)
    assert a.kv_blocks == 2 * 206
    assert a.kv_added_blocks == 206 + (32 + 64) // 16
    core.on_completed("first", 1.0)
    assert (a.kv_blocks, a.kv_added_blocks) == (206, 6)
    core.check_invariants()


def test_kv_events_confirm_remove_and_clear():
    core = make_core(replicas=["a", "b"])
    keys = tuple(core.make_request("e" * 1280).keys)  # 10 blocks of 128 chars
    assert core.on_kv_event("a", BlocksStored(keys), 0.0)
    assert core.tree.is_confirmed("a", keys[0]) is True
    assert core.tree.match(keys, ("a", "b"), 10_000.0) == {"a": 10, "b": 0}  # confirmed: no TTL
    core.on_kv_event("a", BlocksRemoved(keys[5:6]), 1.0)
    assert core.tree.match(keys, ("a",), 1.0)["a"] == 5  # a gap ends the usable prefix
    core.on_kv_event("a", AllBlocksCleared(), 2.0)
    assert core.tree.replica_blocks("a") == 0
    core.check_invariants()


def test_bad_kv_events_are_counted_and_skipped():
    core = make_core(replicas=["a"])
    assert not core.on_kv_event("ghost", BlocksStored((1, 2)), 0.0)
    assert not core.on_kv_event("a", BlocksStored(("not", "ints")), 0.0)
    assert not core.on_kv_event("a", BlocksStored((-1,)), 0.0)
    assert not core.on_kv_event("a", {"type": "BlockStored"}, 0.0)
    assert not core.on_kv_event("a", None, 0.0)
    assert core.stats.kv_events_unknown_replica == 1
    assert core.stats.kv_events_malformed == 4
    assert core.tree.replica_blocks("a") == 0


def test_removed_replica_is_purged_from_tree_sessions_and_load():
    core = make_core(replicas=["a", "b"])
    req = core.make_request("s" * 2000, session_id="alice", request_id=1)
    replica = core.route(req, 0.0).replica
    other = "b" if replica == "a" else "a"
    core.on_replica_died(replica, 1.0)
    assert core.replicas == (other,)
    assert core.tree.replica_blocks(replica) == 0 and replica not in core.tree
    assert core.sessions.get("alice", 1.0) is None
    assert replica not in core.load.loads
    again = core.route(core.make_request("s" * 2000, session_id="alice", request_id=2), 2.0)
    assert again.replica == other
    core.check_invariants()


def test_session_is_honoured_while_it_costs_little():
    core = make_core(replicas=["a", "b"])
    first = core.route(core.make_request("hello " * 10, session_id="s1", request_id=1), 0.0)
    core.on_completed(1, 0.1)
    # A different prompt (no shared prefix) of the same session returns to the same replica.
    second = core.route(core.make_request("other " * 10, session_id="s1", request_id=2), 0.2)
    assert second.replica == first.replica and second.outcome == "session"


# -- tiers -> replica ------------------------------------------------------------------------
def test_pick_from_tiers_follows_ray_serve_rule():
    v = view(["a", "b", "c"], loads={"a": load(in_flight=3), "b": load(in_flight=1), "c": load(in_flight=1)})
    assert pick_from_tiers([["a", "c", "b"]], v) == "c"  # fewest in flight, first listed on a tie
    assert pick_from_tiers([[], ["a"]], v) == "a"  # first tier with a replica
    assert pick_from_tiers([["zzz"]], v, allowed={"a"}) is None


def test_a_policy_naming_no_candidate_falls_back_and_is_counted():
    class Broken(policies.Policy):
        def rank(self, request, view):
            return [["not-a-replica"]]

    core = RoutingCore(Broken(), seed=1)
    core.on_replicas_changed(["a", "b"], 0.0)
    decision = core.route(core.make_request("x" * 300, request_id=1), 0.0)
    assert decision.replica in ("a", "b") and core.stats.invalid_tiers == 1


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["", "short", b"\xff\xfe invalid utf-8 \xc3\x28" * 40, "\ud800 lone surrogate " * 30])
def test_odd_prompts_route_without_error(prompt):
    core = make_core()
    decision = core.route(core.make_request(prompt, request_id=1), 0.0)
    assert decision.replica in REPLICAS
    core.check_invariants()


def test_no_replicas_and_unknown_candidates():
    core = RoutingCore.from_options("cache_aware")
    assert core.route(core.make_request("x" * 500), 0.0).replica is None
    assert core.stats.no_replica == 1
    core.on_replicas_changed(["a"], 0.0)
    decision = core.route(core.make_request("x" * 500, request_id=1), 0.0, candidates=["a", "never-seen"])
    assert decision.replica in ("a", "never-seen")


def test_a_million_character_prompt_stays_within_the_replica_capacity():
    core = make_core(replicas=["a", "b"], kv_capacity_tokens=32 * 1000)  # 1,000 blocks each
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(5):
        core.route(core.make_request(str(i) + "y" * 1_000_000, request_id=i), float(i))
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert core.tree.replica_blocks("a") <= 1000 and core.tree.replica_blocks("b") <= 1000
    assert core.tree.entries <= 2000
    assert grown < 2000 * 400  # a few hundred bytes per kept block, not per prompt character
    core.check_invariants()


def test_bad_core_options_fail_naming_the_field():
    with pytest.raises(ConfigError) as exc:
        RoutingCore.from_options("cache_aware", kv_capacity_tokens=0)
    assert exc.value.field == "kv_capacity_tokens"
    with pytest.raises(ConfigError) as exc:
        RoutingCore.from_options("cache_aware", keys={"kind": "words"})
    assert exc.value.field == "keys.kind"
    with pytest.raises(ConfigError) as exc:
        RoutingCore.from_options("cache_aware", speculative_ttl_s=-1)
    assert exc.value.field == "tree.speculative_ttl_s"
    with pytest.raises(ConfigError) as exc:
        RoutingCore.from_options("cache_aware", no_such_option=1)
    assert exc.value.field == "router.no_such_option" and "kv_capacity_tokens" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        RoutingCore.from_options("cache_aware", keys={"kind": "chars", "chunk_chars": -5})
    assert exc.value.field == "keys.chunk_chars"


def test_tenants_never_share_keys():
    core = make_core()
    text = "tenant secret prefix " * 50
    plain = core.make_request(text).keys
    salted = core.make_request(text, cache_salt="tenant-a").keys
    other_salt = core.make_request(text, cache_salt="tenant-b").keys
    lora = core.make_request(text, lora="adapter-1").keys
    assert len({*plain} & {*salted}) == 0
    assert len({*salted} & {*other_salt}) == 0
    assert len({*plain} & {*lora}) == 0
    core.route(core.make_request(text, cache_salt="tenant-a", request_id=1), 0.0)
    matched = core.tree.match(core.make_request(text, cache_salt="tenant-b").keys, core.replicas, 0.1)
    assert max(matched.values()) == 0  # tenant b gains nothing from tenant a's cache


def test_prehashed_and_char_keyers_are_selectable():
    core = RoutingCore.from_options("round_robin", keys={"kind": "prehashed", "block_tokens": 512})
    assert isinstance(core.keyer, PrehashedKeyer)
    req = core.make_request([1, 2, 3], prompt_tokens=1400)
    assert len(req.keys) == 3 and req.prompt_tokens == 1400
    assert isinstance(RoutingCore.from_options("random").keyer, CharChunkKeyer)


def test_a_reservation_counts_until_the_real_routing_replaces_or_drops_it():
    core = make_core(replicas=["a", "b"])
    request = core.make_request("some prompt " * 40, request_id="q1")
    core.reserve(request, "a", 0)
    assert core.load.loads["a"].in_flight == 1
    # Routed elsewhere after all: the reservation moves with it, counted once.
    core.on_routed(request, "b", 0.0)
    assert core.load.loads["a"].in_flight == 0 and core.load.loads["b"].in_flight == 1
    other = core.make_request("another prompt " * 40, request_id="q2")
    core.reserve(other, "a", 0)
    core.on_completed("q2", 1.0)  # never routed (cancelled): released
    assert core.load.loads["a"].in_flight == 0
    assert core.tree.replica_blocks("a") == 0  # a reservation never teaches the tree

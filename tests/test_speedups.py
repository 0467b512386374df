"""The C speedups (router._speedups) against their pure-Python twins.

Each C function must return exactly what the Python code it replaces returns: the same
keys, the same float costs bit for bit, the same tiers from the same random stream. The
tree's walks are checked by the state machine in test_prefix_tree.py, which runs on both.
Skipped where the extension is not built (then only the Python code exists).
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import policies
from policies.base import RoutingView
from router.core import RoutingCore
from router.keys import DEFAULT_SEED, CharChunkKeyer, TokenBlockKeyer, _chain_py
from router._fast import slot_maker_py
from router.load import ReplicaLoad
from tests.helpers import request

speedups = pytest.importorskip("router._speedups")
from router._fast import speedups as active  # noqa: E402

pytestmark = pytest.mark.skipif(active is None, reason="KVROUTE_PURE_PYTHON is set")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), step=st.integers(1, 70),
       seed=st.one_of(st.just(DEFAULT_SEED), st.integers(0, (1 << 64) - 1)))
def test_chain_gives_the_python_keys(data, step, seed):
    assert speedups.chain(data, step, seed) == _chain_py(data, step, seed)


@settings(max_examples=400, deadline=None)
@given(keys=st.lists(st.integers(0, (1 << 64) - 1), min_size=1, max_size=6), count=st.integers(1, 6),
       head=st.binary(max_size=300), cut=st.tuples(st.integers(0, 300), st.integers(0, 300)),
       tail=st.binary(max_size=300), step=st.integers(1, 70), memory=st.booleans())
def test_chain_on_gives_the_python_keys(keys, count, head, cut, tail, step, memory):
    """A chain continued over two byte strings (blocks that span them included) is the
    reference's, and so are its errors."""
    from router.keys import _chain_on_py

    start, end = sorted(cut)
    head_arg = memoryview(head) if memory else head
    try:
        expected = _chain_on_py(keys, count, head, start, end, tail, step)
    except ValueError:
        with pytest.raises(ValueError):
            speedups.chain_on(keys, count, head_arg, start, end, tail, step)
        return
    got = speedups.chain_on(keys, count, head_arg, start, end, tail, step)
    assert got == expected and got is not keys
    # The reference is the plain chain of the joined bytes.
    assert got == keys[:count] + _chain_py(head[start:end] + tail, step, keys[count - 1])


@settings(max_examples=400, deadline=None)
@given(pairs=st.lists(st.tuples(st.one_of(st.integers(0, 5), st.just((1 << 64) - 1)),
                                st.one_of(st.integers(0, 40), st.just(0xFFFF_FFFF))), max_size=12),
       size=st.integers(1, 33), seed=st.integers(0, (1 << 64) - 1), partial=st.booleans())
def test_segment_keys_give_the_python_keys(pairs, size, seed, partial):
    """The simulator's block keys of a prompt of segments (zero-token segments and blocks
    straddling many segments included) are the same in C and in Python."""
    from simulator.workloads.model import _segment_keys_py

    if sum(tokens for _, tokens in pairs) > 5000:
        pairs = [(sid, tokens % 41) for sid, tokens in pairs]
    assert speedups.segment_keys(pairs, size, seed, partial) == _segment_keys_py(pairs, size, seed, partial)


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.integers(0, 6), max_size=10), seen=st.sets(st.integers(0, 6)), as_tuple=st.booleans())
def test_leading_in_counts_as_the_python_loop(keys, seen, as_tuple):
    from simulator.workloads.model import _leading_in_py

    value = tuple(keys) if as_tuple else keys
    assert speedups.leading_in(value, seen) == _leading_in_py(value, seen)


def test_segment_keys_leave_what_they_cannot_pack_to_the_twin():
    """A pair the struct packing refuses gets None from C, so the Python twin raises."""
    for bad in ([(-1, 3)], [(1 << 64, 3)], [(1, -2)], [(1, 1 << 32)], [(1, 2, 3)], [("a", 3)], [[1, 3]]):
        assert speedups.segment_keys(bad, 4, 0, False) is None


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(alphabet=st.characters(max_codepoint=127), max_size=400),
                      st.text(max_size=200),
                      st.text(max_size=100).map(lambda t: t + "\udcff" + t)),
       step=st.integers(1, 70))
def test_chain_keys_a_str_as_its_utf8_bytes(text, step):
    """An ASCII str is keyed in place, any other str through its UTF-8 encoding (lone
    surrogates kept): both are the keys of the encoded bytes, in C and in Python."""
    data = text.encode("utf-8", "surrogatepass")
    expected = _chain_py(data, step, DEFAULT_SEED)
    assert speedups.chain(text, step, DEFAULT_SEED) == expected
    assert _chain_py(text, step, DEFAULT_SEED) == expected


def test_keyers_give_the_python_keys():
    text = "".join(chr(32 + (i * 7919) % 90) for i in range(5000)) + "\udcff tail é"
    keyer = CharChunkKeyer(128)
    data = keyer._text(text).encode("utf-8", "surrogatepass")
    assert keyer.keys(text) == _chain_py(data, 128, DEFAULT_SEED)
    tokens = TokenBlockKeyer(16)
    ids = [(i * 31) % 50_000 for i in range(1250)]
    assert tokens.keys(ids, 12345) == _chain_py(tokens._pack(ids), 64, 12345)


def test_pure_python_env_var_turns_the_speedups_off():
    code = "from router._fast import speedups; print(speedups is None)"
    env = dict(os.environ, KVROUTE_PURE_PYTHON="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "True"


# -- cache_aware -------------------------------------------------------------------------
def random_load(rng: random.Random, now: float) -> ReplicaLoad:
    load = ReplicaLoad(report_ttl_s=rng.choice([1.0, 5.0]))
    load.in_flight = rng.randint(0, 40)
    load.waiting = rng.randint(0, load.in_flight)
    load.running = load.in_flight - load.waiting
    load.waiting_prefill_tokens = rng.randint(0, 30_000) if load.waiting else 0
    load.context_tokens = rng.randint(0, 200_000) if load.running else 0
    load.kv_blocks = rng.randint(0, 6000)
    load.kv_added_blocks = rng.randint(0, load.kv_blocks)
    if rng.random() < 0.5:  # an engine report, fresh or stale
        load.engine_report_time = now - rng.choice([0.0, 0.5, 3.0, 10.0])
        load.engine_waiting = rng.choice([None, 0, rng.randint(0, 60)])
        load.engine_running = rng.choice([None, 0, rng.randint(0, 300)])
        load.engine_kv_usage = rng.choice([None, rng.random()])
    if rng.random() < 0.6:  # recent churn, as of a past (or, after a clock step, later) time
        load.churn_blocks = rng.choice([1.0, rng.uniform(0.0, 20_000.0)])
        load.churn_at = now - rng.choice([-1.0, 0.0, 5.0, 60.0, 600.0])
    if rng.random() < 0.3:  # a mixed fleet
        load.speed = rng.choice([0.5, 0.25, 2.0, rng.uniform(0.1, 3.0)])
    return load


def random_case(seed: int):
    rng = random.Random(seed)
    now = 100.0 + rng.random()
    n = rng.randint(1, 20)
    replicas = [f"r{i}" for i in range(n)]
    loads = {r: random_load(rng, now) for r in replicas if rng.random() < 0.9}  # some unknown
    matched = {r: rng.randint(0, 400) for r in replicas if rng.random() < 0.4}
    capacities = {r: rng.choice([800, 2000, 6000, 65_536]) for r in replicas if rng.random() < 0.7}
    session = rng.choice([None, rng.choice(replicas), "gone"])
    req = request(rng.randint(1, 300), block_tokens=16, output_tokens=rng.choice([None, 200, 4000]))

    def view(seed2: int) -> RoutingView:
        return RoutingView(replicas=replicas, matched_blocks=matched, load=loads, now=now,
                           rng=random.Random(seed2), session_replica=session, capacities=capacities,
                           default_capacity=rng.choice([0, 4096]) if seed2 < 0 else 4096)

    options = rng.choice([{}, {"kv_soft_limit": 0.0}, {"kv_barrier_s": 0.0}, {"load_factor": 1.0},
                          {"session_slack_s": 5.0}, {"churn_weight": 0.0}, {"churn_weight": 5.0},
                          {"churn_weight": 3.0, "kv_barrier_s": 0.0}])
    return req, view, options


def pure(policy):
    policy._speedups = None
    return policy


@pytest.mark.parametrize("seed", range(300))
def test_cache_aware_costs_and_ranks_match_the_python_code(seed):
    req, view, options = random_case(seed)
    fast = policies.get("cache_aware", **options)
    slow = pure(policies.get("cache_aware", **options))
    assert fast.costs(req, view(seed)) == slow.costs(req, view(seed))  # bit-identical floats
    assert fast.costs(req, view(seed), jitter=True) == slow.costs(req, view(seed), jitter=True)
    assert fast.rank(req, view(seed)) == slow.rank(req, view(seed))
    # the distinct-replicas shortcut (second call on the same tuple) gives the same tiers
    v1, v2 = view(seed), view(seed)
    v2.replicas = v1.replicas
    assert fast.rank(req, v1) == slow.rank(req, view(seed))
    assert fast.rank(req, v2) == slow.rank(req, view(seed))


@pytest.mark.parametrize("n", [63, 64, 65, 97])
def test_cache_aware_matches_python_past_its_stack_arrays(n):
    """Up to 64 replicas the C ranking works in stack arrays, beyond in heap ones."""
    rng = random.Random(n)
    now = 50.0
    replicas = [f"r{i}" for i in range(n)]
    loads = {r: random_load(rng, now) for r in replicas}
    matched = {r: rng.randint(0, 60) for r in replicas if rng.random() < 0.5}
    req = request(60, block_tokens=16, output_tokens=300)

    def view(seed):
        return RoutingView(replicas=replicas, matched_blocks=matched, load=loads, now=now, rng=random.Random(seed),
                           session_replica=replicas[n // 2], capacities={}, default_capacity=4096)

    fast, slow = policies.get("cache_aware"), pure(policies.get("cache_aware"))
    for seed in range(3):
        assert fast.rank(req, view(seed)) == slow.rank(req, view(seed))
        assert fast.costs(req, view(seed), jitter=True) == slow.costs(req, view(seed), jitter=True)


def test_cache_aware_falls_back_to_python_for_repeats_and_odd_types():
    req = request(10)
    loads = {"a": ReplicaLoad(), "b": ReplicaLoad()}
    loads["b"].waiting_prefill_tokens = 1.5  # not an int: the C side declines
    for replicas, mapping in ((["a", "b", "a"], loads), (["a", "b"], loads)):
        views = [RoutingView(replicas=replicas, matched_blocks={"a": 3}, load=mapping, now=0.0,
                             rng=random.Random(1)) for _ in range(2)]
        fast = policies.get("cache_aware")
        slow = pure(policies.get("cache_aware"))
        assert fast.rank(req, views[0]) == slow.rank(req, views[1])


def test_routing_decisions_are_identical_with_and_without_the_speedups():
    def decisions(core: RoutingCore) -> list:
        core.on_replicas_changed([f"r{i}" for i in range(8)], 0.0)
        rng = random.Random(7)
        systems = ["".join(chr(97 + rng.randrange(26)) for _ in range(700)) for _ in range(5)]
        out = []
        for i in range(400):
            prompt = rng.choice(systems) + "".join(chr(97 + rng.randrange(26)) for _ in range(rng.randint(0, 600)))
            now = i * 0.01
            decision = core.route(core.make_request(prompt, request_id=i, session_id=f"s{i % 9}"), now)
            out.append((decision.replica, decision.matched_blocks, decision.best_matched_blocks, decision.outcome))
            if i >= 20:
                core.on_first_token(i - 20, now)
                core.on_completed(i - 20, now)
            if i % 50 == 0:
                core.on_engine_report("r1", now, kv_usage=0.5, waiting=3, running=10)
        core.check_invariants()
        return out

    fast = RoutingCore.from_options("cache_aware", seed=3, kv_capacity_tokens=20_000)
    slow = RoutingCore.from_options("cache_aware", seed=3, kv_capacity_tokens=20_000)
    slow.policy._speedups = None
    slow.tree._speedups = None  # read when replicas register
    assert decisions(fast) == decisions(slow)
    assert type(fast.tree._owners) is not dict and slow.tree._walks is None


def test_cache_aware_leaves_the_generator_where_the_python_code_does():
    """The C loop draws its jitter after reading every replica (a second pass), one draw
    per replica in order: same tiers, and the generator ends where the Python loop leaves
    it, also for a Random subclass with its own random()."""
    for seed in range(40):
        req, view, options = random_case(seed)
        fast, slow = policies.get("cache_aware", **options), pure(policies.get("cache_aware", **options))
        v_fast, v_slow = view(seed), view(seed)
        assert fast.rank(req, v_fast) == slow.rank(req, v_slow)
        assert v_fast.rng.getstate() == v_slow.rng.getstate()

    class Loaded(random.Random):
        def random(self):
            return 0.5 * super().random()

    req, view, _ = random_case(3)
    v_fast, v_slow = view(3), view(3)
    v_fast.rng, v_slow.rng = Loaded(1), Loaded(1)
    assert policies.get("cache_aware").rank(req, v_fast) == pure(policies.get("cache_aware")).rank(req, v_slow)
    assert v_fast.rng.getstate() == v_slow.rng.getstate()


def test_cache_aware_declines_before_drawing():
    """A load the C loop cannot read makes it return None before its first draw, so the
    Python code that runs instead draws exactly what it would have drawn alone."""
    loads = {"a": ReplicaLoad(), "b": ReplicaLoad()}
    loads["b"].running = 2.0  # a float count: the C side declines
    view = RoutingView(replicas=["a", "b"], matched_blocks={"a": 3}, load=loads, now=0.0, rng=random.Random(1))
    state = view.rng.getstate()
    assert policies.get("cache_aware")._native(request(10), view, True, True) is None
    assert view.rng.getstate() == state


def test_cache_aware_refills_only_tiers_nothing_else_holds():
    """The C ranking reuses its previous tiers list (and each singleton list in it) only
    once nothing else refers to it: tiers a caller still holds never change."""
    replicas = ["a", "b", "c", "d"]
    loads = {r: ReplicaLoad() for r in replicas}

    def view(seed):
        return RoutingView(replicas=replicas, matched_blocks={"b": 2}, load=loads, now=0.0, rng=random.Random(seed))

    fast, slow = policies.get("cache_aware"), pure(policies.get("cache_aware"))
    req = request(4)
    first = fast.rank(req, view(1))
    snapshot = [list(t) for t in first]
    second = fast.rank(req, view(2))  # ``first`` is still held: all new lists
    assert second is not first and not any(a is b for a, b in zip(first, second))
    assert first == snapshot and second == slow.rank(req, view(2))
    tier = second[-1]  # one singleton list kept on its own
    tier_snapshot = list(tier)
    ident = id(second)
    del first, second
    third = fast.rank(req, view(3))  # the old tiers list is free again: refilled in place
    assert id(third) == ident and third == slow.rank(req, view(3))
    assert tier == tier_snapshot and not any(t is tier for t in third)


def test_the_c_ranker_stands_in_for_rank_matched():
    """CacheAwarePolicy puts a C Ranker on the instance as ``rank_matched``: the same tiers
    as the Python method for every input it takes, the Python method for the rest
    (repeats, a list, no replicas), and it follows the policy's speedups switch."""
    import gc
    import pickle
    import weakref

    from policies.cache_aware import CacheAwarePolicy

    def fields(replicas, seed):
        loads = {r: ReplicaLoad() for r in set(replicas)}
        if replicas:
            loads[replicas[0]].in_flight = 3
        return (request(5, output_tokens=40), replicas, {r: 2 for r in replicas[:1]}, loads, 1.0,
                random.Random(seed), None, lambda r: 0, {}, 4096)

    policy = policies.get("cache_aware")
    assert type(policy.rank_matched) is speedups.Ranker
    for replicas in (("a", "b", "c"), ("a", "b", "a"), ["a", "b", "c"], ()):
        for seed in range(3):
            got = policy.rank_matched(*fields(replicas, seed))
            assert got == CacheAwarePolicy.rank_matched(pure(policies.get("cache_aware")), *fields(replicas, seed))
    policy._speedups = None  # the switch the tests use: the method again
    assert "rank_matched" not in policy.__dict__
    del policy._speedups  # back to the class's: the Ranker again
    assert type(policy.rank_matched) is speedups.Ranker
    clone = pickle.loads(pickle.dumps(policy))
    assert type(clone.rank_matched) is speedups.Ranker and clone.rank_matched is not policy.rank_matched
    assert clone.rank_matched(*fields(("a", "b"), 1)) == policy.rank_matched(*fields(("a", "b"), 1))
    ref = weakref.ref(policy)
    del policy, clone
    gc.collect()
    assert ref() is None  # the policy <-> Ranker cycle is collected


def test_the_c_accountant_stands_in_for_routed():
    import gc
    import weakref

    from router.load import LoadView

    view = LoadView(max_tracked_requests=2)
    view.set_replicas(["a"])
    assert type(view.routed) is speedups.Accountant
    for rid in range(4):
        view.routed(rid, "a", 100, 40, 9)
    assert view.tracked_requests == 2 and view.forgotten_requests == 2
    view.max_tracked_requests = 3  # a new bound: a new Accountant
    view.routed(9, "a", 100, 40, 9, 4)
    assert view.tracked_requests == 3 and view.loads["a"].kv_added_blocks == 9 + 9 + 4
    view.check_invariants()
    view._speedups = None
    assert "routed" not in view.__dict__
    del view._speedups
    assert type(view.routed) is speedups.Accountant
    ref = weakref.ref(view)
    del view
    gc.collect()
    assert ref() is None


# -- load view -------------------------------------------------------------------------
def lockstep_views():
    from router.load import LoadView

    fast = LoadView(report_ttl_s=5.0, max_tracked_requests=6)
    slow = LoadView(report_ttl_s=5.0, max_tracked_requests=6)
    slow._speedups = None
    for v in (fast, slow):
        v.set_replicas(["a", "b", "c"])
    return fast, slow


def view_state(view):
    loads = {r: tuple(getattr(load, f) for f in ("in_flight", "waiting", "waiting_prefill_tokens", "running",
                                                 "kv_blocks", "kv_added_blocks", "context_tokens"))
             for r, load in view.loads.items()}
    records = [(rid, rec.replica, rec.uncached_tokens, rec.prompt_tokens, rec.kv_blocks, rec.added_blocks,
                rec.started) for rid, rec in view._requests.items()]
    return loads, records, view.forgotten_requests, view.unknown_request_events


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(
    st.sampled_from(["routed", "first", "done"]),
    st.one_of(st.integers(0, 9), st.sampled_from(["x", "y"]), st.just(2.5)),  # ids: ints, strs, odd
    st.sampled_from(["a", "b", "c", "new", 7]),
    st.integers(0, 3000), st.integers(-5, 3000), st.integers(0, 200),
    st.one_of(st.none(), st.integers(-3, 250), st.just(1.5))), max_size=40))
def test_load_routed_gives_the_python_accounting(steps):
    """``LoadView.routed``'s C fast path against its Python twin, step for step: same
    counts, same records in the same order (retries, unknown replicas, odd values and the
    table bound all included: the C side hands those to the Python code)."""
    fast, slow = lockstep_views()
    for kind, rid, replica, prompt, uncached, kv, added in steps:
        for v in (fast, slow):
            if kind == "routed":
                v.routed(rid, replica, prompt, uncached, kv, added)
            elif kind == "first":
                v.on_first_token(rid)
            else:
                v.on_completed(rid)
        assert view_state(fast) == view_state(slow)
    fast.check_invariants()


def test_load_routed_runs_the_common_case_in_c_only():
    from router.load import LoadView, _new_in_flight

    view = LoadView()
    view.set_replicas(["a"])
    assert speedups.load_routed(view._requests, view.loads, 1, "a", 100, 60, 7, 5, _new_in_flight) is True
    assert view.tracked_requests == 1 and view.loads["a"].kv_added_blocks == 5
    # a retry, an unknown replica, a float count: nothing changed, the Python code decides
    assert speedups.load_routed(view._requests, view.loads, 1, "a", 100, 60, 7, 5, _new_in_flight) is False
    assert speedups.load_routed(view._requests, view.loads, 2, "zz", 100, 60, 7, 5, _new_in_flight) is False
    assert speedups.load_routed(view._requests, view.loads, 3, "a", 100, 60.0, 7, 5, _new_in_flight) is False
    assert view.tracked_requests == 1 and view.loads["a"].in_flight == 1
    view.check_invariants()


def test_load_view_keeps_replicas_in_the_order_given():
    from router.load import LoadView

    view = LoadView()
    view.set_replicas(["r3", "r1", "r2", "r1"])
    assert list(view.loads) == ["r3", "r1", "r2"]


# -- slot makers -------------------------------------------------------------------------
ROUTE_REQUEST_SLOTS = ("keys", "prompt_tokens", "block_tokens", "session_id", "output_tokens", "request_id")


@pytest.mark.parametrize("maker", [speedups.SlotMaker, slot_maker_py], ids=["C", "Python"])
def test_slot_maker_builds_the_object_the_constructor_builds(maker):
    from policies.base import RouteRequest

    make = maker(RouteRequest, ROUTE_REQUEST_SLOTS)
    built = make([1, 2, 3], 48, 16, "s", 7, "r1")
    assert type(built) is RouteRequest
    assert built == RouteRequest([1, 2, 3], 48, 16, "s", 7, "r1")
    assert hash(RouteRequest((1,), 16, 16)) == hash(make((1,), 16, 16, None, None, None))
    with pytest.raises(dataclasses.FrozenInstanceError):  # still frozen
        built.prompt_tokens = 1
    view = maker(RoutingView, ("replicas", "now"))(("a", "b"), 2.5)
    assert view.replicas == ("a", "b") and view.now == 2.5
    with pytest.raises(AttributeError):  # a slot not passed stays unset, as after object.__new__
        view.rng


@pytest.mark.parametrize("maker", [speedups.SlotMaker, slot_maker_py], ids=["C", "Python"])
def test_slot_maker_rejects_what_is_not_a_slot_and_a_wrong_count(maker):
    from policies.base import RouteRequest

    with pytest.raises(TypeError, match="blocks"):  # a property, not a slot
        maker(RouteRequest, ("keys", "blocks"))
    with pytest.raises(TypeError, match="nope"):
        maker(RouteRequest, ("nope",))
    make = maker(RouteRequest, ROUTE_REQUEST_SLOTS)
    with pytest.raises(TypeError, match="exactly 6"):
        make([1], 16)


def test_slot_maker_keeps_reference_counts_exact():
    """Each stored value gains one reference while the object lives and loses it when the
    object dies (a leak or a missing reference would show here, not as a crash later)."""
    from policies.base import RouteRequest

    make = speedups.SlotMaker(RouteRequest, ROUTE_REQUEST_SLOTS)
    keys, session = [1, 2], "session-" + str(random.random())
    before = sys.getrefcount(keys), sys.getrefcount(session)
    built = [make(keys, 32, 16, session, None, None) for _ in range(100)]
    assert sys.getrefcount(keys) == before[0] + 100
    assert sys.getrefcount(session) == before[1] + 100
    del built
    assert (sys.getrefcount(keys), sys.getrefcount(session)) == before


class _Str(str):
    """A str subclass: not plain for the C pass (the Python code decides)."""


_roles = st.sampled_from(["system", "user", "assistant", "tool", "other"])
_texts = st.text(max_size=12)
_message = st.one_of(
    st.fixed_dictionaries({"role": _roles, "content": _texts}),  # plain
    st.fixed_dictionaries({"role": _roles, "content": _texts, "name": _texts}),  # an extra field
    st.fixed_dictionaries({"role": _roles, "content": st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                         "text": _texts}),
                                                                max_size=2)}),  # content parts
    st.builds(lambda r, c: {"role": _Str(r), "content": c}, _roles, _texts),
    st.builds(lambda r, c: {"role": r, "content": _Str(c)}, _roles, _texts),
)


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(_message, min_size=1, max_size=8), as_tuple=st.booleans())
def test_the_c_pass_over_messages_reads_what_the_python_loop_reads(messages, as_tuple):
    """``_chat_messages``, ``ChatRenderer.covers`` and ``ChatPrefix.begins`` with the C
    pass give what the Python code gives, for plain messages and every kind it declines."""
    from router import chat_render, conversations, requests
    from router.conversations import ChatPrefix

    body = {"messages": tuple(messages) if as_tuple else messages}
    roles = {"system": 0, "user": 1, "assistant": 2}
    renderer = chat_render.ChatRenderer.__new__(chat_render.ChatRenderer)
    renderer.segments = type("Segments", (), {"later": roles})()
    fast = requests._chat_messages(body)
    fast_covers = renderer.covers(fast[0]) if fast[1] else None
    prefixes = []
    for n in range(len(fast[0]) + 1):
        head = fast[0][:n]
        prefixes.append(ChatPrefix([m["role"] for m in head] + ["user"], [m["content"] for m in head] + ["x"],
                                   b"", 0, [], 0, 0))
    prefixes.append(ChatPrefix(["user", "user"], ["other", "x"], b"", 0, [], 0, 0))
    fast_begins = [p.begins(fast[0]) for p in prefixes]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(requests, "_plain_chat_chars", None)
        m.setattr(chat_render, "_roles_within", None)
        m.setattr(conversations, "_messages_begin", None)
        slow = requests._chat_messages(body)
        assert fast == slow
        if fast[1]:  # plain messages are used as they are, not copied
            assert all(a is b for a, b in zip(fast[0], messages))
        if fast[1]:
            assert fast_covers == renderer.covers(slow[0])
        assert fast_begins == [p.begins(slow[0]) for p in prefixes]


# Few roles and texts, so that histories share messages and keys often.
_few_roles = st.sampled_from(["user", "assistant"])
_few_texts = st.one_of(st.text(alphabet="ab", max_size=2), _texts)
_str_message = st.one_of(
    st.fixed_dictionaries({"role": _few_roles, "content": _few_texts}),  # plain
    st.fixed_dictionaries({"role": _few_roles, "content": _few_texts, "name": _texts}),  # an extra field
    st.builds(lambda r, c: {"role": r, "content": _Str(c)}, _few_roles, _few_texts),
)


@settings(max_examples=300, deadline=None)
@given(stored=st.lists(st.lists(_str_message, min_size=1, max_size=5), min_size=1, max_size=4),
       asked=st.lists(_str_message, min_size=1, max_size=8), take=st.integers(0, 3), seed=st.integers(0, 2 ** 64 - 1),
       make_plain=st.booleans())
def test_the_c_memo_walk_finds_what_the_python_walk_finds(stored, asked, take, seed, make_plain):
    """``ConversationMemo.find`` with the C keys and walk: always a prefix whose messages
    are the request's own (any messages, those the C code declines included), and for
    plain messages the same message and entry as the Python keys and walk."""
    from router import conversations

    if make_plain:
        stored = [[{"role": m["role"], "content": str(m["content"])} for m in h] for h in stored]
        asked = [{"role": m["role"], "content": str(m["content"])} for m in asked]
    asked = stored[take % len(stored)] + asked  # usually a remembered conversation, extended
    plain = all(type(m) is dict and len(m) == 2 and type(m["content"]) is str for m in asked) and all(
        type(m) is dict and len(m) == 2 and type(m["content"]) is str for h in stored for m in h)

    def found():
        memo = conversations.ConversationMemo(1 << 20)
        entries = []
        for history in stored:
            prefix = conversations.ChatPrefix([m["role"] for m in history], [m["content"] for m in history],
                                              b"", 0, [], 0, 0)
            memo.put(conversations.memo_key(history, len(history) - 1, seed), prefix)
            entries.append(prefix)
        at, prefix, key = memo.find(asked, seed)
        if prefix is not None:
            assert key == conversations.memo_key(asked, at, seed) and len(prefix.contents) == at + 1
            assert prefix.contents == [m["content"] for m in asked[:at + 1]]
            assert prefix.roles == [m["role"] for m in asked[:at + 1]]
        return at, None if prefix is None else next(i for i, p in enumerate(entries) if p is prefix)

    fast = found()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(conversations, "_c_memo_key", None)
        m.setattr(conversations, "_c_memo_find", None)
        slow = found()
    if plain:
        assert fast == slow

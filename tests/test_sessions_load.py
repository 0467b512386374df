"""SessionTable and LoadView: documented behaviour, plus state machines against naive models.

Expected values come from the docstrings of ``router/sessions.py`` and ``router/load.py``:
a session expires ``ttl_s`` after its last ``put`` and the table evicts its least recently
*put* entry when full ("entries are refreshed on put, so the oldest put expires first");
``LoadView`` counts what this router routed, releases a request's accounting on completion,
forgets the oldest record past ``max_tracked_requests`` and prefers fresh engine reports.
Time values are chosen so no assertion depends on what happens exactly at a TTL boundary.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from router.errors import ConfigError
from router.load import CHURN_HALF_LIFE_S, LoadView
from router.sessions import SessionTable, session_digest


# ---------------------------------------------------------------------------------------
# SessionTable
# ---------------------------------------------------------------------------------------
def test_session_expires_ttl_after_last_put():
    table = SessionTable(ttl_s=10.0, max_sessions=10)
    table.put("s", "r1", now=0.0)
    assert table.get("s", 9.9) == "r1"
    assert table.get("s", 10.1) is None
    assert len(table) == 0  # the expired entry is gone, not just hidden
    assert table.get("s", 0.0) is None


def test_put_refreshes_the_ttl_and_the_replica():
    table = SessionTable(ttl_s=10.0, max_sessions=10)
    table.put("s", "r1", now=0.0)
    table.put("s", "r2", now=8.0)
    assert len(table) == 1
    assert table.get("s", 15.0) == "r2"
    assert table.get("s", 18.1) is None


def test_capacity_evicts_least_recently_put():
    table = SessionTable(ttl_s=100.0, max_sessions=5)
    ids = [f"session-{i}" for i in range(8)]
    for i, sid in enumerate(ids):
        table.put(sid, f"r{i}", now=float(i))
        assert len(table) == min(i + 1, 5)
    assert len(table) == 5
    assert table.evicted == 3
    for sid in ids[:3]:
        assert table.get(sid, 8.0) is None
    for i, sid in enumerate(ids[3:], start=3):
        assert table.get(sid, 8.0) == f"r{i}"
    table.check_invariants()


def test_put_refreshes_recency():
    table = SessionTable(ttl_s=100.0, max_sessions=3)
    table.put("a", "r", 0.0)
    table.put("b", "r", 1.0)
    table.put("c", "r", 2.0)
    table.put("a", "r2", 3.0)  # a is now the most recent
    table.put("d", "r", 4.0)   # evicts b, the least recently put
    assert table.evicted == 1
    assert table.get("b", 5.0) is None
    assert table.get("a", 5.0) == "r2"
    assert table.get("c", 5.0) == "r" and table.get("d", 5.0) == "r"


def test_purge_replica_removes_exactly_its_sessions():
    table = SessionTable(ttl_s=100.0, max_sessions=100)
    for i in range(10):
        table.put(f"s{i}", "dead" if i % 3 == 0 else f"alive{i % 2}", float(i))
    assert table.purge_replica("dead") == 4
    assert len(table) == 6
    for i in range(10):
        expected = None if i % 3 == 0 else f"alive{i % 2}"
        assert table.get(f"s{i}", 11.0) == expected
    assert table.purge_replica("dead") == 0
    assert table.purge_replica("never-seen") == 0
    assert len(table) == 6


def test_empty_and_none_session_ids_are_ignored():
    table = SessionTable(ttl_s=100.0, max_sessions=2)
    table.put("", "r", 0.0)
    table.put(None, "r", 0.0)
    assert len(table) == 0 and table.evicted == 0
    assert table.get("", 1.0) is None and table.get(None, 1.0) is None
    table.put("x", "r", 0.0)
    table.put(None, "r2", 0.5)
    assert table.get("x", 1.0) == "r"


def test_huge_session_id_is_stored_as_a_digest():
    table = SessionTable(ttl_s=100.0, max_sessions=10)
    big = "".join(chr(ord("a") + i % 26) for i in range(1 << 20))  # 1 MiB id
    short = "abc"
    table.put(big, "r1", 0.0)
    table.put(short, "r2", 0.0)
    assert len(table) == 2
    assert table.get(big, 1.0) == "r1" and table.get(short, 1.0) == "r2"
    # a different 1 MiB id that shares a long prefix is a different session
    assert table.get(big[:-1] + "#", 1.0) is None
    held = repr(table._entries)
    assert big not in held and big[:64] not in held and short not in held
    assert len(held) < 400  # two small entries, whatever the id length
    keys = list(table._entries)
    assert set(keys) == {session_digest(big), session_digest(short)}
    assert all(isinstance(k, int) and 0 <= k < 1 << 64 for k in keys)
    assert max(sys.getsizeof(k) for k in keys) <= sys.getsizeof((1 << 64) - 1)
    table.check_invariants()


def test_session_ids_with_lone_surrogates_work():
    table = SessionTable(ttl_s=100.0, max_sessions=10)
    table.put("\ud800abc", "r", 0.0)
    assert table.get("\ud800abc", 1.0) == "r"
    assert table.get("\ud801abc", 1.0) is None


def test_expire_sweeps_expired_sessions():
    table = SessionTable(ttl_s=10.0, max_sessions=100)
    for i in range(6):
        table.put(f"s{i}", "r", float(i))
    table.put("s0", "r", 6.0)  # refreshed: now the youngest
    assert table.expire(9.5) == 0
    assert table.expire(13.5) == 3  # s1, s2, s3 (put at 1, 2, 3)
    assert len(table) == 3
    assert table.get("s4", 13.5) == "r" and table.get("s0", 13.5) == "r"
    assert table.expire(100.0) == 3
    assert len(table) == 0


@pytest.mark.parametrize("kwargs, field", [
    ({"ttl_s": 0}, "sessions.ttl_s"),
    ({"ttl_s": -1.0}, "sessions.ttl_s"),
    ({"ttl_s": float("nan")}, "sessions.ttl_s"),
    ({"ttl_s": True}, "sessions.ttl_s"),
    ({"ttl_s": "10"}, "sessions.ttl_s"),
    ({"max_sessions": 0}, "sessions.max_sessions"),
    ({"max_sessions": -5}, "sessions.max_sessions"),
    ({"max_sessions": True}, "sessions.max_sessions"),
    ({"max_sessions": 2.0}, "sessions.max_sessions"),
])
def test_session_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        SessionTable(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)


SESSION_TTL = 3.05  # time moves in multiples of 0.1 s: never exactly at a deadline
SESSION_IDS = ["", None, "a", "b", "c", "d", "e", "\ud800x", "long" * 500]
SESSION_REPLICAS = ["r0", "r1", "r2"]


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table: SessionTable | None = None
        self.model: OrderedDict[str, tuple[str, float]] = OrderedDict()  # LRU by put
        self.evicted = 0
        self.now = 0.0
        self.max_sessions = 1

    @initialize(max_sessions=st.integers(1, 5))
    def setup(self, max_sessions):
        self.max_sessions = max_sessions
        self.table = SessionTable(ttl_s=SESSION_TTL, max_sessions=max_sessions)

    @rule(tenths=st.integers(0, 25))
    def advance(self, tenths):
        self.now += tenths / 10.0

    @rule(sid=st.sampled_from(SESSION_IDS), replica=st.sampled_from(SESSION_REPLICAS))
    def put(self, sid, replica):
        self.table.put(sid, replica, self.now)
        if not sid:
            return
        self.model.pop(sid, None)
        self.model[sid] = (replica, self.now)
        while len(self.model) > self.max_sessions:
            self.model.popitem(last=False)
            self.evicted += 1

    @rule(sid=st.sampled_from(SESSION_IDS))
    def get(self, sid):
        got = self.table.get(sid, self.now)
        expected = None
        if sid and sid in self.model:
            replica, put_at = self.model[sid]
            if put_at + SESSION_TTL < self.now:
                del self.model[sid]
            else:
                expected = replica
        assert got == expected

    @rule(replica=st.sampled_from(SESSION_REPLICAS + ["ghost"]))
    def purge_replica(self, replica):
        doomed = [s for s, (r, _) in self.model.items() if r == replica]
        for sid in doomed:
            del self.model[sid]
        assert self.table.purge_replica(replica) == len(doomed)

    @rule()
    def expire(self):
        doomed = [s for s, (_, put_at) in self.model.items() if put_at + SESSION_TTL < self.now]
        for sid in doomed:
            del self.model[sid]
        assert self.table.expire(self.now) == len(doomed)

    @invariant()
    def consistent(self):
        if self.table is None:
            return
        self.table.check_invariants()
        assert len(self.table) == len(self.model)
        assert self.table.evicted == self.evicted
        assert len(self.table) <= self.max_sessions
        assert set(self.table._entries) == {session_digest(s) for s in self.model}
        # LRU order (oldest put first) and the replica of every entry
        assert [(d, r) for d, (r, _) in self.table._entries.items()] == \
            [(session_digest(s), r) for s, (r, _) in self.model.items()]


SessionMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestSessionMachine = SessionMachine.TestCase


# ---------------------------------------------------------------------------------------
# LoadView
# ---------------------------------------------------------------------------------------
COUNTERS = ("in_flight", "waiting", "waiting_prefill_tokens", "running", "kv_blocks", "kv_added_blocks",
            "context_tokens")


def counters(load) -> dict[str, int]:
    return {name: getattr(load, name) for name in COUNTERS}


def test_request_lifecycle_counters():
    view = LoadView(report_ttl_s=5.0, max_tracked_requests=10)
    view.on_routed("q1", "r", prompt_tokens=100, uncached_tokens=60, kv_blocks=7, added_kv_blocks=5)
    view.on_routed("q2", "r", prompt_tokens=50, uncached_tokens=50, kv_blocks=4)  # added: all 4
    assert counters(view.loads["r"]) == {"in_flight": 2, "waiting": 2, "waiting_prefill_tokens": 110,
                                         "running": 0, "kv_blocks": 11, "kv_added_blocks": 9, "context_tokens": 0}
    view.on_first_token("q1")
    view.on_first_token("q1")  # a duplicate first token changes nothing
    assert counters(view.loads["r"]) == {"in_flight": 2, "waiting": 1, "waiting_prefill_tokens": 50,
                                         "running": 1, "kv_blocks": 11, "kv_added_blocks": 9, "context_tokens": 100}
    assert view.on_completed("q1") == "r"
    assert view.on_completed("q2") == "r"
    assert counters(view.loads["r"]) == dict.fromkeys(COUNTERS, 0)
    assert view.on_completed("q2") is None  # duplicate completion
    view.on_first_token("never-routed")
    assert view.unknown_request_events == 2
    assert view.tracked_requests == 0
    view.check_invariants()


def test_retry_releases_the_first_attempt():
    view = LoadView(report_ttl_s=5.0, max_tracked_requests=10)
    view.on_routed("q", "a", prompt_tokens=10, uncached_tokens=10, kv_blocks=1)
    view.on_first_token("q")
    view.on_routed("q", "b", prompt_tokens=20, uncached_tokens=5, kv_blocks=2)
    assert counters(view.loads["a"]) == dict.fromkeys(COUNTERS, 0)
    assert counters(view.loads["b"]) == {"in_flight": 1, "waiting": 1, "waiting_prefill_tokens": 5,
                                         "running": 0, "kv_blocks": 2, "kv_added_blocks": 2,
                                         "context_tokens": 0}
    assert view.tracked_requests == 1
    assert view.unknown_request_events == 0
    view.check_invariants()


def test_negative_uncached_tokens_count_as_zero():
    view = LoadView()
    view.on_routed("q", "r", prompt_tokens=10, uncached_tokens=-30, kv_blocks=1)
    assert view.loads["r"].waiting_prefill_tokens == 0
    view.on_completed("q")
    assert view.loads["r"].waiting_prefill_tokens == 0
    view.check_invariants()


def test_max_tracked_requests_forgets_the_oldest():
    view = LoadView(report_ttl_s=5.0, max_tracked_requests=3)
    for i in range(5):
        view.on_routed(i, "r", prompt_tokens=10, uncached_tokens=10, kv_blocks=1)
    assert view.tracked_requests == 3
    assert view.forgotten_requests == 2
    assert counters(view.loads["r"])["in_flight"] == 3
    assert view.on_completed(0) is None and view.on_completed(1) is None  # forgotten
    for i in (2, 3, 4):
        assert view.on_completed(i) == "r"
    assert counters(view.loads["r"]) == dict.fromkeys(COUNTERS, 0)
    view.check_invariants()


def test_drop_and_set_replicas_forget_in_flight_records():
    view = LoadView()
    view.on_routed("q1", "a", prompt_tokens=10, uncached_tokens=10, kv_blocks=1)
    view.on_routed("q2", "b", prompt_tokens=10, uncached_tokens=10, kv_blocks=1)
    view.on_routed("q3", "c", prompt_tokens=10, uncached_tokens=10, kv_blocks=1)
    view.drop_replica("a")
    assert "a" not in view.loads and view.tracked_requests == 2
    assert view.on_completed("q1") is None
    view.set_replicas(["b", "d"])
    assert set(view.loads) == {"b", "d"}
    assert view.tracked_requests == 1
    assert counters(view.loads["d"]) == dict.fromkeys(COUNTERS, 0)
    view.on_first_token("q3")
    assert view.unknown_request_events == 2
    view.drop_replica("nobody")
    view.check_invariants()


def test_report_freshness_switches_to_router_estimates():
    view = LoadView(report_ttl_s=5.0, max_tracked_requests=100)
    view.on_routed("q1", "r", prompt_tokens=64, uncached_tokens=64, kv_blocks=2)
    view.on_routed("q2", "r", prompt_tokens=32, uncached_tokens=32, kv_blocks=1)
    load = view.loads["r"]
    # no report yet: the router's own figures
    assert load.report_age(0.0) is None and not load.report_is_fresh(0.0)
    assert load.queue_len(0.0) == 2
    assert load.kv_usage(0.0, 100) == pytest.approx(0.03)
    view.on_engine_report("r", 10.0, kv_usage=0.8, waiting=5, running=4)
    assert load.engine_report_time == 10.0
    assert load.report_age(12.0) == pytest.approx(2.0)
    assert load.report_is_fresh(12.0) and load.report_is_fresh(14.9)
    assert load.queue_len(12.0) == 9            # the engine's count (5 waiting + 4 running)
    assert load.kv_usage(12.0, 100) == pytest.approx(0.8)
    # stale after report_ttl_s: back to the router's estimates
    assert not load.report_is_fresh(15.1)
    assert load.queue_len(15.1) == 2
    assert load.kv_usage(15.1, 100) == pytest.approx(0.03)
    # a new report makes it fresh again
    view.on_engine_report("r", 20.0, kv_usage=0.5, waiting=3, running=0)
    assert load.report_is_fresh(20.5) and load.queue_len(20.5) == 3
    assert load.kv_usage(20.5, 100) == pytest.approx(0.5)


def test_report_from_unknown_replica_is_ignored():
    view = LoadView()
    view.on_engine_report("ghost", 1.0, kv_usage=0.5, waiting=1, running=1)
    assert "ghost" not in view.loads


@pytest.mark.parametrize("kwargs, field", [
    ({"report_ttl_s": 0}, "load.report_ttl_s"),
    ({"report_ttl_s": -1.0}, "load.report_ttl_s"),
    ({"report_ttl_s": "5"}, "load.report_ttl_s"),
    ({"max_tracked_requests": 0}, "load.max_tracked_requests"),
    ({"max_tracked_requests": -1}, "load.max_tracked_requests"),
    ({"max_tracked_requests": 10.0}, "load.max_tracked_requests"),
])
def test_load_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        LoadView(**kwargs)
    assert info.value.field == field


REPORT_TTL = 2.05  # time moves in multiples of 0.1 s: never exactly at the boundary
LOAD_REPLICAS = ["a", "b", "c"]
REQUEST_IDS = st.integers(0, 7)
CAPACITY_BLOCKS = 40


class LoadMachine(RuleBasedStateMachine):
    routed = Bundle("routed")  # ids routed so far, so events often hit tracked requests

    def __init__(self) -> None:
        super().__init__()
        self.view: LoadView | None = None
        self.max_tracked = 1
        self.now = 0.0
        self.replicas: set = set()
        # request id -> [replica, uncached, prompt, kv_blocks, started, added blocks]; oldest first
        self.requests: OrderedDict = OrderedDict()
        self.reports: dict = {}  # replica -> (kv_usage, waiting, running, time)
        self.forgotten = 0
        self.unknown = 0
        self.churn: dict = {}  # replica -> [(time, blocks)] written into its cache

    pure_python = False  # True: the Python accounting only (LoadView's C fast path off)

    @initialize(max_tracked=st.integers(1, 5))
    def setup(self, max_tracked):
        self.max_tracked = max_tracked
        self.view = LoadView(report_ttl_s=REPORT_TTL, max_tracked_requests=max_tracked)
        if self.pure_python:
            self.view._speedups = None

    def forget_replica(self, replica) -> None:
        self.replicas.discard(replica)
        self.churn.pop(replica, None)
        self.reports.pop(replica, None)
        for rid in [i for i, rec in self.requests.items() if rec[0] == replica]:
            del self.requests[rid]

    @rule(tenths=st.integers(0, 30))
    def advance(self, tenths):
        self.now += tenths / 10.0

    @rule(target=routed, rid=REQUEST_IDS, replica=st.sampled_from(LOAD_REPLICAS), prompt=st.integers(0, 200),
          cached=st.integers(0, 250), kv=st.integers(0, 15), added=st.none() | st.integers(-2, 20))
    def on_routed(self, rid, replica, prompt, cached, kv, added):
        self.view.on_routed(rid, replica, prompt_tokens=prompt, uncached_tokens=prompt - cached,
                            kv_blocks=kv, added_kv_blocks=added)
        self.requests.pop(rid, None)  # a retry releases the first attempt
        if replica not in self.replicas:
            self.replicas.add(replica)
        # added blocks: all of kv when not given, else clamped to [0, kv]
        self.requests[rid] = [replica, max(0, prompt - cached), prompt, kv, False,
                              kv if added is None else max(0, min(added, kv))]
        while len(self.requests) > self.max_tracked:
            self.requests.popitem(last=False)
            self.forgotten += 1
        return rid

    @rule(rid=routed | REQUEST_IDS)
    def on_first_token(self, rid):
        self.view.on_first_token(rid)
        rec = self.requests.get(rid)
        if rec is None:
            self.unknown += 1
        else:
            rec[4] = True

    @rule(rid=routed | REQUEST_IDS)
    def on_completed(self, rid):
        got = self.view.on_completed(rid)
        rec = self.requests.pop(rid, None)
        if rec is None:
            self.unknown += 1
            assert got is None
        else:
            assert got == rec[0]

    @rule(replica=st.sampled_from(LOAD_REPLICAS + ["ghost"]), blocks=st.integers(-1, 50))
    def churned(self, replica, blocks):
        self.view.churned(replica, blocks, self.now)
        if replica in self.replicas and blocks > 0:
            self.churn.setdefault(replica, []).append((self.now, blocks))

    @rule(replica=st.sampled_from(LOAD_REPLICAS + ["ghost"]))
    def drop_replica(self, replica):
        self.view.drop_replica(replica)
        self.forget_replica(replica)

    @rule(keep=st.sets(st.sampled_from(LOAD_REPLICAS)))
    def set_replicas(self, keep):
        self.view.set_replicas(sorted(keep))
        for replica in list(self.replicas):
            if replica not in keep:
                self.forget_replica(replica)
        self.replicas |= keep

    @rule(replica=st.sampled_from(LOAD_REPLICAS + ["ghost"]), kv=st.integers(0, 100),
          waiting=st.integers(0, 12), running=st.integers(0, 12))
    def on_engine_report(self, replica, kv, waiting, running):
        self.view.on_engine_report(replica, self.now, kv_usage=kv / 100, waiting=waiting,
                                   running=running)
        if replica in self.replicas:
            self.reports[replica] = (kv / 100, waiting, running, self.now)

    @precondition(lambda self: self.view is not None)
    @invariant()
    def consistent(self):
        view = self.view
        view.check_invariants()
        assert set(view.loads) == self.replicas
        assert view.tracked_requests == len(self.requests) <= self.max_tracked
        assert view.forgotten_requests == self.forgotten
        assert view.unknown_request_events == self.unknown
        for replica in self.replicas:
            load = view.loads[replica]
            recs = [r for r in self.requests.values() if r[0] == replica]
            expected = {
                "in_flight": len(recs),
                "waiting": sum(1 for r in recs if not r[4]),
                "waiting_prefill_tokens": sum(r[1] for r in recs if not r[4]),
                "running": sum(1 for r in recs if r[4]),
                "kv_blocks": sum(r[3] for r in recs),
                "kv_added_blocks": sum(r[5] for r in recs),
                "context_tokens": sum(r[2] for r in recs if r[4]),
            }
            got = counters(load)
            assert got == expected, (replica, got, expected)
            assert min(got.values()) >= 0
            self.check_report(load, self.reports.get(replica))
            # every write, decayed from its own time (the view folds them into one number)
            written = sum(b * 2.0 ** (-(self.now - t) / CHURN_HALF_LIFE_S) for t, b in self.churn.get(replica, ()))
            assert load.churn(self.now) == pytest.approx(written, rel=1e-9, abs=1e-9)

    def check_report(self, load, report) -> None:
        now = self.now
        router_queue = load.in_flight
        router_kv = load.kv_blocks / CAPACITY_BLOCKS
        fresh = report is not None and now - report[3] <= REPORT_TTL
        assert load.report_is_fresh(now) == fresh
        if report is None:
            assert load.report_age(now) is None
            assert load.engine_report_time is None
        else:
            kv, waiting, running, at = report
            assert load.engine_report_time == at
            assert (load.engine_kv_usage, load.engine_waiting, load.engine_running) == (kv, waiting, running)
        queue = load.queue_len(now)
        usage = load.kv_usage(now, CAPACITY_BLOCKS)
        if not fresh:
            assert queue == router_queue
            assert usage == pytest.approx(router_kv)
            return
        engine_queue = report[1] + report[2]
        engine_kv = report[0]
        # fresh: the engine's figure (the router's own may stand in when it is larger)
        if engine_queue >= router_queue:
            assert queue == engine_queue
        else:
            assert queue in (engine_queue, router_queue)
        if engine_kv >= router_kv:
            assert usage == pytest.approx(engine_kv)
        else:
            assert usage in (pytest.approx(engine_kv), pytest.approx(router_kv))


LoadMachine.TestCase.settings = settings(max_examples=250, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestLoadMachine = LoadMachine.TestCase


class PurePythonLoadMachine(LoadMachine):
    pure_python = True


PurePythonLoadMachine.TestCase.settings = LoadMachine.TestCase.settings
TestPurePythonLoadMachine = PurePythonLoadMachine.TestCase


@pytest.mark.parametrize("kwargs, field", [({"report_ttl_s": True}, "load.report_ttl_s"),
                                           ({"report_ttl_s": float("nan")}, "load.report_ttl_s"),
                                           ({"max_tracked_requests": True}, "load.max_tracked_requests")])
def test_load_view_rejects_bool_and_nan_config(kwargs, field):
    with pytest.raises(ConfigError) as exc:
        LoadView(**kwargs)
    assert exc.value.field == field
